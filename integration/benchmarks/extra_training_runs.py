"""Converge extra training structures with SIESTA, in the shared datasets' layout, to widen what a model has seen.

    SIESTA_COMMAND=/path/to/siesta python integration/benchmarks/extra_training_runs.py \\
        ../shared/datasets si-extra --workers 2
    siesta-dmguess train ../shared/datasets/si8 si-extra --init silicon --out silicon ...

Each set is made only from its datasets' *training* runs, so their ``val``
splits stay held out. ``si-extra`` (34 structures, from ``si8``):

* 24 cubic 8-atom cells: a training cell strained again (σ 1.5 %) and rattled
  with σ cycling through 0.03 / 0.06 / 0.09 / 0.12 Å (``si8`` itself: 1 % and
  0.06 Å), 4x4x4 k-points;
* 6 cells repeated 2x1x1, strained 1 %, rattled 0.06 Å, 2x4x4 k-points: atoms
  whose displacement is not repeated by the 8-atom periodicity;
* 4 primitive 2-atom fcc cells, strained 1.5 %, rattled 0.05 Å, 6x6x6 k-points.

``si-extra2`` (96 structures, from ``si8``): more cells of ``si8``'s own kind, a
training cell strained again (σ 1 %) and rattled with σ cycling through 0.04 /
0.06 / 0.08 Å, 4x4x4 k-points.

``si-vacancy`` (24 structures, from ``si8``): a training cell with one atom
removed, strained 1 % and rattled 0.04-0.08 Å: 16 7-atom cells (4x4x4
k-points) and 8 15-atom 2x1x1 cells (2x4x4): the undercoordinated atoms of a
vacancy, which no ``si8`` cell has.

``si-interstitial`` (24 structures, from ``si8``): a training cell with one
atom added in its largest void (the tetrahedral site), strained 1 % and rattled
0.04-0.08 Å: 16 9-atom cells (4x4x4 k-points) and 8 17-atom 2x1x1 cells
(2x4x4): the overcoordinated atoms of an interstitial.

``si-surface`` (12 structures, from ``si8``): a training cell stacked twice
along z (16 atoms), strained 1 %, rattled 0.04-0.08 Å, with 8-12 Å of vacuum
along z, 4x4x1 k-points: unreconstructed (001) slabs, whose surface atoms have
two dangling bonds each.

``water-extra`` (64 structures, from ``h2o`` and ``water8``; Γ only):

* 48 molecules: a training molecule rattled again by 0.08 or 0.12 Å (``h2o``
  itself: σ 0.04 Å in the bonds, 6° in the angle);
* 16 boxes: a training box scaled by 0.96-1.04 (density -11 % to +13 %) and
  rattled 0.05 Å.

``h2o-more`` (160 structures, from ``h2o``; Γ only): new water molecules drawn
like ``h2o``'s own (each O-H length and the angle around the training
molecules' means with σ 0.04 Å and 6°, randomly oriented, in the same 12 Å
box): more molecules of the held-out kind, for a residual stage that the
training molecules alone would overfit.

``h2o-wide`` (160 structures, from ``h2o``; Γ only): as ``h2o-more`` with twice
the widths (σ 0.08 Å and 12°): hotter molecules than the dataset's.

``water-extra2`` (96 structures, from ``water8``): training boxes scaled by
0.95-1.05 (density -14 % to +16 %) and rattled with σ cycling through 0.03 /
0.05 / 0.07 / 0.09 Å; Γ only.

``water-clusters`` (128 structures, from ``water8``): hydrogen-bonded clusters
of 2, 3, 4, 5, 6 and 8 molecules cut out of the training boxes (a molecule and
its nearest neighbours, unwrapped), rattled 0.02 Å and set in vacuum with
``h2o``'s settings: intermolecular blocks that are not folded over images.

``water-stretched`` (48 structures, from ``h2o`` and ``water8``; Γ only): one
O-H bond of a training box (32) or molecule (16) pulled to 1.1-2.4 Å (uniform;
the datasets: 0.93-1.04 Å), rattled 0.02 Å: bonds breaking, where the
``water`` model's guess cost iterations on ``unseen_structures.py``'s
``water8-stretched`` boxes (made from a *val* box).

``g2-extra`` (240 structures, from ``g2``): every training molecule twice more,
rattled 0.06 and 0.10 Å (``g2`` itself: 0.04 Å). ``g2``'s validation molecules
are other conformers of its training molecules, so they stay held out as
conformers, not as molecules.

``chno-kinds`` (80 structures): CHNO molecules of kinds ``g2`` does not have,
from ASE's S22 set and ``ase.build.molecule``'s extras: 12 molecules (formamide,
uracil, 2-pyridone, 2-aminopyridine, adenine, thymine, pyrazine, indole, phenol,
benzonitrile, 1,4-benzenediamine, biphenyl) three times each, and the 22 S22
dimers (hydrogen-bonded and stacked pairs) twice each; rattled 0.04 Å,
randomly oriented, in a cube at least 8 Å wider than the structure (``g2``:
12 Å). None is in ``unseen_structures.py``'s ``chno`` set (ASE's remaining G2
molecules), which stays the test of new kinds.

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
from unseen_structures import (add_interstitial, copy_basis, drawn_water_molecules, remove_random_atom, strained,
                               stretched, water_cluster, water_molecules, with_vacuum, write_run)

from siesta_dmguess.data import list_runs
from siesta_dmguess.siesta import prepare_run, run_siesta
from siesta_dmguess.structure import read_structure


def training_ids(datasets: Path, name: str) -> list[str]:
    return [run.id for run in list_runs(datasets / name) if run.split == "train"]


def silicon_structures(datasets: Path):
    """(atoms, k-grid, description, source dataset) of the ``si-extra`` set."""
    train = training_ids(datasets, "si8")
    rng = np.random.default_rng(1234)
    for k in range(24):
        source, rattle = train[k % len(train)], (0.03, 0.06, 0.09, 0.12)[k % 4]
        atoms = strained(read_structure(datasets / "si8" / source / "input.fdf").atoms, 0.015, rng)
        atoms.rattle(rattle, seed=1000 + k)
        yield atoms, (4, 4, 4), f"si8/{source} strained 1.5 %, rattled {rattle} Å", "si8"
    for k in range(6):
        source = train[(3 * k + 1) % len(train)]
        atoms = strained(read_structure(datasets / "si8" / source / "input.fdf").atoms.repeat((2, 1, 1)), 0.01, rng)
        atoms.rattle(0.06, seed=2000 + k)
        yield atoms, (2, 4, 4), f"si8/{source} x (2,1,1) strained 1 %, rattled 0.06 Å", "si8"
    for k in range(4):
        atoms = strained(bulk("Si", "diamond", a=5.43), 0.015, rng)
        atoms.rattle(0.05, seed=3000 + k)
        yield atoms, (6, 6, 6), "primitive fcc cell strained 1.5 %, rattled 0.05 Å", "si8"


def silicon_structures_more(datasets: Path):
    """(atoms, k-grid, description, source dataset) of the ``si-extra2`` set: more cells like ``si8``'s own."""
    train = training_ids(datasets, "si8")
    rng = np.random.default_rng(5678)
    for k in range(96):
        source, rattle = train[k % len(train)], (0.04, 0.06, 0.08)[k % 3]
        atoms = strained(read_structure(datasets / "si8" / source / "input.fdf").atoms, 0.01, rng)
        atoms.rattle(rattle, seed=8000 + k)
        yield atoms, (4, 4, 4), f"si8/{source} strained 1 %, rattled {rattle} Å", "si8"


