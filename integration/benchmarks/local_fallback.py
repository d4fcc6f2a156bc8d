"""A study, not adopted: the ML guess with SIESTA's atomic guess in place of the blocks of novel atoms.

A structure the model flags as novel is usually novel in a few atoms (a stretched bond, a defect). This
replaces every DM block that touches an atom whose own novelty score exceeds FACTOR times the model's flag
level by SIESTA's atomic guess (q0 on the on-site diagonal, zero pairs), refines the result as ``predict``
does, and runs ``siesta-dmguess bench`` on it:

    SIESTA_COMMAND=... python integration/benchmarks/local_fallback.py 2 unseen/water8-stretched water out

Compare with ``siesta-dmguess bench unseen/water8-stretched --model water --split all``. Measured
(``docs/studies.md``, "Bonds breaking"): it cost iterations on most sets, so ``predict`` does not do it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("factor", type=float, help="replace atoms scoring above FACTOR x the model's flag level")
    p.add_argument("data_dir", help="dataset folder of run folders (as for siesta-dmguess bench)")
    p.add_argument("model")
    p.add_argument("out")
    args = p.parse_args()

    import siesta_dmguess.predict as predict
    from siesta_dmguess.bench import run_benchmark
    from siesta_dmguess.model import collate

    network_output = predict.predict_flat

    def with_atomic_blocks(model, samples, dtype=torch.float32, **kw):
        values = network_output(model, samples, dtype=dtype, **kw)
        out = []
        for sample, flat in zip(samples, values):
            scores = model.novelty(collate([sample], len(model.species), dtype, with_targets=False)).double().numpy()
            novel = scores > args.factor * float(model.novelty_threshold)
            lay = sample.layout
            block = lay.element_block
            touched = novel[lay.block_i[block]] | novel[lay.block_j[block]]
            if novel.any():
                print(f"{sample.name}: {novel.sum()} of {novel.size} atoms novel, {touched.mean():.1%} of the "
                      "elements set to the atomic guess", flush=True)
            out.append(np.where(touched, lay.atomic, flat))
        return out

    predict.predict_flat = with_atomic_blocks  # what predict_density_matrix calls for the network's output
    run_benchmark(args.data_dir, model=args.model, out_dir=args.out, split="all")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
