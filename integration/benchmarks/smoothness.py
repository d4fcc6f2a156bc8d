"""Is the predicted DM a continuous function of the positions? Jumps of the prediction along a trajectory.

Between each pair of consecutive frames the positions are interpolated in ``--substeps`` equal steps and the DM
predicted at each. For a continuous model the largest change over one sub-step shrinks with the sub-step; a
jump (a neighbour crossing the message-passing cutoff with a finite message) does not. Prints, per frame pair,
the largest element change over one sub-step and over the whole frame step, and at the end the largest
sub-step change over the trajectory, for the model's own setting and for each ``--switch`` width (Å) of the
smooth fade-out of messages before ``mp_cutoff`` (``ModelConfig.mp_switch``):

    python integration/benchmarks/smoothness.py si8_md.traj ../shared/datasets/si8/0004/input.fdf \\
        --model silicon --switch 0 0.1 0.25

The ``ml+residual`` guess (``docs/guesses.md``) extrapolates the model's own error from the previous
steps with coefficients of sum |c| ~ 7, so every jump of the prediction lands in its guess amplified. No
SIESTA is run.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np


def set_switch(model, width: float) -> None:
    """The same weights with another fade-out width: every network of the model (residual stages too)."""
    model.config.mp_switch = width
    for stage in getattr(model, "residuals", []):
        stage.config.mp_switch = width


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trajectory", help="any trajectory file ASE reads")
    p.add_argument("fdf", help="the fdf whose settings the frames are run with (k-points, species labels)")
    p.add_argument("--model", default="silicon")
    p.add_argument("--switch", type=float, nargs="*", default=[], help="fade-out widths to try besides the model's")
    p.add_argument("--substeps", type=int, default=10)
    p.add_argument("--frames", type=int, default=0, help="at most this many frames (0: all)")
    args = p.parse_args()
    warnings.filterwarnings("ignore", module="sisl")

    import ase.io
    import torch

    from siesta_dmguess.card import load_model
    from siesta_dmguess.dm import to_image_keyed
    from siesta_dmguess.history import pattern_of
    from siesta_dmguess.predict import predict_density_matrix
    from siesta_dmguess.structure import FdfFrames

    torch.set_num_threads(1)
    loaded = load_model(args.model)
    frames_in_fdf = FdfFrames(args.fdf)
    images = ase.io.read(args.trajectory, index=":")
    if args.frames:
        images = images[: args.frames]
    own = float(loaded.config.mp_switch)

    def prediction(atoms):
        structure = frames_in_fdf.structure(atoms)
        # Image-keyed: sisl's supercell (and with it the order of the flat values) may change between frames.
        return to_image_keyed(predict_density_matrix(structure, loaded, refine="none").density_matrix)

    for width in [own] + [w for w in args.switch if w != own]:
        set_switch(loaded.model, width)
        label = f"mp_switch {width:g} Å" + (" (the model's own)" if width == own else "")
        print(f"\n{label}: largest element change of the raw prediction")
        print("| frames | over one sub-step | over the frame step / substeps |")
        print("| --- | --- | --- |")
        worst = 0.0
        for t in range(len(images) - 1):
            a, b = images[t], images[t + 1]
            values = []
            for s in np.linspace(0.0, 1.0, args.substeps + 1):
                atoms = a.copy()
                atoms.positions = (1 - s) * a.positions + s * b.positions
                values.append(prediction(atoms))
            common = pattern_of(values[0])
            for v in values[1:]:
                common = common.multiply(pattern_of(v))
            changes = int((pattern_of(values[-1]) != pattern_of(values[0])).nnz)
            note = f" ({changes} elements enter or leave SIESTA's pattern; compared on the rest)" if changes else ""
            kept = [v.multiply(common).tocsr() for v in values]
            sub = max(float(abs(kept[k + 1] - kept[k]).max()) for k in range(args.substeps))
            whole = float(abs(kept[-1] - kept[0]).max()) / args.substeps
            worst = max(worst, sub)
            print(f"| {t}-{t + 1} | {sub:.1e} | {whole:.1e}{note} |")
        print(f"largest change over one sub-step: {worst:.2e}")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