def silicon_defect_cells(datasets: Path, seed: int, rattle_seed: int, make_defect, what: str):
    """24 cells from the ``si8`` training runs with one point defect each (``make_defect(atoms, rng)`` changes the
    strained cell in place): 16 8-atom cells (4x4x4 k-points) and 8 2x1x1 cells (2x4x4), strained 1 % and
    rattled 0.04-0.08 Å."""
    train = training_ids(datasets, "si8")
    rng = np.random.default_rng(seed)
    for k in range(24):
        source, rattle = train[k % len(train)], (0.04, 0.06, 0.08)[k % 3]
        repeat, kgrid = ((1, 1, 1), (4, 4, 4)) if k < 16 else ((2, 1, 1), (2, 4, 4))
        atoms = strained(read_structure(datasets / "si8" / source / "input.fdf").atoms.repeat(repeat), 0.01, rng)
        make_defect(atoms, rng)
        atoms.rattle(rattle, seed=rattle_seed + k)
        yield atoms, kgrid, f"si8/{source} x {repeat} {what}, strained 1 %, rattled {rattle} Å", "si8"


def silicon_vacancies(datasets: Path):
    """(atoms, k-grid, description, source dataset) of the ``si-vacancy`` set: cells with one atom removed."""
    return silicon_defect_cells(datasets, 9012, 9000, remove_random_atom, "less one atom")


