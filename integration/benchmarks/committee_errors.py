"""How much a committee of two models could gain: their raw DM errors side by side, and the error of their average.

    python integration/benchmarks/committee_errors.py ../shared/datasets/water8 water OLD_WATER
    python integration/benchmarks/committee_errors.py ../shared/datasets/g2 chno-molecules OLD_CHNO

MODEL_A and MODEL_B are shipped models' names or model folders. An earlier version of a shipped model, trained
from scratch on the same data, comes out of git history (e.g. the `water` model of commit 2d28279):

    mkdir -p OLD_WATER && for f in card.json config.json weights.pt; do git show 2d28279:models/water/$f > OLD_WATER/$f; done

For each held-out run, both models' raw predictions (before any refinement, on the elements the reference
`.DM` stores) against SIESTA's converged DM: each model's MAE, the MAE of their plain average and of the best
weighted average over the whole set, and the correlation of the two error vectors. Averaging two models whose
errors correlate by ρ divides an error of equal size by sqrt(2 / (1 + ρ)) at best: a committee pays only where ρ
is well below 1.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np


def main() -> None:
    from siesta_dmguess.card import load_model
    from siesta_dmguess.data import list_runs, resolve_split
    from siesta_dmguess.evaluate import folded_to_reference, raw_prediction_for_run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", type=Path, help="dataset folder of converged SIESTA runs")
    p.add_argument("model_a", help="a shipped model's name or a model folder")
    p.add_argument("model_b", help="a second model (name or folder)")
    p.add_argument("--split", default="auto", help="runs to use: val (default where the dataset has one), train, all")
    args = p.parse_args()
    warnings.filterwarnings("ignore", module="sisl")
    models = [load_model(args.model_a), load_model(args.model_b)]
    split = resolve_split(args.data_dir, args.split)
    runs = [r for r in list_runs(args.data_dir) if r.in_split(split)]
    weights = np.linspace(0.0, 1.0, 21)
    rows, totals = [], np.zeros(weights.size)
    print(f"{'run':>8} {'MAE A':>9} {'MAE B':>9} {'average':>9} {'corr':>6}")
    for run in runs:
        errors = []
        for loaded in models:
            _, _, sample, flat, _ = raw_prediction_for_run(loaded, run.folder)
            errors.append(folded_to_reference(sample, flat) - sample.target_values)
        a, b = errors
        row = (np.abs(a).mean(), np.abs(b).mean(), np.abs((a + b) / 2).mean(), np.corrcoef(a, b)[0, 1])
        totals += [np.abs(w * a + (1 - w) * b).mean() for w in weights]
        rows.append(row)
        print(f"{run.id:>8} {row[0]:9.3e} {row[1]:9.3e} {row[2]:9.3e} {row[3]:6.2f}")
    mean = np.mean(rows, axis=0)
    best = int(np.argmin(totals))
    print(f"{'mean':>8} {mean[0]:9.3e} {mean[1]:9.3e} {mean[2]:9.3e} {mean[3]:6.2f}")
    print(f"best weighted average: {weights[best]:.2f} A + {1 - weights[best]:.2f} B, MAE {totals[best] / len(runs):.3e} "
          f"({len(runs)} runs of {args.data_dir.name}, split {split or 'all'})")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
