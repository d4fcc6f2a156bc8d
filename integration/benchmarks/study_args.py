"""The command line shared by the scripts of this folder (run as ``python integration/benchmarks/SCRIPT``):
:func:`run_script`, which every script's ``main`` runs through, and ``SCRIPT MODEL RUN [RUN ...]`` of the study
scripts that set a model's raw prediction beside converged runs."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path


def model_and_runs(doc: str):
    """Parse ``MODEL RUN...`` (``doc``'s first line is the help text); return the loaded model and the run folders."""
    from siesta_dmguess.card import load_model

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("model", help="a shipped model's name or a model folder")
    p.add_argument("runs", nargs="+", type=Path, help="SIESTA run folders (fdf + converged .DM)")
    args = p.parse_args()
    warnings.filterwarnings("ignore", module="sisl")
    return load_model(args.model), args.runs


def run_script(main) -> None:
    """Run a script's ``main()``: a wrong input (a missing or unreadable file, a folder where a file is expected, a
    run the package refuses, no SIESTA) ends in one line naming it, as ``siesta-dmguess`` says it, not in a
    traceback."""
    import sys

    from siesta_dmguess.errors import DMGuessError

    try:
        main()
    except (DMGuessError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {exc}")  # (any other error keeps its traceback: a bug)


def child_output(command: list[str]) -> str:
    """The standard output of a child process (a script timing itself in a fresh interpreter); where it fails, its
    own last error line, not a CalledProcessError that hides it."""
    import subprocess
    import sys

    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:  # its own last lines (a traceback's location included), then the command
        tail = "\n".join(done.stderr.strip().splitlines()[-20:]) or "(it printed no error)"
        sys.exit(f"{tail}\n{Path(sys.argv[0]).name}: error: the child run failed (exit status {done.returncode}): "
                 f"{' '.join(command)}")
    return done.stdout


def dataset_bench_report(path) -> dict:
    """A ``bench_NAME.json`` of a dataset folder (``siesta-dmguess bench DATA_DIR``); one line naming the file
    where it is no JSON or a trajectory's report (which has frames, not structures)."""
    import json
    import sys

    try:
        report = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {path}: not JSON ({exc}): give the bench_NAME.json files")
    if "per_structure" not in report:
        sys.exit(f"{Path(sys.argv[0]).name}: error: {path}: not the report of a dataset folder's benchmark "
                 f"({'a trajectory' if 'per_frame' in report else 'no per_structure results'})")
    return report