def silicon_interstitials(datasets: Path):
    """(atoms, k-grid, description, source dataset) of the ``si-interstitial`` set: cells with one atom added."""
    return silicon_defect_cells(datasets, 3456, 3000, add_interstitial, "plus one interstitial atom")


def silicon_surfaces(datasets: Path):
    """(atoms, k-grid, description, source dataset) of the ``si-surface`` set: (001) slabs with vacuum."""
    train = training_ids(datasets, "si8")
    rng = np.random.default_rng(7890)
    for k in range(12):
        source, rattle, vacuum = train[k % len(train)], (0.04, 0.06, 0.08)[k % 3], (8.0, 10.0, 12.0)[k % 3]
        slab = strained(read_structure(datasets / "si8" / source / "input.fdf").atoms.repeat((1, 1, 2)), 0.01, rng)
        slab.wrap()
        slab.rattle(rattle, seed=7000 + k)
        yield with_vacuum(slab, vacuum), (4, 4, 1), \
            f"si8/{source} x (1,1,2) slab, {vacuum} Å of vacuum, strained 1 %, rattled {rattle} Å", "si8"


def water_structures(datasets: Path):
    """(atoms, k-grid, description, source dataset) of the ``water-extra`` set."""
    molecules, boxes = training_ids(datasets, "h2o"), training_ids(datasets, "water8")
    rng = np.random.default_rng(4321)
    for k in range(48):
        source, rattle = molecules[k % len(molecules)], (0.08, 0.12)[k % 2]
        atoms = read_structure(datasets / "h2o" / source / "input.fdf").atoms
        atoms.rattle(rattle, seed=5000 + k)
        yield atoms, None, f"h2o/{source} rattled {rattle} Å", "h2o"
    for k in range(16):
        source, scale = boxes[(2 * k + 1) % len(boxes)], rng.uniform(0.96, 1.04)
        atoms = read_structure(datasets / "water8" / source / "input.fdf").atoms
        atoms.set_cell(atoms.cell * scale, scale_atoms=True)
        atoms.rattle(0.05, seed=6000 + k)
        yield atoms, None, f"water8/{source} scaled {scale:.3f}, rattled 0.05 Å", "water8"


def water_molecules_more(datasets: Path, bond_sigma: float = 0.04, angle_sigma: float = 6.0, seed: int = 97531):
    """(atoms, k-grid, description, source dataset) of the ``h2o-more`` set (``h2o-wide``: twice the widths)."""
    for atoms, (r1, r2), angle in drawn_water_molecules(datasets, 160, bond_sigma, angle_sigma, seed):
        yield atoms, None, f"water molecule, O-H {r1:.3f} / {r2:.3f} Å, angle {angle:.1f}°", "h2o"


