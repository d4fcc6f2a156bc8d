"""Why k-point DMs are only charge-scaled: the idempotent projection, done at every k-point, on real runs.

A Γ-only or molecular DM is projected onto the nearest idempotent DM before it is
written (``siesta_dmguess.refine``). For a run with k-points the same projection
can be done at each k-point of its Monkhorst-Pack grid: D(k) = Σ_R D(R) e^(ik·R),
keep the N/2 most occupied natural orbitals of D(k) with S(k), and go back with
SIESTA's own k-sum D(R) = Σ_k w_k Re[D(k) e^(-ik·R)] onto the stored images.

This script does that to SIESTA's own converged DM and to a model's
(charge-scaled) prediction, over the validation runs of a dataset, and prints:

* the smallest HOMO-LUMO gap of the natural occupations over the k-points
  (1 for a DM that is exactly idempotent at every k-point);
* how far the projection moves SIESTA's converged DM (0 if it were idempotent);
* the model's DM MAE against SIESTA's before and after the projection.

SIESTA stores the DM only within orbital range, so the Bloch sum of the stored
elements is not idempotent, and the projection moves even the exact answer:

    python integration/benchmarks/kpoint_projection.py ../shared/datasets/si8 --model silicon
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp


def kpoints_of(fdf: Path, lattice):
    """(k, weights) of the run's diagonal kgrid_Monkhorst_Pack block; SIESTA's k = (m + d)/n is sisl's
    Γ-centred grid shifted by d/n."""
    import sisl

    from siesta_dmguess.fdf import read_monkhorst_pack

    sizes, displacements = read_monkhorst_pack(fdf) or ([1, 1, 1], [0.0, 0.0, 0.0])
    n, d = np.array(sizes), np.array(displacements)
    mp = sisl.MonkhorstPack(lattice, n, displacement=d / n, centered=True, trs=True)
    return np.asarray(mp.k), np.asarray(mp.weight)


def project(layout, values, overlap, phases, weights, n_occupied):
    """Per-k idempotent projection of flat per-image values; returns (projected flat values, smallest gap)."""
    from siesta_dmguess.refine import nearest_idempotent

    rows, cols = layout.rows, layout.cols % layout.no
    out, gaps = np.zeros(layout.size), []
    for w, phase in zip(weights, phases):
        dk, sk = (sp.coo_matrix((m * phase, (rows, cols)), shape=(layout.no,) * 2).toarray() for m in (values, overlap))
        pk, gap = nearest_idempotent(dk, sk, n_occupied)
        out += w * np.real(pk[rows, cols] * np.conj(phase))
        gaps.append(gap)
    return out, min(gaps)


def main() -> None:
    import sisl

    from siesta_dmguess.card import load_model
    from siesta_dmguess.data import find_fdf, load_samples
    from siesta_dmguess.overlap import electron_count
    from siesta_dmguess.predict import predict_flat

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", type=Path)
    p.add_argument("--model", default="silicon")
    p.add_argument("--split", default="val")
    args = p.parse_args()
    warnings.filterwarnings("ignore", module="sisl")

    loaded = load_model(args.model)
    cfg = loaded.config
    samples = load_samples([args.data_dir], cfg.species, loaded.basis, cfg.message_cutoff, split=args.split)
    raw = predict_flat(loaded.model, samples, dtype=next(loaded.model.parameters()).dtype)
    print(f"{'run':<40} {'k-points':>8} {'gap (SIESTA)':>13} {'moved (SIESTA)':>15} {'gap (model)':>12}"
          f" {'MAE charge-scaled':>18} {'MAE projected':>14}")
    for sample, flat in zip(samples, raw):
        layout = sample.layout
        if sample.fold:  # Γ-only and molecular DMs: `siesta-dmguess evaluate --refine idempotent` measures these
            print(f"{sample.name:<40} Γ-only run: skipped")
            continue
        stored = sample.target_index >= 0
        reference = np.where(stored, sample.target_values[np.maximum(sample.target_index, 0)], 0.0)
        lattice = sisl.Lattice(np.asarray(sample.structure.atoms.cell), nsc=[int(n) for n in layout.nsc])
        k, weights = kpoints_of(find_fdf(Path(sample.name)), lattice)
        phases = np.exp(2j * np.pi * (k @ np.asarray(lattice.sc_off, float)[layout.cols // layout.no].T))
        overlap = loaded.overlap.flat(sample.structure, layout)
        n_electrons = float(layout.atomic.sum())
        scaled = flat * n_electrons / electron_count(layout, flat, overlap, sample.fold)
        ref_projected, ref_gap = project(layout, reference, overlap, phases, weights, round(n_electrons / 2))
        ml_projected, ml_gap = project(layout, scaled, overlap, phases, weights, round(n_electrons / 2))

        def mae(values):
            return np.abs(values - reference)[stored].mean()

        print(f"{sample.name:<40} {len(k):>8} {ref_gap:>13.2f} {mae(ref_projected):>15.2e} {ml_gap:>12.2f}"
              f" {mae(scaled):>18.2e} {mae(ml_projected):>14.2e}")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
