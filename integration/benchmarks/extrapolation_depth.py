"""How far SIESTA's DM extrapolation rule carries along a trajectory, by the number of past steps it uses.

Reads the converged DMs of a finished trajectory benchmark (its "atomic" runs: SIESTA's own answer at every
frame) and extrapolates each frame's DM from the frames before it with SIESTA's rule
(:func:`siesta_dmguess.history.extrapolation_coefficients`, the ``extrapolation`` guess and the base of
``ml+residual``) for each history depth; prints the mean error against the frame's converged DM: the largest
element (what SIESTA's dDmax sees), the RMS element, and, for Γ-only runs and molecules, the density-operator
error sqrt(Tr[(ΔD S)²]):

    siesta-dmguess bench md.traj --fdf FDF --model water --out bench_md
    python integration/benchmarks/extrapolation_depth.py md.traj bench_md/md --model water --depths 1 2 3 4 5

No SIESTA is run. Depth 1 is plain reuse of the previous DM; the benchmark and the calculator use 3.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trajectory", type=Path, help="the trajectory the benchmark ran (any file ASE reads)")
    p.add_argument("bench_dir", type=Path, help="the benchmark's folder of frames (OUT/<trajectory name>)")
    p.add_argument("--model", default="water", help="model whose basis and overlap describe the frames")
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    args = p.parse_args()

    import ase.io

    from siesta_dmguess.card import load_model
    from siesta_dmguess.dm import read_density_matrix, to_image_keyed
    from siesta_dmguess.history import TrajectoryHistory, error_gram, extrapolation_coefficients
    from siesta_dmguess.predict import predict_density_matrix
    from siesta_dmguess.structure import structure_from_atoms

    model = load_model(args.model)
    images = ase.io.read(str(args.trajectory), index=":")
    converged, positions, overlaps = [], [], []
    for t, atoms in enumerate(images):
        run = args.bench_dir / f"{t:04d}" / "atomic" / "run"
        dm_files = sorted(run.glob("*.DM"))
        if not dm_files:
            raise SystemExit(f"{run}: no converged .DM (is this the benchmark of {args.trajectory.name}?)")
        # The prediction supplies this frame's geometry with the model's basis and, where the DM is folded, S.
        pred = predict_density_matrix(structure_from_atoms(atoms, atoms.get_chemical_symbols()), model)
        converged.append(to_image_keyed(read_density_matrix(dm_files[0], pred.density_matrix.geometry)))
        positions.append(atoms.positions.copy())
        overlaps.append(pred.history_overlap)

    first = max(args.depths)  # every depth is scored on the same frames
    print(f"{args.trajectory.name}: frames {first}-{len(images) - 1}, SIESTA's extrapolation from the previous steps")
    print("| steps used | mean max abs error | mean RMS error | mean density-operator error | mean sum abs(c) |")
    print("| --- | --- | --- | --- | --- |")
    for depth in args.depths:
        history, rows = TrajectoryHistory(depth), []  # the benchmark's and the calculator's own "extrapolation"
        for t in range(len(images)):
            if t >= first:
                guess = history.guess("extrapolation", positions[t])
                c = extrapolation_coefficients([s.positions for s in history.steps], positions[t])
                diff = (guess - converged[t]).tocsr()
                density = np.sqrt(error_gram([guess], converged[t], overlaps[t])[0, 0]) if overlaps[t] is not None \
                    else np.nan
                rows.append((abs(diff).max(), np.sqrt(diff.multiply(diff).sum() / max(diff.nnz, 1)), density,
                             np.abs(c).sum()))
            history.push(positions[t], converged[t])
        r = np.array(rows)
        print(f"| {depth} | {r[:, 0].mean():.2e} | {r[:, 1].mean():.2e} | {r[:, 2].mean():.2e} | {r[:, 3].mean():.1f} |")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
