"""Write a bond-breaking scan as a trajectory: one atom pulled away from another along their bond.

    python integration/benchmarks/bond_scan.py ../shared/datasets/g2/0077/input.fdf O H --to 2.5 --frames 11 \\
        --out ch3oh_oh_scan.traj
    siesta-dmguess bench ch3oh_oh_scan.traj --fdf ../shared/datasets/g2/0077/input.fdf --model chno-molecules

The first atom of element A and the atom of element B nearest to it; frame k puts B at A + f_k (B - A), f from 1
to ``--to`` in ``--frames`` equal steps. A dissociation along which the model's guess stops being usable
(``Prediction.mixed_reason``) and the trajectory guesses must carry on from their history.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fdf", type=Path, help="the run whose structure is scanned (its settings are bench's --fdf)")
    p.add_argument("fixed", help="element of the atom that stays")
    p.add_argument("moved", help="element of the atom pulled away (the one nearest the fixed atom)")
    p.add_argument("--to", type=float, default=2.5, help="last bond length as a multiple of the first")
    p.add_argument("--frames", type=int, default=11)
    p.add_argument("--out", type=Path, default=Path("bond_scan.traj"))
    args = p.parse_args()
    if args.frames < 2:
        p.error("--frames must be at least 2 (the first frame is the unstretched bond)")
    if args.out.exists():
        p.error(f"{args.out} exists already: give another --out, or remove it")
    import ase.io

    from siesta_dmguess.structure import read_structure

    base = read_structure(args.fdf).atoms
    symbols = base.get_chemical_symbols()
    if args.fixed not in symbols or args.moved not in symbols:
        raise SystemExit(f"{args.fdf} has no {args.fixed} or no {args.moved} atom")
    a = symbols.index(args.fixed)
    distances = base.get_distances(a, range(len(base)))
    partners = [i for i, s in enumerate(symbols) if s == args.moved and i != a]
    if not partners:
        raise SystemExit(f"{args.fdf} has no other {args.moved} atom than the fixed one")
    b = min(partners, key=lambda i: distances[i])
    bond = base.positions[b] - base.positions[a]
    frames = []
    for f in np.linspace(1.0, args.to, args.frames):
        atoms = base.copy()
        atoms.positions[b] = atoms.positions[a] + f * bond
        frames.append(atoms)
    args.out.parent.mkdir(parents=True, exist_ok=True)  # ase.io.write does not make the folder
    ase.io.write(args.out, frames)
    print(f"wrote {args.out}: atoms {a + 1} ({args.fixed}) and {b + 1} ({args.moved}), counted from 1 as SIESTA does, from {np.linalg.norm(bond):.3f} Å to "
          f"{args.to * np.linalg.norm(bond):.3f} Å in {args.frames} frames")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
