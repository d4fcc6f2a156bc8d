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


def folded_dm(run: Path) -> np.ndarray:
    """The run's converged DM, folded into the cell, as a dense (no, no) array."""
    from siesta_dmguess.data import find_fdf, run_basis, system_label
    from siesta_dmguess.dm import build_geometry, read_density_matrix
    from siesta_dmguess.structure import read_structure

    fdf = find_fdf(run)
    structure = read_structure(fdf)
    geometry = build_geometry(structure, run_basis(run, set(structure.labels)))
    matrix = read_density_matrix(run / f"{system_label(fdf)}.DM", geometry).tocsr(0)
    no = matrix.shape[0]
    return sum(matrix[:, k * no:(k + 1) * no] for k in range(matrix.shape[1] // no)).toarray()


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
    main()
