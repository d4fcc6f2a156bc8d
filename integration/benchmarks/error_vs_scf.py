"""Which error measure of a predicted DM ranks structures by the SCF iterations SIESTA needs from it?

Joins, by run, the per-structure errors of ``siesta-dmguess evaluate MODEL DATA --json E.json`` with the ML
guess's SCF iterations in ``siesta-dmguess bench DATA --model MODEL`` (its ``bench_DATA.json``) and prints
Spearman's rank correlation of each measure with those iterations: the element MAE and largest error, the
density-operator error sqrt(Tr[(ΔD S)²]) and the band-energy error Tr[(D − D_ref) H] (where the runs have an
``.HSX``). A measure that ranks well is one to select models by (1: the same order, 0: none):

    python integration/benchmarks/error_vs_scf.py eval_g2.json bench_g2/bench_g2.json [more pairs ...]
"""
import argparse
import json
from pathlib import Path

from scipy.stats import spearmanr

MEASURES = {"MAE": "mae", "max |error|": "max_abs", "density-operator error": "density_operator_error",
            "|band-energy error|": "band_energy_error_eV"}


def joined(eval_json: str, bench_json: str) -> list[tuple[dict, int]]:
    """(evaluate's metrics, ML SCF iterations) of every run in both files, matched by the run folder's name."""
    errors = {Path(m["name"]).name: m for m in json.loads(Path(eval_json).read_text())["structures"]}
    bench = json.loads(Path(bench_json).read_text())["per_structure"]
    return [(errors[s["name"]], s["ml"]["scf_iterations"]) for s in bench if s["name"] in errors and not s["fallback"]]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="+", help="evaluate JSON, bench JSON, evaluate JSON, bench JSON, ...")
    args = parser.parse_args(argv)
    if len(args.pairs) % 2:
        parser.error("give the files in pairs: an evaluate JSON, then the bench JSON of the same runs")
    for eval_json, bench_json in zip(args.pairs[::2], args.pairs[1::2]):
        rows = joined(eval_json, bench_json)
        iterations = [n for _, n in rows]
        parts = []
        for label, key in MEASURES.items():
            values = [abs(m[key]) for m, _ in rows if key in m]
            if len(values) == len(rows) > 2 and len(set(iterations)) > 1:
                parts.append(f"{label} {spearmanr(values, iterations)[0]:+.2f}")
        print(f"{bench_json}: {len(rows)} structures, ML SCF iterations {min(iterations)}-{max(iterations)}; "
              f"rank correlation with them: " + (", ".join(parts) if parts else "- (all take the same count)"))


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
