"""Which cheap per-prediction signal tells a costly ML guess from a helpful one? Three candidates, against
the SCF iterations SIESTA saved, for every structure of ``siesta-dmguess bench`` output folders:

* novelty / flag level (the Mahalanobis score of the most unusual atom; ``predict`` refuses above 100),
* |Tr(D S) - N| / N of the raw prediction (electron-count error, relative),
* the occupation gap of the idempotent projection (1 for a pure state; Γ-only and molecular DMs),
* the projection's shift: the largest change the projection makes to any element of the charge-scaled
  prediction (large where the prediction is far from every pure state).

    python integration/benchmarks/uncertainty_vs_savings.py bench_unseen [more bench output folders]

It also says which structures the guard of ``predict`` refuses (``Prediction.refusals``: far, k-sampling,
mixed) and what their ML guesses saved in the benchmarks given. Run ``bench`` with ``--force`` to measure what
the refused predictions would do (without it their "ML" runs start from the atomic guess and save 0):

    siesta-dmguess bench unseen/SET --model MODEL --split all --force --out bench_forced

Each folder holds ``bench_SET.json`` and the runs ``SET/NNNN/atomic/input.fdf`` (``--out`` of ``bench``); the
model is the one the JSON names. For each signal it prints where the structures that cost iterations fall
among those that saved some: a signal is a usable switch only if the two ranges do not overlap.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from pathlib import Path


def measure(folders) -> list[dict]:
    from siesta_dmguess.card import load_model
    from siesta_dmguess.predict import predict_density_matrix

    models, rows = {}, []
    for folder in folders:
        for report in sorted(folder.glob("bench_*.json")):
            data = json.loads(report.read_text())
            name = report.stem[len("bench_"):]
            model = Path(str(data["model"])).name
            models.setdefault(model, load_model(model))
            for r in data["per_structure"]:
                fdf = folder / name / r["name"] / "atomic" / "input.fdf"
                if not fdf.is_file() or "ml" not in r:
                    continue
                pred = predict_density_matrix(fdf, models[model], force=True)
                error = pred.electron_count_error
                shift = None
                if pred.refinement == "idempotent":
                    scaled = predict_density_matrix(fdf, models[model], force=True, refine="charge")
                    shift = float(abs(pred.values - scaled.values).max())
                rows.append({"set": name, "structure": r["name"], "model": model,
                             "novelty": pred.novelty / pred.novelty_threshold,
                             "electrons": abs(error) / pred.electrons_expected if error is not None else None,
                             "gap": pred.occupation_gap, "shift": shift, "refused": pred.refusal_kind,
                             "forced": bool(data.get("forced")),
                             "saved": r["atomic"]["scf_iterations"] - r["ml"]["scf_iterations"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # every novel structure would log its warning
    rows = measure(args.folders)
    print("| set | structure | model | novelty / flag | abs(Tr(D S) - N) / N | occupation gap | projection shift | "
          "refused | iterations saved |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in sorted(rows, key=lambda r: r["saved"]):
        gap = "–" if r["gap"] is None else f"{r['gap']:.3f}"
        electrons = "–" if r["electrons"] is None else f"{r['electrons']:.2%}"
        shift = "–" if r["shift"] is None else f"{r['shift']:.3f}"
        print(f"| {r['set']} | {r['structure']} | {r['model']} | {r['novelty']:.2f} | {electrons} | {gap} | "
              f"{shift} | {r['refused'] or ''} | {r['saved']:+d} |")
    costly, helpful = [r for r in rows if r["saved"] < 0], [r for r in rows if r["saved"] > 0]
    print(f"\n{len(costly)} structures cost iterations, {len(helpful)} saved some, {len(rows)} in all")
    for key, bad_is_high in (("novelty", True), ("electrons", True), ("gap", False), ("shift", True)):
        bad = [r[key] for r in costly if r[key] is not None]
        good = [r[key] for r in helpful if r[key] is not None]
        if not bad or not good:
            continue
        # A switch at the costly structures' mildest value would also catch these helpful ones:
        edge = min(bad) if bad_is_high else max(bad)
        caught = sum((g >= edge) if bad_is_high else (g <= edge) for g in good)
        print(f"{key}: costly {min(bad):.3g}–{max(bad):.3g}, helpful {min(good):.3g}–{max(good):.3g}; "
              f"a switch catching every costly one would also drop {caught} of {len(good)} helpful ones")
    for kind in sorted({r["refused"] for r in rows if r["refused"]}):
        caught = [r for r in rows if r["refused"] == kind]
        measured = [r for r in caught if r["forced"]]
        kept = [r for r in rows if not r["refused"] and r["gap"] is not None]
        print(f"refused as {kind!r}: {len(caught)} structures; with the ML guess forced ({len(measured)} of them) it "
              f"saved {sum(r['saved'] for r in measured):+d} iterations in total, cost some on "
              f"{sum(r['saved'] < 0 for r in measured)}, saved some on {sum(r['saved'] > 0 for r in measured)}"
              + (f"; the smallest gap of a structure not refused: {min(r['gap'] for r in kept):.3f}"
                 if kind == "mixed" and kept else ""))


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