def water_boxes_more(datasets: Path):
    """(atoms, k-grid, description, source dataset) of the ``water-extra2`` set: more boxes, wider densities."""
    boxes = training_ids(datasets, "water8")
    rng = np.random.default_rng(8765)
    for k in range(96):
        source, scale, rattle = boxes[k % len(boxes)], rng.uniform(0.95, 1.05), (0.03, 0.05, 0.07, 0.09)[k % 4]
        atoms = read_structure(datasets / "water8" / source / "input.fdf").atoms
        atoms.set_cell(atoms.cell * scale, scale_atoms=True)
        atoms.rattle(rattle, seed=9000 + k)
        yield atoms, None, f"water8/{source} scaled {scale:.3f}, rattled {rattle} Å", "water8"


def water_clusters(datasets: Path):
    """(atoms, k-grid, description, source dataset) of the ``water-clusters`` set."""
    boxes = training_ids(datasets, "water8")
    for k in range(4 * len(boxes)):
        source, size, seed_molecule = boxes[k // 4], (2, 3, 4, 5, 6, 8)[k % 6], (k * 3) % 8
        atoms = water_cluster(read_structure(datasets / "water8" / source / "input.fdf").atoms, size, seed_molecule)
        atoms.rattle(0.02, seed=11000 + k)
        yield atoms, None, f"water8/{source}: {size} molecules around molecule {seed_molecule}, rattled 0.02 Å", "h2o"


def water_stretched(datasets: Path):
    """(atoms, k-grid, description, source dataset) of the ``water-stretched`` set: one O-H bond pulled out."""
    molecules, boxes = training_ids(datasets, "h2o"), training_ids(datasets, "water8")
    rng = np.random.default_rng(2468)
    for k in range(32):
        source, bond = boxes[k % len(boxes)], rng.uniform(1.1, 2.4)
        box = read_structure(datasets / "water8" / source / "input.fdf").atoms
        molecules_of_box = water_molecules(box)
        oxygen, hydrogens = molecules_of_box[int(rng.integers(len(molecules_of_box)))]
        atoms = stretched(box, oxygen, hydrogens[int(rng.integers(2))], bond)
        atoms.rattle(0.02, seed=12000 + k)
        yield atoms, None, f"water8/{source}: one O-H at {bond:.2f} Å, rattled 0.02 Å", "water8"
    for k in range(16):
        source, bond = molecules[k % len(molecules)], rng.uniform(1.1, 2.4)
        atoms = stretched(read_structure(datasets / "h2o" / source / "input.fdf").atoms, 0, 1 + k % 2, bond)
        atoms.rattle(0.02, seed=13000 + k)
        yield atoms, None, f"h2o/{source}: one O-H at {bond:.2f} Å, rattled 0.02 Å", "h2o"


def chno_structures(datasets: Path):
    """(atoms, k-grid, description, source dataset) of the ``g2-extra`` set."""
    molecules = training_ids(datasets, "g2")
    for k in range(2 * len(molecules)):
        source, rattle = molecules[k % len(molecules)], (0.06, 0.10)[k // len(molecules)]
        atoms = read_structure(datasets / "g2" / source / "input.fdf").atoms
        atoms.rattle(rattle, seed=7000 + k)
        yield atoms, None, f"g2/{source} rattled {rattle} Å", "g2"


# (S22 dimer, monomer index) of each new kind of molecule in the S22 set, and ase.build.molecule's extra CHNO ones
S22_MONOMERS = (("Formamide_dimer", 0), ("Uracil_dimer_h-bonded", 0), ("2-pyridoxine_2-aminopyridine_complex", 0),
                ("2-pyridoxine_2-aminopyridine_complex", 1), ("Adenine-thymine_Watson-Crick_complex", 0),
                ("Adenine-thymine_Watson-Crick_complex", 1), ("Pyrazine_dimer", 0),
                ("Indole-benzene_complex_stack", 1), ("Phenol_dimer", 0))
EXTRA_MOLECULES = ("C7NH5", "BDA", "biphenyl")


def in_box(atoms, rng, rattle: float, seed: int):
    """``atoms`` rattled, randomly oriented and centred in a cube 8 Å wider than it (at least 12 Å, as in ``g2``)."""
    atoms.rattle(rattle, seed=seed)
    atoms.rotate(rng.uniform(0, 360), rng.normal(size=3), center="COP")
    side = max(12.0, float(np.ceil(np.ptp(atoms.positions, axis=0).max())) + 8.0)
    atoms.set_cell([side, side, side])
    atoms.center()
    return atoms


def chno_kinds(datasets: Path):
    """(atoms, k-grid, description, source dataset) of the ``chno-kinds`` set."""
    from ase import Atoms
    from ase.build import molecule
    from ase.collections import s22
    from ase.data.s22 import data as s22_data

    rng = np.random.default_rng(31)
    monomers = []
    for dimer, which in S22_MONOMERS:
        n_first = s22_data[dimer]["dimer atoms"][0]
        atoms = s22[dimer]
        atoms = atoms[:n_first] if which == 0 else atoms[n_first:]
        monomers.append((Atoms(atoms.symbols, atoms.positions), f"S22 {dimer} monomer {'AB'[which]}"))
    monomers += [(molecule(name), f"ase.build.molecule {name}") for name in EXTRA_MOLECULES]
    k = 0
    for _ in range(3):
        for atoms, what in monomers:
            yield in_box(atoms.copy(), rng, 0.04, 8000 + k), None, f"{what}, rattled 0.04 Å", "g2"
            k += 1
    for _ in range(2):
        for dimer in s22.names:
            atoms = Atoms(s22[dimer].symbols, s22[dimer].positions)
            yield in_box(atoms, rng, 0.04, 8000 + k), None, f"S22 {dimer}, rattled 0.04 Å", "g2"
            k += 1


SETS = {"si-extra": silicon_structures, "si-extra2": silicon_structures_more, "si-vacancy": silicon_vacancies,
        "si-interstitial": silicon_interstitials, "si-surface": silicon_surfaces,
        "water-extra": water_structures, "h2o-more": water_molecules_more,
        "h2o-wide": lambda datasets: water_molecules_more(datasets, 0.08, 12.0, seed=86420),
        "water-extra2": water_boxes_more, "water-clusters": water_clusters,
        "water-stretched": water_stretched, "g2-extra": chno_structures, "chno-kinds": chno_kinds}


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
    p.add_argument("--resume", action="store_true", help="keep the runs an interrupted call finished in OUT")
    args = p.parse_args()
    if args.out.exists() and not args.resume:
        raise SystemExit(f"{args.out}: already exists; choose a new folder (or --resume an interrupted set)")
    structures = list(SETS[args.set](args.datasets))
    periodic = {}  # as the source dataset's index.json says: False for a molecule in a box
    for source in {source for *_, source in structures}:  # the sources of one set share their species' basis
        copy_basis(args.datasets / source, args.out)
        periodic[source] = list_runs(args.datasets / source)[0].meta.get("periodic")
    jobs = []
    done = {}
    for k, (atoms, kgrid, what, source) in enumerate(structures):
        run_id = f"{k:04d}"
        if (args.out / run_id / "run.json").is_file():  # converged by an interrupted call (same seeds)
            done[run_id] = json.loads((args.out / run_id / "run.json").read_text())
            continue
        write_run(args.datasets / source / "0000" / "input.fdf", atoms, args.out / run_id, kgrid)
        jobs.append((args.out / run_id, {"id": run_id, "name": what, "formula": atoms.get_chemical_formula(),
                                         "natoms": len(atoms), "periodic": periodic[source],
                                         "kgrid": list(kgrid) if kgrid else None}))
    with ThreadPoolExecutor(args.workers) as pool:
        new = list(tqdm(pool.map(lambda job: converge(*job), jobs), total=len(jobs), desc="SIESTA runs"))
    records = sorted(list(done.values()) + new, key=lambda r: r["id"])
    (args.out / "index.json").write_text(json.dumps(records, indent=1))
    print(f"{len(records)} runs converged under {args.out} "
          f"({sum(r['scf_iterations_atomic_guess'] for r in records)} SCF iterations in total)")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
