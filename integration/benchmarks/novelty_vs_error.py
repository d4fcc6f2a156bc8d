"""Do the uncertainty scores flag the worst predictions? Rank correlation of novelty / |Tr(D S) - N| and DM error.

    python integration/benchmarks/novelty_vs_error.py --model water ../shared/datasets/h2o ../shared/datasets/water8

Evaluates the model on the datasets' `val` split (plus, with --split all, the training structures) and prints,
per structure, the DM MAE and the novelty score, then Spearman's rank correlation and how many of the
structures above the model's novelty threshold are among the worst-predicted ones. The second score is the raw
prediction's electron-count error |Tr(D S) - N| (S from the basis), which needs no reference either.
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy.stats import spearmanr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dirs", nargs="+")
    p.add_argument("--model", default="water")
    p.add_argument("--split", default="val")
    args = p.parse_args()
    from siesta_dmguess.card import load_model
    from siesta_dmguess.evaluate import evaluate

    threshold = float(load_model(args.model).model.novelty_threshold)
    result = evaluate(args.model, args.data_dirs, split=None if args.split == "all" else args.split, progress=False)
    rows = sorted(result["structures"], key=lambda m: -m["mae"])
    print(f"{'structure':<50} {'MAE':>10} {'novelty':>8} {'|dN| raw':>9}")
    for m in rows:
        dn = abs(m.get("raw_electron_count_error", float("nan")))
        print(f"{m['name'][-50:]:<50} {m['mae']:>10.3e} {m['novelty']:>8.2f} {dn:>9.2e}"
              f"{'  FLAGGED' if m['novelty'] > threshold else ''}")
    mae = np.array([m["mae"] for m in rows])
    nov = np.array([m["novelty"] for m in rows])
    rho = spearmanr(nov, mae).statistic
    flagged = nov > threshold
    worst = np.arange(len(rows)) < max(1, len(rows) // 4)
    print(f"Spearman rank correlation (novelty, MAE): {rho:.2f} over {len(rows)} structures")
    if all("raw_electron_count_error" in m for m in rows):
        dn = np.abs([m["raw_electron_count_error"] for m in rows])
        print(f"Spearman rank correlation (|Tr(D S) - N| of the raw prediction, MAE): {spearmanr(dn, mae).statistic:.2f}")
    print(f"flagged (novelty > {threshold:.2f}): {flagged.sum()}; of these in the worst quarter by MAE: "
          f"{(flagged & worst).sum()}; mean MAE flagged {mae[flagged].mean() if flagged.any() else float('nan'):.2e} "
          f"vs not flagged {mae[~flagged].mean() if (~flagged).any() else float('nan'):.2e}")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
