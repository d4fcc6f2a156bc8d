"""Which part of a starting DM's error costs SCF iterations? SIESTA runs from the converged DM plus parts of the
model's error, and from the converged DM of the same structure moved by less than a grid spacing.

    SIESTA_COMMAND=/path/to/siesta python integration/benchmarks/error_components.py \\
        ../shared/datasets/h2o/0004 --model water

With D* the run's converged DM and E = D_ml - D* the error of the model's written
(refined) prediction, every start below is D* plus a part of E (charge-normalized
with S from the basis), so only that part differs from the answer:

* ``ml``: the whole error E (the model's own guess);
* ``near-null`` / ``rest``: E split in the eigenbasis of S. ``near-null`` keeps the
  components whose two S eigenvalues are both below ``--null`` (directions the basis
  nearly cannot tell apart: they barely change the density), ``rest`` everything else;
* ``populations``: only E's orbital (Mulliken) populations, put on the diagonal: the
  model's charge errors and nothing else;
* ``populations fixed``: the model's guess re-projected so that its Mulliken
  population of every orbital shell equals D*'s: the idempotent projection of
  -S P S + sum_g mu_g (S Pi_g + Pi_g S)/2, a potential shift mu_g per shell g
  (Pi_g its orbitals), solved by Newton's method. It tells whether charges are
  the part of the density that matters;
* ``grid-shift d``: D* itself, for the structure moved by d Å (SIESTA's real-space
  grid breaks translation symmetry, so an exact equivariant model can do no better:
  the floor of any prediction).

For a k-point run (``si8``) the DM keeps its images and has no dense Γ matrix, so E
(of the charge-scaled prediction, the form written for k-point runs) is split by
block instead: ``on-site`` (each atom's own block), ``pairs < 3 Å`` (first
neighbours) and ``pairs >= 3 Å``; and the floor is D* as SIESTA wrote it (with its
images), unmoved and moved.

Prints, per start, its largest and mean element error, the density-operator error
sqrt(Tr[(E S)²]), SIESTA's iteration count and the dDmax history. For a molecule the
dense matrices are small; for a periodic box this is O(n_orb³) and meant for the
24-atom ``water8`` cells.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def split_by_overlap(error: np.ndarray, overlap: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(near-null part, rest) of a symmetric error matrix in the eigenbasis of S."""
    lam, vec = np.linalg.eigh(overlap)
    low = lam < threshold
    in_basis = vec.T @ error @ vec
    near_null = vec @ (in_basis * np.outer(low, low)) @ vec.T
    return near_null, error - near_null


def populations_fixed(density: np.ndarray, overlap: np.ndarray, groups: np.ndarray, target: np.ndarray,
                      n_occupied: int, steps: int = 30) -> np.ndarray:
    """The idempotent DM nearest ``density`` whose Mulliken population of every orbital group equals ``target``.

    Potential shifts mu_g on the groups are added to -S P S (P = D/2) before taking its lowest ``n_occupied``
    states; Newton's method on mu with a finite-difference Jacobian (a few groups, small dense matrices).
    """
    from scipy.linalg import eigh

    n_groups = int(groups.max()) + 1
    base = -overlap @ (density / 2) @ overlap
    shifts = [0.5 * (overlap * (groups == g)[None, :] + overlap * (groups == g)[:, None]) for g in range(n_groups)]

    def project(mu):
        _, vec = eigh(base + sum(m * w for m, w in zip(mu, shifts)), overlap)
        occupied = vec[:, :n_occupied]
        return 2 * occupied @ occupied.T

    def pops(d):
        return np.bincount(groups, (d * overlap).sum(axis=1), minlength=n_groups)

    mu = np.zeros(n_groups)
    for _ in range(steps):
        d = project(mu)
        residual = pops(d) - target
        if abs(residual).max() < 1e-8:
            break
        jac = np.empty((n_groups, n_groups))
        for g in range(n_groups):
            step = mu.copy()
            step[g] += 1e-5
            jac[:, g] = (pops(project(step)) - pops(d)) / 1e-5
        mu -= np.linalg.lstsq(jac, residual, rcond=1e-10)[0]
    return d


