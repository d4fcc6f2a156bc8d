"""Converge extra training structures with SIESTA, in the shared datasets' layout, to widen what a model has seen.

    SIESTA_COMMAND=/path/to/siesta python integration/benchmarks/extra_training_runs.py \\
        ../shared/datasets si-extra --workers 2
    siesta-dmguess train ../shared/datasets/si8 si-extra --init silicon --out silicon ...

``si-extra`` (34 structures) is made only from the ``si8`` *training* runs, so
``si8`` val stays held out:

* 24 cubic 8-atom cells: a training cell strained again (σ 1.5 %) and rattled
  with σ cycling through 0.03 / 0.06 / 0.09 / 0.12 Å (``si8`` itself: 1 % and
  0.06 Å), 4x4x4 k-points;
* 6 cells repeated 2x1x1, strained 1 %, rattled 0.06 Å, 2x4x4 k-points: atoms
  whose displacement is not repeated by the 8-atom periodicity;
* 4 primitive 2-atom fcc cells, strained 1.5 %, rattled 0.05 Å, 6x6x6 k-points.

Seeds differ from ``unseen_structures.py``'s, so its sets stay unseen
structures (but ``si16`` and ``si2-fcc`` are then cell shapes the model has
seen). Each structure is converged from SIESTA's atomic guess with the
dataset's own fdf settings; the folder gets ``basis/``, one run folder per
structure (``input.fdf``, ``siesta.DM``, ``siesta.out.gz``, ``run.json``) and an
``index.json`` with every run in the ``train`` split.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from ase.build import bulk
from tqdm import tqdm
from unseen_structures import copy_basis, strained, write_run

from siesta_dmguess.siesta import prepare_run, run_siesta
from siesta_dmguess.structure import read_structure


def silicon_structures(datasets: Path):
    """(atoms, k-grid, description) of the ``si-extra`` set, from the ``si8`` training runs only."""
    index = json.loads((datasets / "si8" / "index.json").read_text())
    train = [r["id"] for r in index if r.get("split") == "train"]
    rng = np.random.default_rng(1234)
    for k in range(24):
        source, rattle = train[k % len(train)], (0.03, 0.06, 0.09, 0.12)[k % 4]
        atoms = strained(read_structure(datasets / "si8" / source / "input.fdf").atoms, 0.015, rng)
        atoms.rattle(rattle, seed=1000 + k)
        yield atoms, (4, 4, 4), f"si8/{source} strained 1.5 %, rattled {rattle} Å"
    for k in range(6):
        source = train[(3 * k + 1) % len(train)]
        atoms = strained(read_structure(datasets / "si8" / source / "input.fdf").atoms.repeat((2, 1, 1)), 0.01, rng)
        atoms.rattle(0.06, seed=2000 + k)
        yield atoms, (2, 4, 4), f"si8/{source} x (2,1,1) strained 1 %, rattled 0.06 Å"
    for k in range(4):
        atoms = strained(bulk("Si", "diamond", a=5.43), 0.015, rng)
        atoms.rattle(0.05, seed=3000 + k)
        yield atoms, (6, 6, 6), "primitive fcc cell strained 1.5 %, rattled 0.05 Å"


SETS = {"si-extra": ("si8", silicon_structures)}


def converge(folder: Path, record: dict) -> dict:
    """Run SIESTA from its atomic guess in ``folder``; keep the dataset's files and return the index record."""
    fdf = prepare_run(folder / "input.fdf", folder, "atomic", pseudo_dirs=[folder.parent / "basis"])
    run = run_siesta(fdf)
    with open(run.out_file, "rb") as src, gzip.open(folder / "siesta.out.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    keep = {"input.fdf", "siesta.DM", "siesta.out.gz"}
    for path in folder.iterdir():
        if path.name not in keep:
            path.unlink()
    out = run.output
    record.update(scf_iterations_atomic_guess=out.scf_iterations, converged=out.converged,
                  total_energy_eV=out.total_energy_eV, siesta_wall_s=round(run.wall_s, 2), has_hsx=False,
                  split="train")
    (folder / "run.json").write_text(json.dumps(record, indent=1))
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("datasets", type=Path, help="the shared datasets folder (../shared/datasets)")
    p.add_argument("out", type=Path, help="new dataset folder (must not exist)")
    p.add_argument("--set", default="si-extra", choices=sorted(SETS))
    p.add_argument("--workers", type=int, default=1, help="SIESTA runs at once (each serial)")
    args = p.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out}: already exists; choose a new folder")
    source, make = SETS[args.set]
    copy_basis(args.datasets / source, args.out)
    template = args.datasets / source / "0000" / "input.fdf"
    jobs = []
    for k, (atoms, kgrid, what) in enumerate(make(args.datasets)):
        run_id = f"{k:04d}"
        write_run(template, atoms, args.out / run_id, kgrid)
        jobs.append((args.out / run_id, {"id": run_id, "name": what, "formula": atoms.get_chemical_formula(),
                                         "natoms": len(atoms), "periodic": True, "kgrid": list(kgrid)}))
    with ThreadPoolExecutor(args.workers) as pool:
        records = list(tqdm(pool.map(lambda job: converge(*job), jobs), total=len(jobs), desc="SIESTA runs"))
    (args.out / "index.json").write_text(json.dumps(records, indent=1))
    print(f"{len(records)} runs converged under {args.out} "
          f"({sum(r['scf_iterations_atomic_guess'] for r in records)} SCF iterations in total)")


if __name__ == "__main__":
    main()
