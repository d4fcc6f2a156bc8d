"""Why a Γ-only DM of a small cell is hard to predict: compare it with the same structure converged with k-points.

A Γ-only SIESTA run of a 6.2 Å water box gives a DM that is not the fold of a
local, k-converged DM: it comes from diagonalizing the (local) Hamiltonian at Γ
alone. This script reruns one Γ-only run folder with an n x n x n k-grid and
prints, against the run's own Γ reference:

* the k-converged DM folded into the cell over SIESTA's pattern (what a model of that pattern can do at best;
  blocks of farther image pairs do better: ``folding_reach.py``),
  also after the idempotent projection at Γ;
* the DM obtained by diagonalizing the k-converged (local) H at Γ;
* the model's prediction (as ``predict`` writes it);
* errors as MAE over the stored elements and as the density-weighted
  ||S^1/2 E S^1/2||_F (components along near-null overlap directions barely
  change the density);
* SIESTA's SCF iterations starting from the folded k-converged DM, from the
  model's prediction and from the atomic guess.

    SIESTA_COMMAND=/path/to/siesta python integration/benchmarks/gamma_vs_kpoints.py \\
        ../shared/datasets/water8/0004 --kgrid 3 --model water
"""

from __future__ import annotations

import argparse
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np


def fold(matrix, no: int) -> np.ndarray:
    """Sum the image columns of a (no, no * n_images) sisl CSR matrix into the cell."""
    return sum(matrix[:, k * no:(k + 1) * no] for k in range(matrix.shape[1] // no)).toarray()


def gamma_reference(run: Path):
    """A Γ-only run's (structure, sisl DM, dense folded DM, stored mask, folded S, occupied states, errors(d)),
    errors(d) printing a dense folded DM's MAE over the stored elements and its density-operator error."""
    import sisl

    from siesta_dmguess.data import load_run

    structure, _, dm_ref, hsx = load_run(run)
    if hsx is None:
        raise SystemExit(f"{run}: no .HSX (S is needed); use a run with has_hsx in index.json")
    ref = dm_ref.tocsr(0).toarray()
    no = ref.shape[0]
    stored = ref != 0
    s = fold(sisl.get_sile(str(hsx)).read_overlap(geometry=dm_ref.geometry).tocsr(0), no)
    n_occupied = int(round(np.trace(ref @ s) / 2))
    lam, u = np.linalg.eigh(s)
    root = u @ np.diag(np.sqrt(lam)) @ u.T

    def errors(d) -> str:
        e = (d - ref) * stored
        return f"MAE {np.abs(e[stored]).mean():.2e}  density-operator error {np.linalg.norm(root @ e @ root):.3f}"

    return structure, dm_ref, ref, stored, s, n_occupied, errors


def kpoint_rerun(run: Path, workdir: Path, kgrid: int, geometry):
    """Rerun a Γ-only run folder with a kgrid x kgrid x kgrid Monkhorst-Pack grid (from the atomic guess, with
    ``SaveHS``) in ``workdir``: (SIESTA run, sisl Hamiltonian with S, path of the k-run's .DM). ``geometry``
    carries the basis (the run's sisl geometry); the k-run's supercell comes from its own files."""
    import sisl

    from siesta_dmguess.data import find_fdf
    from siesta_dmguess.siesta import prepare_run, run_siesta
    from siesta_dmguess.siesta.runner import fdf_value

    kfdf = prepare_run(find_fdf(run), workdir, "atomic", pseudo_dirs=[run.parent / "basis", run])
    # a Γ-only fdf may spell out a 1x1x1 block; fdf keeps a key's first value, so drop it before adding the grid
    text = re.sub(r"(?is)%block\s+kgrid[._-]?monkhorst[._-]?pack\b.*?%endblock[^\n]*\n?", "", kfdf.read_text())
    kfdf.write_text(text + "\nSaveHS T\n%block kgrid_Monkhorst_Pack\n"
                    f" {kgrid} 0 0 0.0\n 0 {kgrid} 0 0.0\n 0 0 {kgrid} 0.0\n%endblock kgrid_Monkhorst_Pack\n")
    result = run_siesta(kfdf)
    label = fdf_value(kfdf, "SystemLabel", "siesta")
    kgeom = sisl.Geometry(geometry.xyz, geometry.atoms, lattice=sisl.get_sile(str(kfdf)).read_geometry().lattice)
    hamiltonian = sisl.get_sile(str(workdir / f"{label}.HSX")).read_hamiltonian(geometry=kgeom)
    return result, hamiltonian, workdir / f"{label}.DM"


def gamma_scf_from(d: np.ndarray, run: Path, geometry, stored: np.ndarray, s: np.ndarray, n_occupied: int,
                   workdir: Path):
    """SIESTA's output for the Γ-only run folder ``run`` started from the dense folded DM ``d`` (its stored
    elements, scaled to the electron count), run in ``workdir``."""
    import scipy.sparse as sp
    import sisl

    from siesta_dmguess.data import find_fdf
    from siesta_dmguess.dm import write_density_matrix
    from siesta_dmguess.siesta import prepare_run, run_siesta

    workdir.mkdir(parents=True, exist_ok=True)
    dm_file = workdir / "start.DM"
    d = d * (2 * n_occupied / np.trace(d @ s))
    rows, cols = np.nonzero(stored)
    no = d.shape[0]
    write_density_matrix(sisl.DensityMatrix.fromsp(geometry, [sp.csr_matrix((d[rows, cols], (rows, cols)),
                                                                             shape=(no, no))]), dm_file)
    return run_siesta(prepare_run(find_fdf(run), workdir / "run", "ml", dm_file=dm_file,
                                  pseudo_dirs=[run.parent / "basis"])).output


def main() -> None:
    import scipy.linalg
    import sisl

    from siesta_dmguess.data import find_fdf
    from siesta_dmguess.predict import predict_density_matrix
    from siesta_dmguess.refine import nearest_idempotent
    from siesta_dmguess.siesta import prepare_run, run_siesta

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a converged Γ-only run folder with fdf, .DM and .HSX")
    p.add_argument("--kgrid", type=int, default=3)
    p.add_argument("--model", default="water")
    args = p.parse_args()
    warnings.filterwarnings("ignore", module="sisl")

    structure, dm_ref, ref, stored, s, n_occupied, errors = gamma_reference(args.run)
    geometry, no = dm_ref.geometry, ref.shape[0]
    lam = np.linalg.eigvalsh(s)

    fdf = find_fdf(args.run)
    pseudo_dirs = [args.run.parent / "basis"]
    n = args.kgrid
    with tempfile.TemporaryDirectory() as tmp:
        krun, h_k, k_dm = kpoint_rerun(args.run, Path(tmp) / "kgrid", n, geometry)
        d_k = fold(sisl.get_sile(str(k_dm)).read_density_matrix(geometry=h_k.geometry).tocsr(0), no) * stored
        _, vectors = scipy.linalg.eigh(fold(h_k.tocsr(0), no), s)
        d_from_h = 2 * vectors[:, :n_occupied] @ vectors[:, :n_occupied].T
        pred = predict_density_matrix(fdf, args.model, fold=True)
        d_ml = fold(pred.density_matrix.tocsr(0), no)
        print(f"{args.run} ({structure.atoms.get_chemical_formula()}, {no} orbitals, S eigenvalues "
              f"{lam.min():.1e}..{lam.max():.1f}); {n}x{n}x{n} k-points: E_tot {krun.output.total_energy_eV:.3f} eV, "
              f"{krun.output.scf_iterations} SCF iterations")
        print(f"  k-converged DM folded             {errors(d_k)}")
        print(f"  ... idempotent at Γ               {errors(nearest_idempotent(d_k, s, n_occupied)[0])}")
        print(f"  k-converged H diagonalized at Γ   {errors(d_from_h)}")
        print(f"  model {args.model!r} ({pred.refinement})       {errors(d_ml)}")
        starts = {"k-converged DM": d_k, f"model {args.model!r}": d_ml}
        for name, d in starts.items():
            out = gamma_scf_from(d, args.run, geometry, stored, s, n_occupied, Path(tmp) / name.split()[0])
            print(f"  Γ-only SCF from {name:<16} {out.scf_iterations} iterations")
        atomic = run_siesta(prepare_run(fdf, Path(tmp) / "atomic", "atomic", pseudo_dirs=pseudo_dirs)).output
        print(f"  Γ-only SCF from atomic guess     {atomic.scf_iterations} iterations")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
