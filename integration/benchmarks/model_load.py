"""Model load time against prediction time, with and without e3nn's einsum optimization.

e3nn can optimize the einsums of each tensor product as it builds it (``load_model(optimize=True)``). That
costs time once, when the model is loaded, and saves a little on every prediction. This measures both, each
setting in a fresh Python process (so imports and e3nn's code generation are not shared), and prints the
number of predictions from which the optimization pays for itself, and how long one ``siesta-dmguess
predict`` of a single structure takes from the shell:

    python integration/benchmarks/model_load.py ../shared/datasets/water8 --model water

``predict`` turns the optimization off for fewer than ``cli.OPTIMIZE_FROM_STRUCTURES`` structures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from study_args import child_output


def one_setting(data_dir: Path, model: str, optimize: bool, structures: int) -> dict:
    t0 = time.perf_counter()
    from siesta_dmguess.card import load_model
    from siesta_dmguess.data import find_fdf, list_runs
    from siesta_dmguess.predict import predict_density_matrix
    from siesta_dmguess.structure import read_structure

    imports = time.perf_counter() - t0
    fdfs = [find_fdf(r.folder) for r in list_runs(data_dir)][:structures]
    t0 = time.perf_counter()
    loaded = load_model(model, optimize=optimize)
    load = time.perf_counter() - t0
    times = []
    for fdf in fdfs:
        structure = read_structure(fdf)  # sisl's import falls in the first one
        t0 = time.perf_counter()
        predict_density_matrix(structure, loaded)
        times.append(time.perf_counter() - t0)
    return {"imports_s": imports, "load_s": load, "first_s": times[0], "median_s": statistics.median(times[1:])}


def cli_seconds(fdf: Path, model: str) -> float:
    """Wall time of ``siesta-dmguess predict FDF`` in a new process: what a shell script pays per structure."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        child_output([sys.executable, "-m", "siesta_dmguess.cli", "predict", str(fdf), "--model", model,
                      "-o", str(Path(tmp) / "out.DM")])
        return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", type=Path, help="dataset folder of SIESTA runs (fdf per run)")
    p.add_argument("--model", default="water")
    p.add_argument("--structures", type=int, default=8, help="structures predicted (the first one warms up)")
    p.add_argument("--one", choices=["optimized", "plain"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one_setting(args.data_dir, args.model, args.one == "optimized", args.structures)))
        return

    rows = {}
    for setting in ("optimized", "plain"):
        command = [sys.executable, __file__, str(args.data_dir), "--model", args.model,
                   "--structures", str(args.structures), "--one", setting]
        rows[setting] = json.loads(child_output(command).strip().splitlines()[-1])
    print(f"{args.data_dir.name} with {args.model} (seconds; median over {args.structures - 1} predictions "
          "after the first)")
    print("| e3nn einsum optimization | imports | model load | first prediction | each further prediction |")
    print("| --- | --- | --- | --- | --- |")
    for setting, r in rows.items():
        print(f"| {setting} | {r['imports_s']:.2f} | {r['load_s']:.2f} | {r['first_s']:.2f} | {r['median_s']:.3f} |")
    saved_per_prediction = rows["plain"]["median_s"] - rows["optimized"]["median_s"]
    extra_load = rows["optimized"]["load_s"] - rows["plain"]["load_s"]
    if saved_per_prediction > 0:
        print(f"the optimization pays for its {extra_load:.2f} s of load time after "
              f"{extra_load / saved_per_prediction:.0f} predictions")
    else:
        print(f"the optimization costs {extra_load:.2f} s of load time and saves nothing per prediction")
    from siesta_dmguess.data import find_fdf, list_runs

    fdf = find_fdf(list_runs(args.data_dir)[0].folder)
    print(f"`siesta-dmguess predict` of one structure ({fdf.parent.name}) from the shell: "
          f"{cli_seconds(fdf, args.model):.2f} s")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
