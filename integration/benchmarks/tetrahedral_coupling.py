"""The on-site p–d coupling of silicon's tetrahedral sites: SIESTA's DM against a model's, atom by atom.

    python integration/benchmarks/tetrahedral_coupling.py MODEL RUN [RUN ...]

On a site of Td symmetry the only on-site p–d element allowed is the coupling of p_x with d_yz (and its two
cyclic partners), carried by the xyz octupole (l = 3) of the neighbours. This prints, for every atom of each run
(a silicon run folder with fdf + .DM, e.g. ``../shared/datasets/si8/0004``), that coupling (zeta-1 p, mean of
the three) in SIESTA's converged DM and in the model's raw prediction, with the atom's mean bond length; then
the correlation of each with the mean bond length over all atoms; then the model's prediction for perfect
diamond cells (a = 5.40, 5.43, 5.47 Å), whose sites are exactly Td. A network whose message-passing harmonics
stop at l = 2 (``lmax_sh_mp``) cannot see the octupole and predicts zero there.
"""

from __future__ import annotations

import numpy as np
from study_args import model_and_runs

# SIESTA's orbital order of a DZP silicon atom: s, s, p(y z x), p(y z x), d(xy yz z2 xz x2-y2)
TD_PAIRS = [(4, 9), (2, 11), (3, 8)]  # (p_x, d_yz), (p_y, d_xz), (p_z, d_xy) of the first p shell
BOND = 2.9  # Å: first neighbours (2.35 Å in the crystal), not second (3.84 Å)


def td_coupling(blocks: np.ndarray) -> np.ndarray:
    return np.mean([blocks[:, i, j] for i, j in TD_PAIRS], axis=0)


def main() -> None:
    from ase.build import bulk
    from ase.neighborlist import neighbor_list

    from siesta_dmguess.data import prepare_sample
    from siesta_dmguess.evaluate import onsite_blocks, predict_flat, raw_prediction_for_run
    from siesta_dmguess.structure import Structure

    loaded, runs = model_and_runs(__doc__)
    cfg = loaded.config
    reference, predicted, mean_bond = [], [], []
    print("run  atom  SIESTA  model  error  mean bond (Å)")
    for run in runs:
        structure, basis, sample, pred_flat, ref_flat = raw_prediction_for_run(loaded, run)
        n_orb = basis[structure.labels[0]].norb
        ref = td_coupling(onsite_blocks(sample, ref_flat, n_orb))
        pred = td_coupling(onsite_blocks(sample, pred_flat, n_orb))
        first, d = neighbor_list("id", structure.atoms, BOND)
        bonds = np.bincount(first, weights=d, minlength=len(ref)) / np.bincount(first, minlength=len(ref))
        for a in range(len(ref)):
            print(f"{run.name}  {a}  {ref[a]:+.4f}  {pred[a]:+.4f}  {pred[a] - ref[a]:+.4f}  {bonds[a]:.3f}")
        reference += list(ref)
        predicted += list(pred)
        mean_bond += list(bonds)
    reference, predicted, mean_bond = (np.abs(np.array(x)) for x in (reference, predicted, mean_bond))
    for name, values in (("SIESTA", reference), ("model", predicted)):
        slope = np.polyfit(mean_bond, values, 1)[0]
        print(f"|coupling| vs mean bond, {name}: correlation {np.corrcoef(values, mean_bond)[0, 1]:.3f}, "
              f"slope {slope:.4f} per Å")
    print(f"RMS error {np.sqrt(np.mean((predicted - reference) ** 2)):.2e}, "
          f"largest {np.abs(predicted - reference).max():.2e}")
    for a in (5.40, 5.43, 5.47):
        crystal = bulk("Si", "diamond", a=a, cubic=True)
        s = Structure(crystal, [structure.labels[0]] * len(crystal))
        sample = prepare_sample(s, basis, cfg.species, cfg.message_cutoff, None, fold=False)
        blocks = onsite_blocks(sample, predict_flat(loaded.model, [sample])[0], n_orb)
        print(f"perfect diamond a = {a:.2f} Å: model's coupling {np.round(td_coupling(blocks)[:2], 4)} "
              "(two sublattices)")


if __name__ == "__main__":
    main()
