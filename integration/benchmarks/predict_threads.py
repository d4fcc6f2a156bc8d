"""Prediction time vs torch threads, on an idle machine and with other programs keeping cores busy.

Several SIESTA runs at once (screening, or a benchmark beside other work) keep cores busy. torch uses one
thread per core by default, and its threads then wait on each other. This times ``predict_density_matrix``
on the structures of a dataset folder for each thread count, first alone, then with ``--busy`` processes
spinning on the CPU (stand-ins for SIESTA runs), and prints the median time per structure (and the time
the model took to load):

    python integration/benchmarks/predict_threads.py ../shared/datasets/water8 --model water --threads 1 2 --busy 1

The remedy, ``--threads 1`` (``predict``, ``evaluate``, ``bench``) or ``threads=1`` (the ASE calculator), is
:func:`siesta_dmguess.predict.torch_threads`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from pathlib import Path


def spin(stop) -> None:
    """Keep one core busy until ``stop`` is set."""
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def median_prediction_time(fdfs, model, threads: int) -> float:
    from siesta_dmguess.predict import predict_density_matrix, torch_threads

    with torch_threads(threads):
        predict_density_matrix(fdfs[0], model)  # the one-off set-up (overlap tables, torch's first calls)
        times = []
        for fdf in fdfs[1:]:
            t0 = time.perf_counter()
            predict_density_matrix(fdf, model)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", type=Path, help="dataset folder of SIESTA runs (fdf per run)")
    p.add_argument("--model", default="water")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--busy", type=int, default=1, help="processes spinning on the CPU in the second round")
    p.add_argument("--structures", type=int, default=6, help="structures timed (the first one warms up)")
    args = p.parse_args()

    from siesta_dmguess.card import load_model
    from siesta_dmguess.data import find_fdf, list_runs

    fdfs = [find_fdf(r.folder) for r in list_runs(args.data_dir)][: args.structures]
    t0 = time.perf_counter()
    model = load_model(args.model)
    print(f"loading {args.model} took {time.perf_counter() - t0:.2f} s (once per predict, bench or calculator)")
    print(f"{args.data_dir.name} with {args.model}: median prediction time per structure (s), "
          f"{len(fdfs) - 1} structures, {multiprocessing.cpu_count()} cores")
    print("| torch threads | idle machine | " + f"{args.busy} core(s) kept busy |")
    print("| --- | --- | --- |")
    for threads in args.threads:
        idle = median_prediction_time(fdfs, model, threads)
        stop = multiprocessing.Event()
        spinners = [multiprocessing.Process(target=spin, args=(stop,)) for _ in range(args.busy)]
        for s in spinners:
            s.start()
        try:
            busy = median_prediction_time(fdfs, model, threads)
        finally:
            stop.set()
            for s in spinners:
                s.join()
        print(f"| {threads} | {idle:.3f} | {busy:.3f} |")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
