"""Learn SIESTA's H instead of the DM, and take the DM from diagonalizing it at Γ: does that help the boxes?

    SIESTA_COMMAND=/path/to/siesta python integration/benchmarks/h_model.py ../shared/datasets/water8 OUT

The Γ-only DM of a small periodic box is the crystal's DM summed over every image, far beyond SIESTA's
pattern (`folding_reach.py`); H is short-ranged, so its Γ fold is exactly the sum over the pattern's blocks,
and the lowest N/2 states of H c = ε S c give the whole folded DM (docs/studies.md, "Why the periodic water
boxes are hard"). `h_noise_tolerance.py` measured how accurate H must be; this script measures how accurate a
network of the DM model's form (the config of `--like`, default `water`) gets on H itself.

The datasets keep an ``.HSX`` only for their ``val`` runs, so each training run is first restarted by SIESTA
from its converged DM with ``SaveHS T`` (1-2 SCF iterations) into ``OUT/<dataset>/<run>/``. The network is
then trained on H (eV, at the DM's stored elements, folded as the DM is) by the mean squared error. Every
``--eval-every`` epochs it prints, for the val runs: the H error (MAE and largest, meV) and the errors of the DM
made from H (element MAE and density-operator error, as ``siesta-dmguess evaluate``), beside the same for SIESTA's
own H. ``--scf`` then runs SIESTA from those DMs (`bench`'s ML block) and prints the SCF iterations.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
from h_noise_tolerance import occupied_dm  # same folder

EV_PER_HARTREE = 27.211386  # targets near unit size for the network


def with_hamiltonians(dataset: Path, out: Path) -> Path:
    """A copy of ``dataset`` in which every run has an ``.HSX`` (SIESTA restarted from the converged DM)."""
    from siesta_dmguess.siesta.runner import run_siesta
    from siesta_dmguess.siesta.templates import prepare_run

    target = out / dataset.name
    shutil.copytree(dataset / "basis", target / "basis", dirs_exist_ok=True)
    records = json.loads((dataset / "index.json").read_text())
    for rec in records:
        run, copy = dataset / rec["id"], target / rec["id"]
        if (copy / "siesta.HSX").is_file():
            rec["has_hsx"] = True
            continue
        shutil.copytree(run, copy, dirs_exist_ok=True)
        if not rec.get("has_hsx"):
            work = copy / "restart"
            fdf = prepare_run(run / "input.fdf", work, "ml", run / "siesta.DM", pseudo_dirs=[dataset / "basis"])
            fdf.write_text("SaveHS T\n" + fdf.read_text())
            done = run_siesta(fdf)
            print(f"{rec['id']}: H from a restart, {done.output.scf_iterations} SCF iterations", flush=True)
            shutil.copy(work / "siesta.HSX", copy / "siesta.HSX")
            shutil.rmtree(work)
            rec["has_hsx"] = True
        (copy / "run.json").write_text(json.dumps(rec, indent=1))
    (target / "index.json").write_text(json.dumps(records, indent=1))
    return target


def dm_from_hamiltonian(sample, h_values: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    """(DM at the stored elements, element MAE, density-operator error, Γ gap in eV) from H's lowest states."""
    from siesta_dmguess.evaluate import density_operator_error

    rows, cols = sample.stored_cell_positions()
    ok = rows >= 0

    def dense(values: np.ndarray) -> np.ndarray:  # the folded (Γ) matrix with these stored elements
        matrix = np.zeros((sample.layout.no, sample.layout.no))
        np.add.at(matrix, (rows[ok], cols[ok]), values[ok])
        return (matrix + matrix.T) / 2

    s = dense(sample.meta["overlap"])
    n_occupied = int(round(np.trace(dense(sample.meta["dm"]) @ s) / 2))
    d, gap = occupied_dm(dense(h_values), s, n_occupied)
    at_stored = np.where(ok, d[rows, cols], 0.0)
    error = at_stored - sample.meta["dm"]
    return at_stored, float(np.abs(error).mean()), density_operator_error(sample, error), gap


