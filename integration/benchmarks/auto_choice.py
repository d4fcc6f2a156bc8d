"""Which shipped model ``--model auto`` gives each run, where several cover its species, and what choosing costs.

    python integration/benchmarks/auto_choice.py ../shared/datasets/g2 ../shared/datasets/h2o unseen/h2o-stretched

For every run folder (``*/input.fdf``) that more than one shipped model covers, prints its novelty score under
each of them in multiples of that model's flag level (with the kind of refusal where that model's prediction would
not be used: ``Prediction.refusal_kind``), and the model ``predict.choose_model`` picks (marked where it is not the
most specialized one). Then the mean time of the choice against that of the chosen model's
prediction, both after a warm-up (one thread unless ``--threads``). No SIESTA runs.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="dataset folders of run folders")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    logging.disable(logging.WARNING)  # novel structures are the point here; their warnings are not news

    import torch

    from siesta_dmguess.guard import shipped_models_covering
    from siesta_dmguess.predict import _shipped_model, choose_model, predict_density_matrix
    from siesta_dmguess.structure import read_structure

    torch.set_num_threads(args.threads)
    choose_s, predict_s = [], []
    for folder in args.folders:
        for fdf in sorted(folder.glob("*/input.fdf")):
            structure = read_structure(fdf)
            covering = shipped_models_covering(structure)
            if len(covering) < 2:
                continue
            relative = {}
            for name in covering:
                pred = predict_density_matrix(structure, _shipped_model(name))
                ratio = pred.novelty / pred.novelty_threshold if pred.novelty_threshold else 0.0
                relative[name] = f"{ratio:.2f}x" + (f" ({pred.refusal_kind})" if pred.refusal_kind else "")
            chosen = choose_model(structure)  # warm: the timed calls below measure the work, not the loading
            loaded = _shipped_model(chosen)
            predict_density_matrix(structure, loaded)
            start = time.perf_counter()
            choose_model(structure)
            choose_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            predict_density_matrix(structure, loaded)
            predict_s.append(time.perf_counter() - start)
            mark = "  <- not the most specialized" if chosen != covering[0] else ""
            print(f"{folder.name}/{fdf.parent.name} {len(structure.labels):4d} atoms  "
                  f"{'  '.join(f'{n} {r}' for n, r in relative.items())}  ->  {chosen}{mark}")
    if choose_s:
        print(f"{len(choose_s)} runs: choosing {sum(choose_s) / len(choose_s):.3f} s on average, predicting with the "
              f"chosen model {sum(predict_s) / len(predict_s):.3f} s ({args.threads} thread(s))")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
