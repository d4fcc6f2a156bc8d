"""Write a trajectory as an MD code that keeps atoms inside the cell would: every frame wrapped into its cell.

    python integration/benchmarks/wrap_trajectory.py water8_md.traj water8_md_wrapped.traj --through-face
    siesta-dmguess bench water8_md_wrapped.traj --fdf ../shared/datasets/water8/0004/input.fdf --model water \\
        --guesses extrapolation,ml+residual

An atom that crosses a face then jumps by a lattice vector between two frames, which the trajectory history must
follow (docs/guesses.md, "Atoms wrapped into the cell"). ``--through-face`` first translates every frame so that
the atom moving farthest along the first lattice vector sits at the origin in the middle frame, so that it does
cross a face (a translation changes the physics only through SIESTA's grid); ``--unwrapped OUT`` also writes the
translated, unwrapped frames, the fair comparison.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trajectory", type=Path, help="frames of one periodic system (any file ASE reads)")
    p.add_argument("out", type=Path, help="the wrapped frames")
    p.add_argument("--through-face", action="store_true", help="first translate the frames so an atom crosses a face")
    p.add_argument("--unwrapped", type=Path, help="also write the translated frames, unwrapped")
    args = p.parse_args()
    import ase.io

    frames = ase.io.read(args.trajectory, ":")
    if args.through_face:
        positions = np.array([atoms.positions for atoms in frames])
        moving = int(np.argmax(np.ptp(positions @ np.linalg.inv(frames[0].cell.array), axis=0)[:, 0]))
        shift = -frames[len(frames) // 2].positions[moving]
        for atoms in frames:
            atoms.translate(shift)
        print(f"atom {moving} placed at the origin in frame {len(frames) // 2}")
    if args.unwrapped:
        ase.io.write(args.unwrapped, frames)
    for atoms in frames:
        atoms.wrap()
    jumps = np.abs(np.diff([atoms.positions for atoms in frames], axis=0)).max(axis=2) > 0.5 * frames[0].cell.lengths().min()
    print(f"{args.out}: {len(frames)} frames; atoms jumping by a lattice vector (frame, atom): "
          f"{[(int(t) + 1, int(a)) for t, a in np.argwhere(jumps)]}")
    ase.io.write(args.out, frames)


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