def main() -> None:
    import torch

    from siesta_dmguess.card import load_model
    from siesta_dmguess.data import load_samples
    from siesta_dmguess.evaluate import atom_batches
    from siesta_dmguess.model import DensityMatrixModel, ModelConfig, collate, fold_to_targets, onsite_reference
    from siesta_dmguess.train import RUN_SETTINGS, dataset_basis, mean_neighbours

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", type=Path, help="a dataset folder of Γ-only or molecular runs")
    p.add_argument("out", type=Path, help="folder for the copy with .HSX files (reused when run again)")
    p.add_argument("--like", default="water", help="shipped model whose network form to use")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--lr", type=float, default=5e-3, help="Adam's rate, decayed to 2.5e-4 as `train` does")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scf", action="store_true", help="then run SIESTA from the DMs made from the learned H")
    args = p.parse_args()
    warnings.simplefilter("ignore")  # sisl: no Fermi level in .HSX (not needed here)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    data = with_hamiltonians(args.dataset, args.out)
    basis = dataset_basis([data])
    species = sorted(basis, key=lambda label: (basis[label].Z, label))
    form = {k: v for k, v in load_model(args.like).model.config.to_dict().items()
            if k not in RUN_SETTINGS and k not in ("avg_num_neighbors", "correction_head")}
    config = ModelConfig(species=species, basis={k: b.to_dict() for k, b in basis.items()}, seed=args.seed, **form)
    samples = load_samples([data], species, basis, config.message_cutoff, with_overlap=True)
    for sample in samples:  # the network learns H (scaled), its on-site reference the mean H on-site block
        sample.meta["dm"], sample.target_values = sample.target_values, sample.meta["hamiltonian"] / EV_PER_HARTREE
    train = [s for s in samples if s.meta.get("split") != "val"]
    val = [s for s in samples if s.meta.get("split") == "val"]
    config.avg_num_neighbors = mean_neighbours(train, config.mp_cutoff)
    config.onsite_reference = onsite_reference(train, species, basis)
    model = DensityMatrixModel(config)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, (2.5e-4 / args.lr) ** (1 / max(args.epochs, 1)))

    def predicted_h(sample) -> np.ndarray:
        with torch.no_grad():
            batch = collate([sample], len(species), torch.float32)
            return fold_to_targets(model(batch), batch).double().numpy() * EV_PER_HARTREE

    def report(what: str, h_of) -> None:
        rows = []
        for sample in val:
            h = h_of(sample)
            error = np.abs(h - sample.meta["hamiltonian"]) * 1000
            rows.append((error.mean(), error.max(), *dm_from_hamiltonian(sample, h)[1:]))
        mean = np.mean(rows, axis=0)
        print(f"{what}: H MAE {mean[0]:.2f} meV, largest {mean[1]:.0f} meV | DM from it: MAE {mean[2]:.2e}, "
              f"density-operator error {mean[3]:.3f} (Γ gap {mean[4]:.2f} eV)", flush=True)

    print(f"{len(train)} training and {len(val)} val runs of {data}; the network of `{args.like}`", flush=True)
    report("SIESTA's own H", lambda sample: sample.meta["hamiltonian"])
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        for group in atom_batches(train, 24, shuffle=True, rng=rng):
            batch = collate(group, len(species), torch.float32)
            loss = torch.mean((fold_to_targets(model(batch), batch) - batch["target_values"]) ** 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            model.eval()
            report(f"epoch {epoch + 1} ({time.time() - t0:.0f} s)", predicted_h)
    if args.scf:
        scf_from_learned_h(val, predicted_h, args.out / "scf")


def scf_from_learned_h(val, predicted_h, work: Path) -> None:
    """SIESTA's SCF iterations from each val run's DM made from the learned H, against its atomic guess."""
    import sisl

    from siesta_dmguess.data import load_run
    from siesta_dmguess.dm import write_density_matrix
    from siesta_dmguess.siesta.runner import run_siesta
    from siesta_dmguess.siesta.templates import prepare_run

    totals = [0, 0]
    for sample in val:
        folder = Path(sample.name)
        dm_ref = load_run(folder)[2]
        values = dm_from_hamiltonian(sample, predicted_h(sample))[0]
        csr = dm_ref.tocsr(0).tocsr()
        csr.sort_indices()  # the order of the stored elements (dm.reference_lookup)
        csr.data = values
        run_dir = work / folder.name
        run_dir.mkdir(parents=True, exist_ok=True)
        write_density_matrix(sisl.DensityMatrix.fromsp(dm_ref.geometry, [csr]), run_dir / "guess.DM", overwrite=True)
        run = run_siesta(prepare_run(folder / "input.fdf", run_dir, "ml", run_dir / "guess.DM",
                                     pseudo_dirs=[folder.parent / "basis"]))
        atomic = sample.meta["scf_iterations_atomic_guess"]
        totals = [totals[0] + atomic, totals[1] + run.output.scf_iterations]
        print(f"{folder.name}: atomic guess {atomic}, DM from the learned H {run.output.scf_iterations} SCF "
              f"iterations (read: {run.output.dm_read_from_file}; ΔE "
              f"{abs(run.output.total_energy_eV - sample.meta['total_energy_eV']):.1e} eV)", flush=True)
    print(f"total: atomic guess {totals[0]}, DM from the learned H {totals[1]}")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
