"""How accurate would a model of H have to be? DM errors from SIESTA's own H plus random element errors.

    python integration/benchmarks/h_noise_tolerance.py ../shared/datasets/h2o ../shared/datasets/water8

For held-out runs with an ``.HSX``, H (eV) is folded to Γ like the DM, a
symmetric Gaussian error of standard deviation σ is added to each of its stored
elements, and the DM is rebuilt from the lowest N/2 states of H c = ε S c. Printed
per run and σ: the element MAE against SIESTA's DM and the density-operator
error sqrt(Tr[(ΔD S)²]) (as ``siesta-dmguess evaluate`` reports them), beside the
Γ gap. Compare with the shipped model's numbers from ``evaluate``: an H model
replaces the DM model only where its errors are below the σ at which these match.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
from gamma_vs_kpoints import fold  # same folder: sum image columns into the cell


def occupied_dm(h, s, n_occupied):
    import scipy.linalg

    energies, vectors = scipy.linalg.eigh(h, s)
    gap = energies[n_occupied] - energies[n_occupied - 1]
    return 2 * vectors[:, :n_occupied] @ vectors[:, :n_occupied].T, gap


def main() -> None:
    import sisl

    from siesta_dmguess.data import load_run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("datasets", nargs="+", type=Path)
    p.add_argument("--sigmas", default="0.001,0.003,0.01,0.03", help="element errors of H to try (eV)")
    p.add_argument("--limit", type=int, default=3, help="held-out runs per dataset")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    warnings.simplefilter("ignore")  # sisl: no Fermi level in .HSX (not needed here)
    sigmas = [float(x) for x in args.sigmas.split(",")]
    for dataset in args.datasets:
        records = [r for r in json.loads((dataset / "index.json").read_text())
                   if r.get("split") == "val" and r.get("has_hsx")][: args.limit]
        for rec in records:
            _, _, dm_ref, hsx = load_run(dataset / rec["id"])
            no = dm_ref.no
            hamiltonian = sisl.get_sile(str(hsx)).read_hamiltonian(geometry=dm_ref.geometry)
            h = fold(hamiltonian.tocsr(0), no)
            s = fold(hamiltonian.tocsr(hamiltonian.S_idx), no)
            ref = fold(dm_ref.tocsr(0), no)
            stored = ref != 0
            n_occupied = int(round(np.trace(ref @ s) / 2))

            def errors(d):
                e = (d - ref) * stored
                es = e @ s
                return f"MAE {np.abs(e[stored]).mean():.1e}, density-operator {np.sqrt(np.trace(es @ es)):.3f}"

            exact, gap = occupied_dm(h, s, n_occupied)
            rng = np.random.default_rng(args.seed)
            line = [f"{dataset.name}/{rec['id']} ({no} orbitals, S eigenvalues from "
                    f"{np.linalg.eigvalsh(s).min():.1e}, Γ gap {gap:.2f} eV): SIESTA's H {errors(exact)}"]
            for sigma in sigmas:
                a = rng.normal(size=h.shape) * sigma
                noise = (a + a.T) / np.sqrt(2) * (h != 0)
                line.append(f"σ {1000 * sigma:g} meV: {errors(occupied_dm(h + noise, s, n_occupied)[0])}")
            print("\n  ".join(line), flush=True)


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
