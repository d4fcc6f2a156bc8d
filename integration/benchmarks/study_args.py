"""The command line shared by the study scripts that set a model's raw prediction beside converged runs:
``SCRIPT MODEL RUN [RUN ...]``. Imported by those scripts (run as ``python integration/benchmarks/SCRIPT``)."""

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
