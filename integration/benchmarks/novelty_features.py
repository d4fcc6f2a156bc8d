"""Which atom invariants would make the novelty score single out a kind of structure? Four choices compared.

    python integration/benchmarks/novelty_features.py MODEL --train DIR [DIR ...] --test DIR [DIR ...]

The shipped score (``DensityMatrixModel.novelty``) is the Mahalanobis distance of an atom's scalar features after
the last interaction from the training atoms of its species, divided by its flag level (the 99.5 % quantile over
training atoms). This refits that statistic, on the training folders given (their ``train`` split where
index.json records one, else every run), for four feature sets: the last layer's scalars (the shipped choice),
every layer's scalars side by side, the last layer's invariants (scalars plus the norm of each l > 0 channel),
and the first layer's scalars alone. For each test folder (a dataset, or a folder of run folders such as
``unseen/SET``, every run; a dataset with a ``val`` split: that split) it prints the smallest and largest
per-structure score over the flag level. A feature set is useful as a guard where the kinds a model cannot
predict score far above the kinds it can.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def invariants(h, irreps):
    """Scalars as they are, and the norm of each channel of every other irrep: what rotation leaves unchanged."""
    import torch

    parts = []
    for sl, (mul, ir) in zip(irreps.slices(), irreps):
        block = h[:, sl].reshape(h.shape[0], mul, ir.dim)
        parts.append(block[:, :, 0] if ir.l == 0 and ir.p == 1 else block.norm(dim=2))
    return torch.cat(parts, 1)


def feature_sets(model, samples) -> list[dict]:
    """Per structure: {feature set name: (atoms, features)} from the model's first network."""
    import torch
    from e3nn import o3

    from siesta_dmguess.evaluate import atom_batches
    from siesta_dmguess.model import collate

    stages = len(model.layers) + (1 if model.density is not None else 0)
    s = model.num_scalars
    out = []
    with torch.no_grad():
        for batch_samples in atom_batches(samples, 256, shuffle=False):
            batch = collate(batch_samples, len(model.species), torch.float32, with_targets=False)
            layers = [model.node_features(batch, raw_stage=k) for k in range(stages)]
            last = model.node_features(batch)
            sets = {"last layer scalars (shipped)": last[:, :s],
                    "every layer's scalars": torch.cat([h[:, :s] for h in layers[:-1]] + [last[:, :s]], 1),
                    "last layer invariants": invariants(last, o3.Irreps(model.layers[-1].irreps_out)),
                    "first layer scalars": layers[0][:, :s]}
            first = 0
            for sample in batch_samples:
                n = sample.species.size
                out.append({k: v[first:first + n].double() for k, v in sets.items()})
                first += n
    return out


def fit(features: list):
    """Per-atom score function and flag level, fitted as the shipped score is (one species)."""
    import torch

    from siesta_dmguess.model import shrunk_gaussian

    x = torch.cat(features)
    mean, precision = shrunk_gaussian(x)

    def score(f):
        d = f - mean
        return torch.einsum("ni,ij,nj->n", d, precision, d) / x.shape[1]

    return score, float(torch.quantile(score(x), 0.995))


def main() -> None:
    import warnings

    from siesta_dmguess.card import load_model
    from siesta_dmguess.data import list_runs, load_samples

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--train", nargs="+", required=True, help="the model's training data folders")
    p.add_argument("--test", nargs="+", required=True, help="dataset folders or folders of run folders")
    args = p.parse_args()
    warnings.filterwarnings("ignore", module="sisl")
    loaded = load_model(args.model)
    cfg = loaded.config
    if len(cfg.species) != 1:
        raise SystemExit("this study fits one species; the model has " + ", ".join(cfg.species))

    def samples(folder, train: bool):
        splits = {r.split for r in list_runs(folder)}
        split = ("train" if "train" in splits else None) if train else ("val" if "val" in splits else None)
        return load_samples([folder], cfg.species, loaded.basis, cfg.message_cutoff, split=split, progress=False,
                            fold_reach=cfg.fold_reach)

    def run_folders(folder):
        """A dataset folder, or a folder of run folders each holding an ``atomic`` run (``bench --out``)."""
        folder = Path(folder)
        nested = sorted(folder.glob("*/atomic"))
        return nested or [folder]

    training = [f for d in args.train for f in feature_sets(loaded.model, samples(d, True))]
    fits = {name: fit([f[name] for f in training]) for name in training[0]}
    print(f"{len(training)} training structures; flag levels: "
          + ", ".join(f"{name} {level:.2f}" for name, (_, level) in fits.items()))
    print("test set".ljust(24) + "".join(name.rjust(32) for name in fits))
    for folder in args.test:
        tests = [f for d in run_folders(folder) for f in feature_sets(loaded.model, samples(d, False))]
        cells = []
        for name, (score, level) in fits.items():
            ratio = np.array([float(score(f[name]).max()) / level for f in tests])
            cells.append(f"{ratio.min():.1f}–{ratio.max():.1f}×")
        print(Path(folder).name.ljust(24) + "".join(c.rjust(32) for c in cells))


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