def moved_fdf(fdf: Path, shift: float, tmp: Path) -> Path:
    """A copy of ``fdf`` with every atom moved by ``shift`` Å along a fixed oblique direction."""
    from siesta_dmguess.siesta.templates import fdf_with_geometry
    from siesta_dmguess.structure import read_structure

    moved = tmp / f"shift{shift}" / fdf.name
    moved.parent.mkdir()
    structure = read_structure(fdf)
    structure.atoms.translate(np.array([1.0, 0.7, 0.3]) * shift)
    moved.write_text(fdf_with_geometry(fdf.read_text(), structure.atoms, structure.labels))
    return moved


def scf_from(run_fdf: Path, dm_file: Path, workdir: Path, run: Path) -> tuple[int, str]:
    """SIESTA's iteration count and dDmax history for ``run_fdf`` started from ``dm_file`` (pseudopotentials from
    the run folder ``run`` or its dataset's ``basis/``)."""
    from siesta_dmguess.siesta import prepare_run, run_siesta

    out = run_siesta(prepare_run(run_fdf, workdir, "ml", dm_file=dm_file,
                                 pseudo_dirs=[run.parent / "basis", run])).output
    return out.scf_iterations, " ".join(f"{st.dDmax:.1e}" for st in out.scf_history)


def kpoint_components(run: Path, fdf: Path, model: str, shifts: list[float]) -> None:
    """SCF iterations of a k-point run started from D* plus the model's error on-site, on near pairs or on far
    pairs, and from its own converged DM file (images kept), unmoved and moved by less than a grid spacing: the
    floor of any prediction for that run."""
    from siesta_dmguess.card import load_model
    from siesta_dmguess.dm import density_matrix_from_flat, write_density_matrix
    from siesta_dmguess.evaluate import reference_for_run
    from siesta_dmguess.predict import predict_density_matrix

    dm_file = next(run.glob("*.DM"), None)
    if dm_file is None:
        raise SystemExit(f"{run}: no converged .DM to start from")
    loaded = load_model(model)
    pred = predict_density_matrix(fdf, loaded, fold=False)
    structure, _, _, reference = reference_for_run(loaded, run)
    lay = pred.sample.layout
    if reference.size != lay.size or pred.overlap is None:
        raise SystemExit(f"{run}: the reference does not share the prediction's layout, or the model has no overlap")
    stored = ~np.isnan(reference)  # SIESTA's pattern: the elements D* holds
    exact = np.where(stored, reference, 0.0)
    error = np.where(stored, pred.values - exact, 0.0)
    onsite = lay.element_block < lay.n_onsite
    distance = np.linalg.norm(lay.block_vectors(structure), axis=1)[lay.element_block]
    parts = {"ml": np.ones(lay.size, bool), "on-site": onsite, "pairs < 3 Å": ~onsite & (distance < 3.0),
             "pairs >= 3 Å": ~onsite & (distance >= 3.0)}
    print(f"{run}: k-point run, {int(stored.sum())} stored elements; starts D* + part of E, charge-scaled")
    print(f"{'start':>22} {'max|E|':>8} {'SCF it.':>7}  dDmax per iteration")
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, part) in enumerate(parts.items()):
            start = exact + np.where(part, error, 0.0)
            start *= pred.electrons_expected / float(np.dot(start, pred.overlap))
            work = Path(tmp) / f"part{k}"
            work.mkdir()
            write_density_matrix(density_matrix_from_flat(pred.structure, pred.sample_basis, lay, start, False,
                                                          pred.sample.in_siesta_pattern), work / "start.DM")
            iterations, history = scf_from(fdf, work / "start.DM", work / "run", run)
            print(f"{name:>22} {np.abs(start - exact)[stored].max():>8.1e} {iterations:>7d}  {history}", flush=True)
        starts = {"converged DM": fdf} | {f"grid-shift {d:g} Å": moved_fdf(fdf, d, Path(tmp)) for d in shifts}
        for k, (name, run_fdf) in enumerate(starts.items()):
            iterations, history = scf_from(run_fdf, dm_file, Path(tmp) / f"start{k}", run)
            print(f"{name:>22} {'-':>8} {iterations:>7d}  {history}", flush=True)


