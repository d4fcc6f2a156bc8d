"""How well a model's on-site blocks get their rotation-invariant part, against a linear fit on bond lengths.

    python integration/benchmarks/onsite_invariants.py ../shared/datasets/si8 --model silicon

The invariant part of an on-site block is one number per pair of shells of equal l (the trace of their
sub-block over 2l + 1): for silicon's DZP, s-s (three: ζ1ζ1, ζ1ζ2, ζ2ζ2), p-p (three) and d-d. Each is a smooth
function of the atom's surroundings. This fits each, by least squares over the dataset's `train` runs, to nine
local numbers per atom (the four nearest-neighbour distances in order, the mean distance of the next twelve
within 4.6 Å, and sums of the first four's inverse squares and fourth powers) and prints, on the `val` runs, the
RMS error of that fit beside the model's raw prediction (no refinement), per invariant. Then, per `val` run,
the model's largest on-site error and what it becomes with the fitted invariants put in its place (the other
components left as the model has them). Atoms of the model's first species only.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np


def invariant_groups(basis) -> list[tuple[str, list[tuple[int, int]]]]:
    """(name, diagonal (row, column) pairs of the block) of each invariant: shells a <= b of equal l."""
    starts = np.cumsum([0] + [s.size for s in basis.shells])
    groups = []
    for a, sa in enumerate(basis.shells):
        for b, sb in enumerate(basis.shells[a:], start=a):
            if sa.l == sb.l:
                pairs = [(starts[a] + m, starts[b] + m) for m in range(2 * sa.l + 1)]
                pairs += [(j, i) for i, j in pairs if i != j]
                groups.append((f"{'spdfg'[sa.l]}{sa.zeta}{'spdfg'[sb.l]}{sb.zeta}", pairs))
    return groups


def invariants(block: np.ndarray, groups) -> np.ndarray:
    return np.array([np.mean([block[i, j] for i, j in pairs]) for _, pairs in groups])


def local_numbers(atoms) -> np.ndarray:
    from ase.neighborlist import neighbor_list

    i, d = neighbor_list("id", atoms, 4.6)
    rows = []
    for a in range(len(atoms)):
        dd = np.sort(d[i == a])
        rows.append([1.0, *dd[:4], dd[4:16].mean(), (dd[:4] ** -2).sum(), (dd[:4] ** -4).sum()])
    return np.array(rows)


def main() -> None:
    from siesta_dmguess.card import load_model
    from siesta_dmguess.evaluate import own_image_blocks, raw_prediction_for_run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", type=Path, help="a dataset folder with index.json (train and val runs)")
    p.add_argument("--model", required=True, help="a shipped model's name or a model folder")
    args = p.parse_args()
    warnings.filterwarnings("ignore", module="sisl")
    loaded = load_model(args.model)
    species = loaded.config.species[0]
    basis = loaded.basis[species]
    groups = invariant_groups(basis)
    data = {"train": [], "val": []}
    for rec in json.loads((args.dataset / "index.json").read_text()):
        if rec["split"] not in data:
            continue
        structure, _, sample, predicted, reference = raw_prediction_for_run(loaded, args.dataset / rec["id"])
        keep = np.array([label == species for label in structure.labels])
        if not keep.any():
            continue
        model_blocks = own_image_blocks(sample, predicted, basis.norb)[keep]
        ref_blocks = own_image_blocks(sample, reference, basis.norb)[keep]
        data[rec["split"]].append((rec["id"], local_numbers(structure.atoms)[keep], model_blocks, ref_blocks))
    if not data["train"] or not data["val"]:
        raise SystemExit(f"{args.dataset}: needs train and val runs with {species}")

    def stack(split, what):
        return np.vstack([np.array([invariants(b, groups) for b in run[what]]) for run in data[split]])

    x_train = np.vstack([run[1] for run in data["train"]])
    coef, *_ = np.linalg.lstsq(x_train, stack("train", 3), rcond=None)
    x_val = np.vstack([run[1] for run in data["val"]])
    ref_val, model_val = stack("val", 3), stack("val", 2)
    print(f"{args.model} on {args.dataset.name} ({species}; fit on {x_train.shape[0]} train atoms, "
          f"measured on {x_val.shape[0]} val atoms): RMS error of each on-site invariant")
    print("  invariant   spread of the reference   model (raw)   linear fit")
    for k, (name, _) in enumerate(groups):
        print(f"  {name:<10}  {ref_val[:, k].std():>22.2e}  {np.sqrt(np.mean((model_val[:, k] - ref_val[:, k]) ** 2)):>12.2e}"
              f"  {np.sqrt(np.mean((x_val @ coef[:, k] - ref_val[:, k]) ** 2)):>11.2e}")
    print("  largest on-site error per val run: the model's, and with the fitted invariants in its blocks")
    for run_id, x, model_blocks, ref_blocks in data["val"]:
        fixed = model_blocks.copy()
        shift = x @ coef - np.array([invariants(b, groups) for b in model_blocks])
        for k, (_, pairs) in enumerate(groups):
            for i, j in pairs:
                fixed[:, i, j] += shift[:, k]
        print(f"  {run_id}: {np.nanmax(np.abs(model_blocks - ref_blocks)):.2e} -> "
              f"{np.nanmax(np.abs(fixed - ref_blocks)):.2e}")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
