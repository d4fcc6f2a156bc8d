"""A model's DM error against an unfolded reference, by the distance between the two atoms of each block.

    python integration/benchmarks/error_by_distance.py MODEL RUN [RUN ...]

RUN is a run folder whose `.DM` keeps its images (a k-point run, or a crystal reference
from ``crystal_references.py``, whose pairs reach the model's ``fold_reach``), or a
molecule or cluster in a box wide enough that no two blocks fold onto one element. Prints,
per distance bin, the number of elements, the RMS of the reference elements, and the
RMS and mean of the model's raw error (no refinement): where the error is as large as
the elements themselves, the model has learned nothing there. Then the same for the
on-site blocks by angular momenta (l, l') of the orbital pair, with the largest error.
"""

from __future__ import annotations

import numpy as np
from study_args import model_and_runs

BINS = (0.0, 0.1, 3.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 12.0)  # Å; the first bin holds the on-site blocks


def main() -> None:
    from siesta_dmguess.evaluate import raw_prediction_for_run

    loaded, runs = model_and_runs(__doc__)
    for run in runs:
        structure, basis, sample, predicted, reference = raw_prediction_for_run(loaded, run)
        covered = ~np.isnan(reference)
        if sample.fold and np.unique(sample.target_index[covered]).size < covered.sum():
            # A molecule in a wide box folds one block onto each stored element: its blocks can be compared.
            raise SystemExit(f"{run}: the reference is folded (Γ-only cell) and its blocks overlap")
        reference = reference[covered]
        error = predicted[covered] - reference
        lay = sample.layout
        distance = np.linalg.norm(lay.block_vectors(structure), axis=1)[lay.element_block][covered]
        print(f"{run}: {covered.sum()} elements, {len(sample.pattern)} pairs")
        print("  distance (Å)   elements  reference RMS  error RMS  mean error")
        for lo, hi in zip(BINS[:-1], BINS[1:]):
            k = (distance >= lo) & (distance < hi)
            if k.any():
                print(f"  {lo:4.1f} – {hi:4.1f}  {k.sum():10d}  {np.sqrt(np.mean(reference[k] ** 2)):13.2e}"
                      f"  {np.sqrt(np.mean(error[k] ** 2)):9.2e}  {error[k].mean():+10.2e}")
        orbital_l = np.concatenate([basis[label].orbital_l for label in structure.labels])
        onsite = (lay.element_block < lay.n_onsite)[covered]
        l_row, l_col = orbital_l[lay.rows[covered]], orbital_l[lay.cols[covered] % lay.no]
        print("  on-site (l, l')   elements  reference RMS  error RMS  max |error|")
        for l1, l2 in sorted({(a, b) for a, b in zip(l_row[onsite], l_col[onsite]) if a <= b}):
            k = onsite & (((l_row == l1) & (l_col == l2)) | ((l_row == l2) & (l_col == l1)))
            print(f"  ({l1}, {l2})          {k.sum():10d}  {np.sqrt(np.mean(reference[k] ** 2)):13.2e}"
                  f"  {np.sqrt(np.mean(error[k] ** 2)):9.2e}  {np.abs(error[k]).max():11.2e}")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