def main() -> None:
    import scipy.sparse as sp
    import sisl

    from siesta_dmguess.card import load_model
    from siesta_dmguess.data import find_fdf, load_run
    from siesta_dmguess.dm import flat_to_csr, write_density_matrix
    from siesta_dmguess.predict import predict_density_matrix

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a converged run folder (fdf + .DM); k-point runs: split by block")
    p.add_argument("--model", default="water")
    p.add_argument("--null", type=float, default=0.05, help="S eigenvalue below which a direction is near-null")
    p.add_argument("--shifts", default="0.02,0.057", help="grid-shift starts: displacements in Å (0 to skip)")
    args = p.parse_args()

    fdf = find_fdf(args.run)
    structure, _, dm_ref, _ = load_run(args.run)
    shifts = [float(x) for x in args.shifts.split(",") if float(x)]
    if structure.fdf_settings.get("kgrid"):
        # A k-point DM keeps its images and has no dense Γ matrix to split in S's eigenbasis: split by block.
        return kpoint_components(args.run, fdf, args.model, shifts)
    pred = predict_density_matrix(fdf, load_model(args.model), fold=True)
    if pred.overlap is None:
        raise SystemExit("the model carries no radial functions: no overlap")
    s = flat_to_csr(pred.sample.layout, pred.overlap, fold=True).toarray()
    exact = dm_ref.tocsr(0).toarray()
    error = pred.density_matrix.tocsr(0).toarray() - exact
    n_electrons = pred.electrons_expected
    near_null, rest = split_by_overlap(error, s, args.null)
    populations = (error * s).sum(axis=1)
    shells = [(a, o.l, o.zeta) for a, atom in enumerate(dm_ref.geometry.atoms) for o in atom.orbitals]
    shell_index = {key: k for k, key in enumerate(dict.fromkeys(shells))}
    groups = np.array([shell_index[key] for key in shells])
    fixed = populations_fixed(exact + error, s, groups, np.bincount(groups, (exact * s).sum(axis=1)),
                              int(round(n_electrons / 2)))
    starts = {"ml": (fdf, exact + error), f"near-null (S < {args.null:g})": (fdf, exact + near_null),
              "rest": (fdf, exact + rest), "populations": (fdf, exact + np.diag(populations / np.diag(s))),
              "populations fixed": (fdf, fixed)}
    keep = (exact != 0) | (s != 0)  # SIESTA's pattern (the reference stores every element within range)

    print(f"{args.run}: {exact.shape[0]} orbitals, smallest S eigenvalue {np.linalg.eigvalsh(s)[0]:.1e}")
    print(f"{'start':>22} {'max|E|':>8} {'mean|E|':>8} {'rho err':>8} {'SCF it.':>7}  dDmax per iteration")
    with tempfile.TemporaryDirectory() as tmp:
        for d in shifts:  # a moved copy of the fdf, started from the unmoved converged DM
            starts[f"grid-shift {d:g} Å"] = (moved_fdf(fdf, d, Path(tmp)), exact)
        for k, (name, (run_fdf, start)) in enumerate(starts.items()):
            start = 0.5 * (start + start.T)
            start = start * (n_electrons / (start * s).sum())
            e = start - exact
            work = Path(tmp) / f"start{k}"
            work.mkdir()
            dm_file = work / "start.DM"
            write_density_matrix(sisl.DensityMatrix.fromsp(dm_ref.geometry, [sp.csr_matrix(np.where(keep, start, 0))]),
                                 dm_file)
            iterations, history = scf_from(run_fdf, dm_file, work / "run", args.run)
            if run_fdf is fdf:
                rho = np.sqrt(max(np.trace(e @ s @ e @ s), 0.0))
                errors = f"{abs(e).max():>8.1e} {abs(e[exact != 0]).mean():>8.1e} {rho:>8.4f}"
            else:  # the moved structure's own answer is not known here
                errors = f"{'-':>8} {'-':>8} {'-':>8}"
            print(f"{name:>22} {errors} {iterations:>7d}  {history}", flush=True)


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
