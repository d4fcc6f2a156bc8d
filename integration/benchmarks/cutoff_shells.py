"""Where a model's message-passing cutoff and its fade-out fall among the structures' interatomic distances.

    python integration/benchmarks/cutoff_shells.py silicon ../shared/datasets/si8 unseen/si-hot
    python integration/benchmarks/cutoff_shells.py silicon ../shared/datasets/si8 --cutoff 4.35 --switch 0.2

For the structures (fdf) in each folder, prints the number of neighbours per atom (periodic images included)
by distance, in bins around the cutoff, marking the bins inside the fade-out (cutoff - switch .. cutoff),
where a message is scaled by a position-dependent factor, and those just beyond it, whose pairs a thermal
move takes across the cutoff. A cutoff that slices a neighbour shell (silicon's second shell at a/sqrt(2) =
3.84 Å against 4.0 Å) makes the model jump as atoms vibrate without a fade-out, and with one scales most of
that shell's messages. The cutoff and fade default to the model's own (``ModelConfig.mp_cutoff``,
``mp_switch``). No SIESTA is run and no prediction is made.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np


def main() -> None:
    from ase.neighborlist import neighbor_list

    from siesta_dmguess.card import load_model
    from siesta_dmguess.data import find_fdf, list_runs
    from siesta_dmguess.structure import read_structure

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a shipped model's name or a model folder (for its cutoff and fade-out)")
    p.add_argument("sets", nargs="+", type=Path, help="dataset folders (one SIESTA run per subfolder)")
    p.add_argument("--cutoff", type=float, help="message-passing cutoff in Å (default: the model's)")
    p.add_argument("--switch", type=float, help="fade-out width in Å (default: the model's)")
    p.add_argument("--window", type=float, default=0.6, help="pairs within this distance of the cutoff (Å)")
    p.add_argument("--bin", type=float, default=0.1, help="histogram bin (Å)")
    args = p.parse_args()
    warnings.filterwarnings("ignore", module="sisl")

    config = load_model(args.model).config
    cutoff = config.mp_cutoff if args.cutoff is None else args.cutoff
    switch = config.mp_switch if args.switch is None else args.switch
    edges = np.round(np.arange(cutoff - args.window, cutoff + args.window + 1e-9, args.bin), 6)
    print(f"Pairs per atom by distance (Å), cutoff {cutoff:g} Å, fade-out from {cutoff - switch:g} Å "
          "(* in the fade-out, ! beyond the cutoff):")
    print("| set | " + " | ".join(f"{a:.2f}-{b:.2f}{_mark(a, b, cutoff, switch)}" for a, b in zip(edges, edges[1:]))
          + " |")
    print("| --- " * len(edges) + "|")
    for folder in args.sets:
        counts, atoms_total = np.zeros(len(edges) - 1), 0
        for run in list_runs(folder):
            atoms = read_structure(find_fdf(run.folder)).atoms
            counts += np.histogram(neighbor_list("d", atoms, edges[-1]), bins=edges)[0]
            atoms_total += len(atoms)
        print(f"| {folder.name} | " + " | ".join(f"{c / max(atoms_total, 1):.2f}" for c in counts) + " |")


def _mark(low: float, high: float, cutoff: float, switch: float) -> str:
    """'*' for a bin inside the fade-out, '!' for one beyond the cutoff."""
    if low >= cutoff - 1e-9:
        return " !"
    return " *" if switch > 0 and high > cutoff - switch + 1e-9 else ""

if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
