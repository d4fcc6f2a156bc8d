"""The on-site p–d coupling of silicon's tetrahedral sites: SIESTA's DM against a model's, atom by atom.

    python integration/benchmarks/tetrahedral_coupling.py MODEL RUN [RUN ...]

On a site of Td symmetry the only on-site p–d element allowed is the coupling of p_x with d_yz (and its two
cyclic partners), carried by the xyz octupole (l = 3) of the neighbours. This prints, for every atom of each run
(a silicon run folder with fdf + .DM, e.g. ``../shared/datasets/si8/0004``), that coupling (zeta-1 p, mean of
the three) in SIESTA's converged DM and in the model's raw prediction, with the atom's mean bond length; then
the correlation of each with the mean bond length over all atoms; then the model's prediction for perfect
diamond cells (a = 5.40, 5.43, 5.47 Å), whose sites are exactly Td. A network whose message-passing harmonics
stop at l = 2 (``lmax_sh_mp``) cannot see the octupole and predicts zero there.

The same octupole carries a pair element: p_z of an atom with d_xy of its own image one cubic lattice vector away
along z (and the two cyclic partners). In perfect diamond SIESTA gives -6.3e-3 / +6.3e-3 on the two sublattices
for the second p shell (a = 5.43 Å). A pair readout whose features stop at l = 2 (``pair_irreps``) cannot carry
it: for a pair along z its harmonics have no xy part. Printed second, in the same form.
"""

from __future__ import annotations

import numpy as np
from study_args import model_and_runs

# SIESTA's orbital order of a DZP silicon atom: s, s, p(y z x), p(y z x), d(xy yz z2 xz x2-y2)
TD_PAIRS = [(4, 9), (2, 11), (3, 8)]  # (p_x, d_yz), (p_y, d_xz), (p_z, d_xy) of the first p shell
# (p_x, d_yz) with the image along x, and cyclic: the second p shell, whose coupling is the larger
IMAGE_PAIRS = [((7, 9), (1, 0, 0)), ((5, 11), (0, 1, 0)), ((6, 8), (0, 0, 1))]
BOND = 2.9  # Å: first neighbours (2.35 Å in the crystal), not second (3.84 Å)


def td_coupling(blocks: np.ndarray) -> np.ndarray:
    return np.mean([blocks[:, i, j] for i, j in TD_PAIRS], axis=0)


def image_coupling(sample, flat: np.ndarray, n_orb: int) -> np.ndarray:
    """Each atom's p–d coupling with its own images one lattice vector away, mean over the three axes."""
    from siesta_dmguess.evaluate import own_image_blocks

    return np.mean([own_image_blocks(sample, flat, n_orb, shift)[:, i, j] for (i, j), shift in IMAGE_PAIRS], axis=0)


def report(name: str, reference: list, predicted: list) -> None:
    reference, predicted = np.array(reference), np.array(predicted)
    print(f"{name}: RMS error {np.sqrt(np.mean((predicted - reference) ** 2)):.2e}, "
          f"largest {np.abs(predicted - reference).max():.2e}, correlation {np.corrcoef(reference, predicted)[0, 1]:.3f}")


def main() -> None:
    from ase.build import bulk
    from ase.neighborlist import neighbor_list

    from siesta_dmguess.data import prepare_sample
    from siesta_dmguess.evaluate import own_image_blocks, predict_flat, raw_prediction_for_run
    from siesta_dmguess.structure import Structure

    loaded, runs = model_and_runs(__doc__)
    cfg = loaded.config
    reference, predicted, mean_bond, image_ref, image_pred = [], [], [], [], []
    print("run  atom  SIESTA  model  error  mean bond (Å)  |  image coupling: SIESTA  model")
    for run in runs:
        structure, basis, sample, pred_flat, ref_flat = raw_prediction_for_run(loaded, run)
        n_orb = basis[structure.labels[0]].norb
        ref = td_coupling(own_image_blocks(sample, ref_flat, n_orb))
        pred = td_coupling(own_image_blocks(sample, pred_flat, n_orb))
        first, d = neighbor_list("id", structure.atoms, BOND)
        bonds = np.bincount(first, weights=d, minlength=len(ref)) / np.bincount(first, minlength=len(ref))
        img_ref, img_pred = image_coupling(sample, ref_flat, n_orb), image_coupling(sample, pred_flat, n_orb)
        for a in range(len(ref)):
            print(f"{run.name}  {a}  {ref[a]:+.4f}  {pred[a]:+.4f}  {pred[a] - ref[a]:+.4f}  {bonds[a]:.3f}  |  "
                  f"{img_ref[a]:+.4f}  {img_pred[a]:+.4f}")
        image_ref += list(img_ref)
        image_pred += list(img_pred)
        reference += list(ref)
        predicted += list(pred)
        mean_bond += list(bonds)
    reference, predicted, mean_bond = (np.abs(np.array(x)) for x in (reference, predicted, mean_bond))
    for name, values in (("SIESTA", reference), ("model", predicted)):
        slope = np.polyfit(mean_bond, values, 1)[0]
        print(f"|coupling| vs mean bond, {name}: correlation {np.corrcoef(values, mean_bond)[0, 1]:.3f}, "
              f"slope {slope:.4f} per Å")
    report("on-site coupling", reference, predicted)
    report("image coupling", image_ref, image_pred)
    for a in (5.40, 5.43, 5.47):
        crystal = bulk("Si", "diamond", a=a, cubic=True)
        s = Structure(crystal, [structure.labels[0]] * len(crystal))
        sample = prepare_sample(s, basis, cfg.species, cfg.message_cutoff, None, fold=False)
        flat = predict_flat(loaded.model, [sample])[0]
        print(f"perfect diamond a = {a:.2f} Å, model (two sublattices): on-site coupling "
              f"{np.round(td_coupling(own_image_blocks(sample, flat, n_orb))[:2], 4)}, image coupling "
              f"{np.round(image_coupling(sample, flat, n_orb)[:2], 4)}")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
