"""How much SIESTA's converged DM of the same atoms differs between two runs (e.g. one molecule in two box sizes).

    python integration/benchmarks/dm_difference.py RUN_A RUN_B

Each RUN is a converged run folder (fdf + ``<SystemLabel>.DM``; the basis in the folder or in ``../basis``), the
same atoms in the same order. Both DMs are folded into the cell (image columns summed) and compared over the
elements the first one stores: mean and max |ΔD|. A model that sees no difference between the two structures
(e.g. no periodic image within its message range) cannot be closer than this to both.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from gamma_vs_kpoints import fold  # same folder: sum image columns into the cell


def folded_dm(run: Path) -> np.ndarray:
    """The run's converged DM, folded into the cell, as a dense (no, no) array."""
    from siesta_dmguess.data import load_run

    dm = load_run(run)[2]
    if dm is None:
        raise SystemExit(f"{run}: no converged .DM")
    return fold(dm.tocsr(0), dm.no)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    args = p.parse_args()
    a, b = folded_dm(args.run_a), folded_dm(args.run_b)
    if a.shape != b.shape:
        raise SystemExit(f"the runs have {a.shape[0]} and {b.shape[0]} orbitals: not the same atoms")
    stored = a != 0
    diff = np.abs(a - b)
    print(f"{args.run_a} vs {args.run_b}: mean |ΔD| {diff[stored].mean():.2e} over {stored.sum()} stored elements, "
          f"max {diff.max():.2e}")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
