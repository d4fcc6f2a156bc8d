"""Which structures does the guard of ``predict`` refuse? Counts ``Prediction.refusal_kind`` (used, far,
k-sampling, mixed) for every run folder of each dataset or unseen set, with the model the README benchmarks it
with (``unseen_structures.py`` writes the sets):

    python integration/benchmarks/guard_refusals.py ../shared/datasets unseen

No SIESTA needed. A change to the guard should change only the rows it means to.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from collections import Counter
from pathlib import Path

CHNO_SETS = ("g2", "chno", "rotations")  # sets named so use `chno-molecules`; si* `silicon`; the rest `water`


def model_for(set_name: str) -> str:
    if set_name.startswith(CHNO_SETS):
        return "chno-molecules"
    return "silicon" if set_name.startswith("si") else "water"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("roots", nargs="+", type=Path, help="folders of sets (../shared/datasets, unseen)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # every novel structure would log its warning
    from siesta_dmguess.card import load_model
    from siesta_dmguess.data import find_fdf
    from siesta_dmguess.predict import predict_density_matrix

    models = {}
    print("| set | model | structures | refused (kind: count) |")
    print("| --- | --- | --- | --- |")
    for root in args.roots:
        for folder in sorted(f for f in root.iterdir() if f.is_dir() and any(f.glob("[0-9]*/*.fdf"))):
            name = model_for(folder.name)
            model = models.setdefault(name, load_model(name))
            kinds = Counter(predict_density_matrix(find_fdf(run), model).refusal_kind
                            for run in sorted(folder.glob("[0-9]*")) if run.is_dir())
            refused = ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items()) if k)
            print(f"| {folder.name} | {name} | {sum(kinds.values())} | {refused} |", flush=True)


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
