"""The wall-time table of the held-out benchmarks (``docs/benchmarks.md``, "Wall time"), from `bench` JSON files.

    python integration/benchmarks/wall_times.py bench/bench_h2o.json bench/bench_water8.json ...

Each file is what ``siesta-dmguess bench ../shared/datasets/NAME --repeat 3`` wrote. Per set: SIESTA's wall time
summed over the structures from the atomic guess and from the ML guess (each structure's median-time run), the
mean prediction time, the ML guess in all (SIESTA plus predictions, the table's "wall ML incl. prediction") and
the start-up paid once. Nothing is rerun.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from study_args import dataset_bench_report


def row(report: dict) -> str:
    rows = report["per_structure"]
    atomic = sum(r["atomic"]["siesta_wall_s"] for r in rows)
    ml = sum(r["ml"]["siesta_wall_s"] for r in rows)
    predictions = [r["ml"]["prediction_s"] for r in rows]
    name = report.get("name") or Path(report["data"]).name
    change = f"{100 * (ml - atomic) / atomic:+.0f}".replace("-", "−")
    return (f"| `{name}` ({len(rows)}) | {atomic:.1f} s | {ml:.1f} s, {change} % | "
            f"{sum(predictions) / len(predictions):.2f} s | {ml + sum(predictions):.1f} s | "
            f"{report.get('startup_s', 0.0):.1f} s |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", type=Path, help="bench_NAME.json files of dataset folders")
    args = p.parse_args()
    print("| set | SIESTA, atomic guess | SIESTA, ML guess | predictions (mean) | in all, ML | start-up once |")
    print("| --- | --- | --- | --- | --- | --- |")
    for path in args.reports:
        print(row(dataset_bench_report(path)))


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
