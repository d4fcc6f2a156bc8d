"""Relative error of predictions in the metric the ML + residual history uses (calibrates history.PLAIN_BELOW).

    python integration/benchmarks/relative_error.py ../shared/datasets/h2o:water ../shared/datasets/water8:water \\
        ../shared/datasets/g2:chno-molecules ../shared/datasets/si8:silicon

For each held-out run: |D_ml - D_scf| / |D_scf| with D_ml the written (refined) prediction, in the density
metric Tr[A S A S] for folded DMs (Γ-only, molecules) and element by element for k-point DMs, exactly as
``history.error_gram`` weighs a trajectory's steps. Where it is below PLAIN_BELOW, ML + residual keeps the plain
prediction.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np


def main() -> None:
    from siesta_dmguess.card import load_model
    from siesta_dmguess.data import find_fdf, list_runs, load_run, resolve_split
    from siesta_dmguess.dm import to_image_keyed
    from siesta_dmguess.history import PLAIN_BELOW, error_gram, squared_norm
    from siesta_dmguess.predict import predict_density_matrix

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sets", nargs="+", help="DATASET:MODEL pairs")
    p.add_argument("--limit", type=int, default=6, help="held-out runs per dataset")
    args = p.parse_args()
    warnings.filterwarnings("ignore", module="sisl")
    for item in args.sets:
        folder, model_name = item.rsplit(":", 1)
        model = load_model(model_name)
        split = resolve_split(folder, "auto")
        values, metric = [], ""
        for run in [r for r in list_runs(folder) if r.in_split(split)][: args.limit]:
            _, _, reference, _ = load_run(run.folder)
            pred = predict_density_matrix(find_fdf(run.folder), model)
            predicted, converged = to_image_keyed(pred.density_matrix), to_image_keyed(reference)
            overlap = pred.history_overlap
            metric = "density" if overlap is not None else "element-wise"
            values.append(np.sqrt(error_gram([predicted], converged, overlap)[0, 0] / squared_norm(converged, overlap)))
        print(f"{Path(folder).name} ({model_name}, {metric}): " + " ".join(f"{v:.1e}" for v in values) +
              f"  (below PLAIN_BELOW = {PLAIN_BELOW:g}: {sum(v < PLAIN_BELOW for v in values)} of {len(values)})")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
