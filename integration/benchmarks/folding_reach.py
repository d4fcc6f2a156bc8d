"""How far must pair blocks reach for their fold to give a small cell's Γ-only DM?

    SIESTA_COMMAND=/path/to/siesta python integration/benchmarks/folding_reach.py \\
        ../shared/datasets/water8/0004 --kgrid 3

A Γ-only run's DM element (i, j) is the DM of the k-converged crystal summed over
*every* periodic image of j (it is the occupied projector of H at Γ), while SIESTA
stores, and a model of SIESTA's pattern predicts, only images within orbital
range. This script reruns the Γ-only run folder with an n x n x n k-grid (with
``SaveHS``), builds the crystal's DM D(R) on the n x n x n Born-von Kármán
supercell from the occupied states of H(k), S(k) at the grid's k-points, sums it
over the image pairs within a distance cut, and prints the errors of that fold
against the run's own Γ-only DM. The last line (all images) is the k-converged H
diagonalized at Γ. A model whose blocks reach that far can, in principle, do as
well (``ModelConfig.fold_reach``).
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
from crystal_references import crystal_density_matrix  # same folder
from gamma_vs_kpoints import fold, gamma_reference, gamma_scf_from, kpoint_rerun


def main() -> None:
    import sisl

    from siesta_dmguess.data import find_fdf

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a converged Γ-only run folder with fdf, .DM and .HSX")
    p.add_argument("--kgrid", type=int, default=3, help="odd: the grid must contain Γ")
    p.add_argument("--cuts", default="4,5,6,7,8,9,10,12", help="pair distance cuts (Å)")
    p.add_argument("--scf", action="store_true", help="also: Γ-only SCF iterations started from each fold "
                                                       "(charge-scaled) and from SIESTA's atomic guess")
    p.add_argument("--model", default="", help="also: this model's prediction, alone and plus the crystal's DM of "
                                                "every image pair beyond SIESTA's pattern (idempotent at Γ)")
    args = p.parse_args()
    warnings.filterwarnings("ignore", module="sisl")
    n = args.kgrid
    if n % 2 == 0:
        raise SystemExit("--kgrid must be odd (a grid with Γ)")

    _, dm_ref, ref, stored, s_gamma, n_occupied, errors = gamma_reference(args.run)
    geometry, no = dm_ref.geometry, ref.shape[0]

    with tempfile.TemporaryDirectory() as tmp:
        run, hamiltonian, k_dm = kpoint_rerun(args.run, Path(tmp), n, geometry)
        stored_k = sisl.get_sile(str(k_dm)).read_density_matrix(geometry=hamiltonian.geometry).tocsr(0)
    crystal = crystal_density_matrix(hamiltonian, n_occupied, n)  # D(R) on the n x n x n Born-von Kármán supercell
    offsets = list(crystal)
    atom_of = np.concatenate([[a] * geometry.atoms[a].no for a in range(geometry.na)])
    xyz, cell, big = geometry.xyz[atom_of], geometry.cell, n * geometry.cell
    distance = {}
    for r in offsets:  # minimum image on the Born-von Kármán supercell: D(R) is periodic there
        vec = xyz[None, :, :] + np.array(r) @ cell - xyz[:, None, :]
        frac = np.linalg.solve(big.T, vec.reshape(-1, 3).T).T
        distance[r] = np.linalg.norm((frac - np.rint(frac)) @ big, axis=1).reshape(no, no)
    print(f"{args.run} ({no} orbitals); {n}x{n}x{n} k-points: {run.output.scf_iterations} SCF iterations. "
          f"SIESTA's Γ-only DM against the crystal's DM summed over the image pairs within:")
    lattice = hamiltonian.geometry.lattice
    in_pattern = sum(crystal[r] * (stored_k[:, lattice.sc_index(r) * no:(lattice.sc_index(r) + 1) * no].toarray() != 0)
                     for r in offsets if np.all(np.abs(r) <= lattice.nsc // 2))
    folds = {"SIESTA's pattern": in_pattern}
    for cut in [float(c) for c in args.cuts.split(",")]:
        folds[f"{cut:5.1f} Å"] = sum(crystal[r] * (distance[r] <= cut) for r in offsets)
    folds["all images (H diagonalized at Γ)"] = sum(crystal.values())
    for name, d in folds.items():
        scf = ""
        if args.scf:  # how many iterations the Γ-only SCF still needs from this fold
            with tempfile.TemporaryDirectory() as tmp:
                out = gamma_scf_from(d, args.run, geometry, stored, s_gamma, n_occupied, Path(tmp))
            scf = f"  Γ-only SCF: {out.scf_iterations} iterations"
        print(f"  {name}  {errors(d)}{scf}", flush=True)
    if args.scf:
        from siesta_dmguess.siesta import prepare_run, run_siesta

        with tempfile.TemporaryDirectory() as tmp:
            atomic = run_siesta(prepare_run(find_fdf(args.run), Path(tmp), "atomic",
                                            pseudo_dirs=[args.run.parent / "basis"])).output
        print(f"  atomic guess  Γ-only SCF: {atomic.scf_iterations} iterations")
    if args.model:
        from siesta_dmguess.predict import predict_density_matrix
        from siesta_dmguess.refine import nearest_idempotent

        predicted = fold(predict_density_matrix(find_fdf(args.run), args.model, fold=True,
                                                refine="charge").density_matrix.tocsr(0), no)
        beyond = sum(crystal.values()) - in_pattern
        for name, d in ((f"model {args.model!r}", predicted), ("... plus the crystal's far images", predicted + beyond)):
            print(f"  {name:<34} idempotent at Γ: {errors(nearest_idempotent(d, s_gamma, n_occupied)[0])}")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
