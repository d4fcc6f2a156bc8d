"""A study, not adopted: a molecular complex predicted molecule by molecule.

A model trained on isolated molecules (``chno-molecules``) has never seen one molecule's atoms beside another's,
so a complex (a hydrogen-bonded or stacked dimer) is flagged as novel as a whole, although each molecule alone
may not be. This predicts the DM of each covalently bonded fragment on its own (ASE's natural cutoffs × 1.15),
puts those blocks into the complex's DM with zero blocks between fragments, projects both that DM and the whole
prediction onto the nearest idempotent DM (natural occupations, no ΔH head, so that the two are compared alike)
and prints, per run: the novelty of the whole and of each fragment, the MAE of the intra- and inter-fragment
blocks against SIESTA's converged DM, the projection's occupation gap and, where a SIESTA is found, the SCF
iterations from each guess:

    SIESTA_COMMAND=... python integration/benchmarks/fragment_guess.py chno-molecules BENCH/chno-complexes/*/atomic

Each RUN is a folder with an fdf, SIESTA's converged ``<SystemLabel>.DM`` and the pseudopotentials, such as the
``atomic`` folder of each structure that ``siesta-dmguess bench`` leaves (``bench unseen/chno-complexes
--split all``). Measured (``docs/studies.md``, "Molecular complexes, fragment by fragment"): too little and too
mixed a gain for ``predict`` to do it.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np


def fragments(atoms) -> list[np.ndarray]:
    """Atom indices of each covalently bonded fragment."""
    from ase.neighborlist import NeighborList, natural_cutoffs
    from scipy.sparse.csgraph import connected_components

    bonds = NeighborList(natural_cutoffs(atoms, mult=1.15), self_interaction=False, bothways=True)
    bonds.update(atoms)
    count, label = connected_components(bonds.get_connectivity_matrix(sparse=True), directed=False)
    return [np.flatnonzero(label == k) for k in range(count)]


def dense(density_matrix) -> np.ndarray:
    """A molecule's sisl DM (no images) as a dense matrix."""
    d = density_matrix.tocsr(0)
    return d[:, :d.shape[0]].toarray()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("runs", nargs="+", help="folders with an fdf, the converged .DM and the pseudopotentials")
    args = p.parse_args()

    import scipy.sparse as sp
    import sisl

    from siesta_dmguess.card import load_model
    from siesta_dmguess.errors import SiestaNotFoundError
    from siesta_dmguess.fdf import find_fdf, siesta_dm_path
    from siesta_dmguess.predict import predict_density_matrix
    from siesta_dmguess.refine import nearest_idempotent
    from siesta_dmguess.siesta import find_siesta, prepare_run, run_siesta
    from siesta_dmguess.structure import read_structure

    try:
        find_siesta()
        siesta = True
    except SiestaNotFoundError:
        siesta = False
        print("no SIESTA found: errors and gaps only")
    model = load_model(args.model)
    totals = {"whole": 0, "fragments": 0}
    for run in map(Path, args.runs):
        fdf = find_fdf(run)
        structure = read_structure(fdf)
        whole = predict_density_matrix(structure, model, refine="none", force=True)
        geometry = whole.density_matrix.geometry
        reference = dense(sisl.get_sile(str(siesta_dm_path(fdf))).read_density_matrix(geometry=geometry))
        by_fragments, intra, novelty = np.zeros_like(reference), np.zeros(reference.shape, bool), []
        for atoms in fragments(structure.atoms):
            part = predict_density_matrix(replace(structure, atoms=structure.atoms[atoms],
                                                  labels=[structure.labels[a] for a in atoms]),
                                          model, refine="none", force=True)
            novelty.append(part.novelty)
            orbitals = np.concatenate([np.arange(geometry.firsto[a], geometry.firsto[a + 1]) for a in atoms])
            by_fragments[np.ix_(orbitals, orbitals)] = dense(part.density_matrix)
            intra[np.ix_(orbitals, orbitals)] = True
        overlap = whole.keyed_overlap.toarray()
        overlap = overlap[:, :overlap.shape[0]]
        stored = reference != 0
        line = [f"{run}: novelty whole {whole.novelty:.1f}, fragments " + ", ".join(f"{n:.1f}" for n in novelty)
                + f" (flag {whole.novelty_threshold:.1f})"]
        pattern = whole.density_matrix.tocsr(0).tocoo()  # a molecule's DM has no images: one square block
        for name, raw in (("whole", dense(whole.density_matrix)), ("fragments", by_fragments)):
            error = np.abs(raw - reference)
            projected, gap = nearest_idempotent(raw, overlap, int(round(whole.electrons_expected / 2)))
            text = (f"{name}: MAE intra {error[intra & stored].mean():.1e}, inter "
                    f"{error[~intra & stored].mean() if (~intra & stored).any() else 0:.1e}, gap {gap:.2f}")
            if siesta:
                with tempfile.TemporaryDirectory() as tmp:
                    values = projected[pattern.row, pattern.col]
                    dm = sisl.DensityMatrix.fromsp(geometry, [sp.csr_matrix((values, (pattern.row, pattern.col)),
                                                                            shape=pattern.shape)])
                    dm.write(str(Path(tmp) / "guess.DM"))
                    out = run_siesta(prepare_run(fdf, Path(tmp) / "run", "ml", dm_file=Path(tmp) / "guess.DM",
                                                 pseudo_dirs=[run])).output
                text += f", SCF {out.scf_iterations} (DM read: {out.dm_read_from_file})"
                totals[name] += out.scf_iterations
            line.append(text)
        print("\n  ".join(line), flush=True)
    if siesta:
        print(f"total SCF iterations: whole {totals['whole']}, fragments {totals['fragments']}")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
