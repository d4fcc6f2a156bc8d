"""How far an ML guess starts from SIESTA's answer, and how fast SIESTA closes the gap, from `bench` JSON.

Per benchmark file: the median first dDmax of the ML runs (about the guess's largest element error), their
mean SCF iterations, and the geometric mean of dDmax[k] / dDmax[k + 1] over all their iterations (how much
the largest DM change falls per iteration); then the same ratio pooled over every file:

    python integration/benchmarks/first_change.py bench_h2o/bench_h2o.json bench_g2/bench_g2.json ...
"""
import argparse
import math
import statistics

from study_args import dataset_bench_report


def ml_histories(path: str) -> list[list[float]]:
    """The dDmax history of every ML run in one `bench` JSON (single structures, not trajectories)."""
    return [s["ml"]["dDmax"] for s in dataset_bench_report(path)["per_structure"] if s["ml"]["dDmax"]]


def log_ratios(histories: list[list[float]]) -> list[float]:
    # A change of exactly 0 (SIESTA prints it rounded) has no ratio; it is left out.
    return [math.log(h[k] / h[k + 1]) for h in histories for k in range(len(h) - 1) if h[k + 1] > 0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench_json", nargs="+", help="JSON files written by `siesta-dmguess bench DATA_DIR`")
    args = parser.parse_args(argv)
    pooled = []
    for path in args.bench_json:
        histories = ml_histories(path)
        ratios = log_ratios(histories)
        pooled += ratios
        fall = f"{math.exp(statistics.mean(ratios)):.1f}x" if ratios else "-"
        print(f"{path}: {len(histories)} ML runs, median first dDmax {statistics.median(h[0] for h in histories):.2g}, "
              f"mean SCF iterations {statistics.mean(len(h) for h in histories):.1f}, dDmax falls {fall} per iteration")
    if pooled:
        print(f"all files: dDmax falls {math.exp(statistics.mean(pooled)):.1f}x per iteration (geometric mean)")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
