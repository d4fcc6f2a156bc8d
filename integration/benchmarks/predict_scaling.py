"""Prediction time and peak memory vs system size, for liquid-water boxes of ~100 to >10,000 atoms.

Each size runs in a fresh subprocess so that its peak resident memory is its own.
Prints one line per size and the fitted scaling exponent (time ∝ N^a).

    python integration/benchmarks/predict_scaling.py [--model water] [--sizes 27 216 1000 3375] [--refine charge]

``--refine charge`` (default here) times the O(N) path: model, S from the basis, charge scaling. The default
of ``predict``, ``idempotent``, adds a dense O(n_orb³) projection for boxes of up to 6000 orbitals
(``refine.MAX_DENSE_ORBITALS``); ``--refine idempotent`` shows its cost.
"""

from __future__ import annotations

import argparse
import json
import sys

from study_args import child_output


def water_box(n_molecules: int, seed: int = 0):
    """n = k³ water molecules at 1 g/cm³ on a jittered cubic lattice (3.1 Å spacing), random orientations."""
    import numpy as np
    from ase import Atoms
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    side = round(n_molecules ** (1 / 3))
    if side**3 != n_molecules:
        raise ValueError(f"n_molecules must be a cube (27, 216, 1000, 3375, ...), not {n_molecules}")
    length = (n_molecules * 18.015 / 0.6022) ** (1 / 3)  # Å for 1 g/cm³
    mol = np.array([[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0], [-0.2400, 0.9266, 0.0]])
    sites = np.array([(i, j, k) for i in range(side) for j in range(side) for k in range(side)])[:n_molecules]
    pos = []
    for k, site in enumerate(sites):
        rot = Rotation.random(random_state=seed * 100003 + k).as_matrix()
        pos.append(mol @ rot.T + (site + 0.5 + rng.normal(0, 0.05, 3)) * length / side)
    return Atoms("OH2" * n_molecules, positions=np.concatenate(pos), cell=np.eye(3) * length, pbc=True)


def one_size(model: str, n_molecules: int, refine: str, chunks: tuple[int, int] | None = None) -> dict:
    import resource
    import time

    import torch

    from siesta_dmguess.card import load_model
    from siesta_dmguess.predict import predict_density_matrix
    from siesta_dmguess.structure import structure_from_atoms

    torch.set_num_threads(2)
    loaded = load_model(model)
    if chunks:  # edges per step at inference: (message passing, pair readout); they bound memory, not results
        from siesta_dmguess.layers import Interaction

        for module in loaded.model.modules():
            if hasattr(module, "edge_chunk"):
                module.edge_chunk = chunks[0] if isinstance(module, Interaction) else chunks[1]
    structure = structure_from_atoms(water_box(n_molecules))
    t0 = time.perf_counter()
    pred = predict_density_matrix(structure, loaded, fold=True, refine=refine)
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"atoms": len(structure.atoms), "pairs": len(pred.sample.pattern), "elements": int(pred.sample.layout.size),
            "seconds": seconds, "peak_rss_mb": peak_mb, "refinement": pred.refinement}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="water")
    p.add_argument("--sizes", type=int, nargs="+", default=[27, 216, 1000, 3375], help="water molecules per box")
    p.add_argument("--refine", default="charge", choices=["charge", "idempotent", "none"])
    p.add_argument("--edge-chunks", type=int, nargs=2, metavar=("MESSAGES", "PAIRS"),
                   help="edges per step at inference in the message passing and the pair readout (default: the "
                        "model's, 8192 and 4096)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    not_cubes = [n for n in args.sizes if n < 1 or round(n ** (1 / 3)) ** 3 != n]
    if not_cubes:  # checked here, before any subprocess, so the error is one line, not a child's traceback
        p.error(f"--sizes must be cubes (27, 216, 1000, 3375, ...): the molecules fill a cubic lattice; got {not_cubes}")
    if args.one:
        print(json.dumps(one_size(args.model, args.one, args.refine, args.edge_chunks)))
        return
    import numpy as np

    rows = []
    print(f"{'atoms':>7} {'pairs':>9} {'DM elements':>12} {'time (s)':>9} {'s/atom':>9} {'peak RSS (MB)':>14} {'refinement':>11}")
    for n in args.sizes:
        command = [sys.executable, __file__, "--model", args.model, "--one", str(n), "--refine", args.refine]
        command += ["--edge-chunks", *map(str, args.edge_chunks)] if args.edge_chunks else []
        r = json.loads(child_output(command).strip().splitlines()[-1])
        rows.append(r)
        print(f"{r['atoms']:>7} {r['pairs']:>9} {r['elements']:>12} {r['seconds']:>9.2f} "
              f"{r['seconds'] / r['atoms']:>9.2e} {r['peak_rss_mb']:>14.0f} {r['refinement']:>11}", flush=True)
    if len(rows) > 1:
        n = np.log([r["atoms"] for r in rows[1:]])
        a_t = np.polyfit(n, np.log([r["seconds"] for r in rows[1:]]), 1)[0]
        a_m = np.polyfit(n, np.log([r["peak_rss_mb"] for r in rows[1:]]), 1)[0]
        print(f"scaling exponents (time ∝ N^a, from the sizes above the smallest): time {a_t:.2f}, memory {a_m:.2f}")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
