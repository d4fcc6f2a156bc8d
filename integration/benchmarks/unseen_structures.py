"""Write run folders of structures the shipped models never saw, with the shared datasets' SIESTA settings.

    python integration/benchmarks/unseen_structures.py ../shared/datasets unseen
    siesta-dmguess bench unseen/chno --model chno-molecules --split all --out bench_unseen
    siesta-dmguess bench unseen/water64 --model water --split all --out bench_unseen
    siesta-dmguess bench unseen/si16 --model silicon --split all --out bench_unseen
    siesta-dmguess bench unseen/water-clusters --model water --split all --out bench_unseen
    siesta-dmguess bench unseen/si-vacancy --model silicon --split all --out bench_unseen
    siesta-dmguess bench unseen/chno-complexes --model chno-molecules --split all --out bench_unseen

The sets (same basis, XC, mesh and SCF settings as the dataset each comes from):

* ``chno``: closed-shell CHNO molecules of ASE's G2 collection that are *not* in
  ``g2`` (new molecules, not new conformers; names found in ``g2``'s index are
  left out), rattled 0.04 Å and randomly oriented in a 12 Å box;
* ``water64``: two ``water8`` boxes repeated 2x2x2 (192 atoms, 12.4 Å, still
  Γ only) and rattled 0.03 Å: a larger cell than any training box;
* ``si16``: two ``si8`` cells repeated 2x1x1 and rattled 0.05 Å, with a
  2x4x4 k-grid: a cell shape and k-grid the model never saw;
* ``si2-fcc``: two primitive (2-atom, fcc, non-orthogonal) silicon cells,
  strained 1 % and rattled 0.05 Å, with a 6x6x6 k-grid: a cell shape unlike
  any training cell;
* ``si64-gamma``: two ``si8`` cells repeated 2x2x2 and rattled 0.03 Å, run at
  Γ only (the model learned from k-point DMs, this DM is folded);
* ``si8-wide``: two ``si8`` val cells strained again by 1.5 % and rattled
  0.10 Å (the dataset: 1 % and 0.06 Å), 4x4x4 k-points: hotter, more strained
  crystals;
* ``water8-stress``: two ``water8`` val boxes compressed and expanded by 8 %
  (density +28 % / −21 %) or rattled 0.12 Å;
* ``h2o-stress``: three ``h2o`` val molecules rattled 0.15 Å (about 4x the
  dataset's distortion);
* ``h2o-stretched``: one ``h2o`` val molecule with one O-H bond set to 0.85,
  1.20, 1.45, 1.80 and 2.30 Å (the dataset's bonds: 0.93-1.04 Å), and with
  its angle opened to 160°: a bond breaking, far outside the training data;
* ``water8-stretched``: one molecule of a ``water8`` val box with an O-H bond
  of 1.20, 1.45, 1.80 and 2.30 Å (its H moved along the bond);
* ``g2-stretched``: the first 8 ``g2`` val molecules with two atoms, each
  molecule's shortest bond, pulled apart to 1.4x and 2x its length;
* ``si8-displaced``: one atom of a ``si8`` val cell moved 0.3, 0.6 and 0.9 Å
  in a random direction (the dataset's rattle: 0.06 Å), 4x4x4 k-points;
* ``g2-stress``: every ``g2`` val molecule (30 kinds) rattled again by 0.08 Å
  (the dataset: 0.04 Å) and reoriented: known molecules, hotter conformers;
* ``water-clusters``: hydrogen-bonded clusters of 2, 3, 4 and 6 molecules cut
  out of two ``water8`` val boxes (a molecule and its nearest neighbours,
  unwrapped) and set in vacuum with ``h2o``'s settings, at least 9 Å between
  periodic copies: neither a single molecule nor a liquid;
* ``si-vacancy``: two ``si8`` val cells with one atom removed (7 atoms, 4x4x4
  k-points) and two ``si16``-like 2x1x1 cells with one atom removed (15 atoms,
  2x4x4), rattled 0.05 Å: a defect, which no ``si8`` cell has (the shipped
  ``silicon`` has since been trained on other vacancy cells,
  ``extra_training_runs.py --set si-vacancy``);
* ``si8-pressure``: two ``si8`` val cells compressed and expanded by 3 %
  (volume −9 % / +9 %), 4x4x4 k-points: a crystal under pressure or tension;
* ``water-slab``: two ``water8`` val boxes with whole molecules and 10 Å of
  vacuum added along z, still Γ only: a liquid surface, half the molecules
  with a broken hydrogen-bond network;
* ``si-interstitial``: two ``si8`` val cells (9 atoms, 4x4x4 k-points) and two
  2x1x1 cells (17 atoms, 2x4x4) with one more atom in the cell's largest
  void (the tetrahedral site), rattled 0.05 Å: a defect no training cell has;
* ``si-surface``: two ``si8`` val cells stacked twice along z (16 atoms) with
  10 Å of vacuum, 4x4x1 k-points: an unreconstructed (001) slab, two dangling
  bonds per surface atom;
* ``si-hot``: two ``si8`` val cells rattled 0.15 Å (the dataset: 0.06 Å), 4x4x4
  k-points: a crystal near melting;
* ``chno-complexes``: six molecular complexes of ASE's S22 collection (formic
  acid and formamide dimers, benzene-water, the pyrazine dimer, the
  hydrogen-bonded uracil dimer, the phenol dimer; 10-26 atoms), randomly
  oriented with 9 Å of vacuum between copies: larger molecules, rings with N
  and O, and hydrogen-bonded and stacked pairs, none of them in ``g2`` (the
  ``chno-kinds`` set of ``extra_training_runs.py`` holds S22 dimers, so a model
  trained on it has seen these; the shipped ``chno-molecules`` has not).
* ``si8-gamma`` and ``si8-k2``: the four ``si8`` val cells as they are, run at
  Γ only and with 2x2x2 k-points (the dataset: 4x4x4): a coarser sampling. At Γ
  the 5.43 Å cell is shorter than its DM's range, and the `silicon` model, which
  learned from k-point runs only, gives no DM (``Prediction.sampling_reason``);
* ``water8-k3``: two ``water8`` val boxes with 3x3x3 k-points (the dataset: Γ
  only): the converse, a finer sampling than the `water` model's boxes.
* ``h2o-smallbox``: three ``h2o`` val molecules, unchanged, in 8 Å and in 6 Å
  boxes (the dataset: 12 Å): closer periodic images; ``h2o-largebox``: the same
  in 16 Å and 20 Å boxes, farther ones.
* ``h2o-hot``: 12 new water molecules drawn as ``h2o``'s own (bond lengths and
  angle around the training molecules' means) with twice its widths (σ 0.08 Å,
  12°), randomly oriented in the 12 Å box; ``h2o-warm``: 12 more at 1.5 times
  (σ 0.06 Å, 9°). Hotter molecules than the dataset's, none flagged as novel.

Each folder is a dataset the benchmark reads directly (run folders with
``input.fdf`` plus ``basis/``); there is no reference DM, SIESTA makes it.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.collections import g2, s22
from ase.data import atomic_numbers
from ase.geometry import find_mic

from siesta_dmguess.data import list_runs
from siesta_dmguess.siesta.templates import fdf_with_geometry
from siesta_dmguess.structure import read_structure

# Complexes of ASE's S22 collection (CHNO only), new to `g2`: larger molecules, hydrogen-bonded and stacked pairs.
UNSEEN_S22 = ["Formic_acid_dimer", "Formamide_dimer", "Benzene-water_complex", "Pyrazine_dimer",
              "Uracil_dimer_h-bonded", "Phenol_dimer"]
# Closed-shell (even electron count, no magnetic moments) CHNO molecules of ASE's G2 set absent from `g2`.
UNSEEN_G2 = ["CH3CHO", "CH2NHCH2", "H3CNH2", "C3H6_D3h", "trans-butane", "butadiene", "CH3OCH3", "C3H4_D2d",
             "2-butyne", "N2O", "C3H9N", "C3H6_Cs", "C3H4_C3v", "C3H4_C2v"]


SI8_VAL = ("0004", "0009", "0014", "0019")  # the si8 dataset's val split


def with_species(fdf_text: str, labels: list[str]) -> str:
    """The fdf text with its species block holding exactly ``labels`` (the template's may hold others)."""
    block = "\n".join(f" {k + 1} {atomic_numbers[label]} {label}" for k, label in enumerate(labels))
    fdf_text = re.sub(r"(?im)^NumberOfSpecies\s+\d+", f"NumberOfSpecies {len(labels)}", fdf_text)
    return re.sub(r"(?is)(%block ChemicalSpeciesLabel\n).*?(%endblock)", lambda m: m.group(1) + block + "\n" + m.group(2),
                  fdf_text)


def with_kgrid(fdf_text: str, grid: tuple[int, int, int]) -> str:
    """The fdf text with a diagonal Monkhorst-Pack grid, replacing the template's or added to a Γ-only one."""
    rows = "".join(f" {' '.join(str(n if i == j else 0) for j in range(3))} 0.0\n" for i, n in enumerate(grid))
    if not re.search(r"(?i)%block kgrid_Monkhorst_Pack", fdf_text):
        return fdf_text + f"%block kgrid_Monkhorst_Pack\n{rows}%endblock kgrid_Monkhorst_Pack\n"
    return re.sub(r"(?is)(%block kgrid_Monkhorst_Pack\n).*?(%endblock)", lambda m: m.group(1) + rows + m.group(2),
                  fdf_text)


def write_run(template: Path, atoms, dest: Path, kgrid=None) -> None:
    labels = sorted(set(atoms.get_chemical_symbols()), key=lambda s: atomic_numbers[s])
    text = with_species(template.read_text(), labels)
    text = text.replace("SaveHS T\n", "")  # the benchmark needs no .HSX
    if kgrid:
        text = with_kgrid(text, kgrid)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "input.fdf").write_text(fdf_with_geometry(text, atoms, atoms.get_chemical_symbols()))


def strained(atoms, sigma: float, rng):
    """``atoms`` with a random symmetric strain of size ``sigma`` (scaled positions kept)."""
    eps = sigma * rng.normal(size=(3, 3))
    atoms.set_cell(atoms.cell @ (np.eye(3) + 0.5 * (eps + eps.T)), scale_atoms=True)
    return atoms


def water_molecules(box) -> list[tuple[int, np.ndarray]]:
    """(O index, its two H indices) of each molecule of a periodic water ``box``: the two H nearest each O (minimum
    image)."""
    symbols = box.get_chemical_symbols()
    hydrogens = np.array([i for i, s in enumerate(symbols) if s == "H"])
    return [(o, hydrogens[np.argsort(np.linalg.norm(find_mic(box.positions[hydrogens] - box.positions[o], box.cell,
                                                             True)[0], axis=1))[:2]])
            for o in (i for i, s in enumerate(symbols) if s == "O")]


def water_cluster(box, size: int, seed_molecule: int, vacuum: float = 9.0):
    """The ``size`` molecules of a periodic water ``box`` nearest to one of them, unwrapped, in a vacuum cell.

    Molecules are an O and the two H nearest to it (minimum image); the cluster
    keeps each molecule's image nearest to the seed molecule's O.
    """
    pos, cell = box.positions, box.cell
    mic = lambda d: find_mic(d, cell, True)[0]  # noqa: E731  (minimum-image vectors, ASE's)
    molecules = water_molecules(box)
    oxygens = [o for o, _ in molecules]
    seed = pos[molecules[seed_molecule][0]]
    order = np.argsort(np.linalg.norm(mic(pos[oxygens] - seed), axis=1))[:size]
    symbols, positions = [], []
    for m in order:
        o, hs = molecules[m]
        o_pos = seed + mic(pos[o] - seed)
        symbols += ["O", "H", "H"]
        positions += [o_pos, *(o_pos + mic(pos[hs] - pos[o]))]
    cluster = Atoms(symbols, positions=positions)
    cluster.center(vacuum=vacuum / 2)
    cluster.pbc = True
    return cluster


def whole_molecules(box):
    """The water ``box`` with every molecule made whole: its two H moved to the O's minimum image, O wrapped."""
    box = box.copy()
    box.wrap()
    pos = box.positions
    for o, hs in water_molecules(box):
        pos[hs] = pos[o] + find_mic(pos[hs] - pos[o], box.cell, True)[0]
    box.positions = pos
    return box


def stretched(atoms, i: int, j: int, length: float):
    """A copy of ``atoms`` with atom ``j`` moved along the (minimum-image) bond from ``i`` so that it is ``length`` Å."""
    atoms = atoms.copy()
    bond = find_mic(atoms.positions[j] - atoms.positions[i], atoms.cell, bool(atoms.pbc.any()))[0]
    atoms.positions[j] = atoms.positions[i] + bond * length / np.linalg.norm(bond)
    return atoms


def largest_void(atoms) -> np.ndarray:
    """Cartesian position of the point of a periodic cell farthest from every atom (on a 24³ grid of the cell)."""
    grid = np.stack(np.meshgrid(*[np.arange(24) / 24] * 3, indexing="ij"), -1).reshape(-1, 3) @ atoms.cell.array
    nearest = np.full(len(grid), np.inf)
    for position in atoms.positions:
        nearest = np.minimum(nearest, np.linalg.norm(find_mic(grid - position, atoms.cell, True)[0], axis=1))
    return grid[int(np.argmax(nearest))]


def remove_random_atom(atoms, rng) -> None:
    """A vacancy: one atom, drawn with ``rng``, removed in place."""
    del atoms[int(rng.integers(len(atoms)))]


def add_interstitial(atoms, rng=None) -> None:
    """A silicon interstitial: one Si atom added in place at the cell's largest void (``rng`` unused)."""
    atoms.extend(Atoms("Si", positions=[largest_void(atoms)]))


def with_vacuum(atoms, vacuum: float):
    """``atoms`` with its third cell vector lengthened by ``vacuum`` Å and the atoms moved to the middle of it."""
    direction = atoms.cell[2] / np.linalg.norm(atoms.cell[2])
    atoms.cell[2] += vacuum * direction
    atoms.positions += 0.5 * vacuum * direction
    return atoms


def drawn_water_molecules(datasets: Path, count: int, bond_sigma: float, angle_sigma: float, seed: int):
    """(atoms, O-H lengths, angle in degrees) of ``count`` water molecules whose O-H lengths and angle are drawn
    around the ``h2o`` training molecules' means, randomly oriented in their 12 Å box."""
    molecules = [read_structure(run.folder / "input.fdf").atoms for run in list_runs(datasets / "h2o")
                 if run.split == "train"]
    bonds = [m.get_distance(0, h) for m in molecules for h in (1, 2)]
    angles = [m.get_angle(1, 0, 2) for m in molecules]
    rng = np.random.default_rng(seed)
    for _ in range(count):
        r1, r2 = rng.normal(np.mean(bonds), bond_sigma, 2)
        theta = np.radians(rng.normal(np.mean(angles), angle_sigma))
        atoms = Atoms("OH2", [[0, 0, 0], [r1, 0, 0], [r2 * np.cos(theta), r2 * np.sin(theta), 0]],
                      cell=molecules[0].cell)
        atoms.rotate(rng.uniform(0, 360), rng.normal(size=3), center="COP")
        atoms.center()
        yield atoms, (r1, r2), np.degrees(theta)


def copy_basis(dataset: Path, dest: Path) -> None:
    shutil.copytree(dataset / "basis", dest / "basis", dirs_exist_ok=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("datasets", type=Path, help="the shared datasets folder (../shared/datasets)")
    p.add_argument("out", type=Path)
    p.add_argument("--sets", default="chno,water64,si16,si2-fcc,si64-gamma,si8-wide,water8-stress,h2o-stress,"
                                     "g2-stress,water-clusters,si-vacancy,si8-pressure,"
                                     "water-slab,si-interstitial,si-surface,si-hot,chno-complexes,h2o-stretched,"
                                     "water8-stretched,g2-stretched,si8-displaced,si8-gamma,si8-k2,water8-k3,h2o-smallbox,"
                                     "h2o-largebox,h2o-hot,h2o-warm")
    args = p.parse_args()
    sets = args.sets.split(",")
    known = p.get_default("sets").split(",")
    unknown = [name for name in sets if name not in known]
    if unknown:  # each set is written by name below: an unknown one was passed over without a word
        p.error(f"unknown set(s) {', '.join(unknown)}; the sets are {', '.join(known)}")
    # The random orientations of three sets, drawn in one fixed order whichever sets are written, so that a few
    # sets (--sets) are the same structures as in the full run (they once depended on the sets written before).
    rng = np.random.default_rng(11)
    g2_val = [run for run in list_runs(args.datasets / "g2") if run.split == "val"]
    turns = {name: [(rng.uniform(0, 360), rng.normal(size=3)) for _ in range(n)]
             for name, n in (("chno", len(UNSEEN_G2)), ("g2-stress", len(g2_val)), ("chno-complexes", len(UNSEEN_S22)))}
    if "chno" in sets:
        dest = args.out / "chno"
        copy_basis(args.datasets / "g2", dest)
        in_g2 = {run.meta.get("name") for run in list_runs(args.datasets / "g2")}
        for k, name in enumerate(UNSEEN_G2):
            atoms = g2[name].copy()
            atoms.rattle(0.04, seed=k)
            atoms.rotate(*turns["chno"][k])
            if name in in_g2:  # a conformer of a training molecule, not a new molecule
                print(f"chno: {name} is in g2; left out")
                continue
            atoms.set_cell([12.0, 12.0, 12.0])
            atoms.center()
            write_run(args.datasets / "g2/0000/input.fdf", atoms, dest / f"{k:04d}")
    for name, source, ids, repeat, rattle, kgrid in (("water64", "water8", ("0001", "0010"), (2, 2, 2), 0.03, None),
                                                     ("si16", "si8", ("0000", "0005"), (2, 1, 1), 0.05, (2, 4, 4)),
                                                     ("si64-gamma", "si8", ("0002", "0007"), (2, 2, 2), 0.03, (1, 1, 1)),
                                                     ("si8-gamma", "si8", SI8_VAL, (1, 1, 1), 0.0, (1, 1, 1)),
                                                     ("si8-k2", "si8", SI8_VAL, (1, 1, 1), 0.0, (2, 2, 2)),
                                                     ("water8-k3", "water8", ("0004", "0009"), (1, 1, 1), 0.0,
                                                      (3, 3, 3))):
        if name not in sets:
            continue
        dest = args.out / name
        copy_basis(args.datasets / source, dest)
        for k, run in enumerate(ids):
            atoms = read_structure(args.datasets / source / run / "input.fdf").atoms.repeat(repeat)
            atoms.rattle(rattle, seed=k)
            write_run(args.datasets / source / "0000/input.fdf", atoms, dest / f"{k:04d}", kgrid)
    if "si2-fcc" in sets:
        dest = args.out / "si2-fcc"
        copy_basis(args.datasets / "si8", dest)
        for k in range(2):
            atoms = strained(bulk("Si", "diamond", a=5.43), 0.01, np.random.default_rng(200 + k))
            atoms.rattle(0.05, seed=200 + k)
            write_run(args.datasets / "si8/0000/input.fdf", atoms, dest / f"{k:04d}", (6, 6, 6))
    if "si8-wide" in sets:
        dest = args.out / "si8-wide"
        copy_basis(args.datasets / "si8", dest)
        for k, run in enumerate(("0009", "0019")):
            atoms = strained(read_structure(args.datasets / "si8" / run / "input.fdf").atoms, 0.015,
                             np.random.default_rng(300 + k))
            atoms.rattle(0.10, seed=300 + k)
            write_run(args.datasets / "si8/0000/input.fdf", atoms, dest / f"{k:04d}", (4, 4, 4))
    if "water8-stress" in sets:
        dest = args.out / "water8-stress"
        copy_basis(args.datasets / "water8", dest)
        k = 0
        for run in ("0004", "0019"):
            for scale, rattle in ((0.92, 0.0), (1.08, 0.0), (1.0, 0.12)):
                atoms = read_structure(args.datasets / "water8" / run / "input.fdf").atoms
                atoms.set_cell(atoms.cell * scale, scale_atoms=True)
                if rattle:
                    atoms.rattle(rattle, seed=k)
                write_run(args.datasets / "water8/0000/input.fdf", atoms, dest / f"{k:04d}")
                k += 1
    if "h2o-stress" in sets:
        dest = args.out / "h2o-stress"
        copy_basis(args.datasets / "h2o", dest)
        for k, run in enumerate(("0004", "0009", "0014")):
            atoms = read_structure(args.datasets / "h2o" / run / "input.fdf").atoms
            atoms.rattle(0.15, seed=100 + k)
            write_run(args.datasets / "h2o/0000/input.fdf", atoms, dest / f"{k:04d}")
    for name, boxes in (("h2o-smallbox", (8.0, 6.0)), ("h2o-largebox", (16.0, 20.0))):
        if name not in sets:
            continue
        dest = args.out / name
        copy_basis(args.datasets / "h2o", dest)
        for k, (run, box) in enumerate((r, b) for b in boxes for r in ("0004", "0009", "0014")):
            atoms = read_structure(args.datasets / "h2o" / run / "input.fdf").atoms
            atoms.set_cell([box] * 3)
            atoms.center()
            write_run(args.datasets / "h2o/0000/input.fdf", atoms, dest / f"{k:04d}")
    for name, bond_sigma, angle_sigma, seed in (("h2o-hot", 0.08, 12.0, 1), ("h2o-warm", 0.06, 9.0, 2)):
        if name in sets:
            copy_basis(args.datasets / "h2o", args.out / name)
            for k, (atoms, *_) in enumerate(drawn_water_molecules(args.datasets, 12, bond_sigma, angle_sigma, seed)):
                write_run(args.datasets / "h2o/0000/input.fdf", atoms, args.out / name / f"{k:04d}")
    if "h2o-stretched" in sets:
        dest = args.out / "h2o-stretched"
        copy_basis(args.datasets / "h2o", dest)
        base = read_structure(args.datasets / "h2o" / "0004" / "input.fdf").atoms  # O, H, H
        for k, bond in enumerate((0.85, 1.20, 1.45, 1.80, 2.30)):
            write_run(args.datasets / "h2o/0000/input.fdf", stretched(base, 0, 1, bond), dest / f"{k:04d}")
        atoms = base.copy()
        atoms.set_angle(1, 0, 2, 160.0)
        write_run(args.datasets / "h2o/0000/input.fdf", atoms, dest / "0005")
    if "water8-stretched" in sets:
        dest = args.out / "water8-stretched"
        copy_basis(args.datasets / "water8", dest)
        box = read_structure(args.datasets / "water8" / "0004" / "input.fdf").atoms
        oxygen, hydrogens = water_molecules(box)[0]
        for k, bond in enumerate((1.20, 1.45, 1.80, 2.30)):
            write_run(args.datasets / "water8/0000/input.fdf", stretched(box, oxygen, hydrogens[0], bond),
                      dest / f"{k:04d}")
    if "g2-stretched" in sets:
        dest = args.out / "g2-stretched"
        copy_basis(args.datasets / "g2", dest)
        val = [run for run in list_runs(args.datasets / "g2") if run.split == "val"][:8]
        for k, run in enumerate(val):
            atoms = read_structure(run.folder / "input.fdf").atoms
            distances = atoms.get_all_distances(mic=True) + 1e3 * np.eye(len(atoms))
            i, j = np.unravel_index(np.argmin(distances), distances.shape)
            for m, factor in enumerate((1.4, 2.0)):
                write_run(args.datasets / "g2/0000/input.fdf", stretched(atoms, i, j, factor * distances[i, j]),
                          dest / f"{2 * k + m:04d}")
    if "si8-displaced" in sets:
        dest = args.out / "si8-displaced"
        copy_basis(args.datasets / "si8", dest)
        base = read_structure(args.datasets / "si8" / "0009" / "input.fdf").atoms
        direction = np.random.default_rng(700).normal(size=3)
        for k, shift in enumerate((0.3, 0.6, 0.9)):
            atoms = base.copy()
            atoms.positions[3] += shift * direction / np.linalg.norm(direction)
            write_run(args.datasets / "si8/0000/input.fdf", atoms, dest / f"{k:04d}", (4, 4, 4))
    if "g2-stress" in sets:
        dest = args.out / "g2-stress"
        copy_basis(args.datasets / "g2", dest)
        for k, run in enumerate(g2_val):
            atoms = read_structure(run.folder / "input.fdf").atoms
            atoms.rattle(0.08, seed=400 + k)
            atoms.rotate(*turns["g2-stress"][k], center="COP")
            atoms.center()
            write_run(args.datasets / "g2/0000/input.fdf", atoms, dest / f"{k:04d}")
    if "water-clusters" in sets:
        dest = args.out / "water-clusters"
        copy_basis(args.datasets / "h2o", dest)
        k = 0
        for run, seed_molecule in (("0004", 0), ("0019", 3)):
            box = read_structure(args.datasets / "water8" / run / "input.fdf").atoms
            for size in (2, 3, 4, 6):
                cluster = water_cluster(box, size, seed_molecule)
                write_run(args.datasets / "h2o/0000/input.fdf", cluster, dest / f"{k:04d}")
                k += 1
    for name, make_defect, seed in (("si-vacancy", remove_random_atom, 500),
                                    ("si-interstitial", add_interstitial, 600)):
        if name not in sets:
            continue
        dest = args.out / name
        copy_basis(args.datasets / "si8", dest)
        for k, (run, repeat, kgrid) in enumerate((("0004", (1, 1, 1), (4, 4, 4)), ("0014", (1, 1, 1), (4, 4, 4)),
                                                  ("0009", (2, 1, 1), (2, 4, 4)), ("0019", (2, 1, 1), (2, 4, 4)))):
            atoms = read_structure(args.datasets / "si8" / run / "input.fdf").atoms.repeat(repeat)
            make_defect(atoms, np.random.default_rng(seed + k))
            atoms.rattle(0.05, seed=seed + k)
            write_run(args.datasets / "si8/0000/input.fdf", atoms, dest / f"{k:04d}", kgrid)
    if "si8-pressure" in sets:
        dest = args.out / "si8-pressure"
        copy_basis(args.datasets / "si8", dest)
        for k, (run, scale) in enumerate((("0004", 0.97), ("0004", 1.03), ("0019", 0.97), ("0019", 1.03))):
            atoms = read_structure(args.datasets / "si8" / run / "input.fdf").atoms
            atoms.set_cell(atoms.cell * scale, scale_atoms=True)
            write_run(args.datasets / "si8/0000/input.fdf", atoms, dest / f"{k:04d}", (4, 4, 4))
    if "water-slab" in sets:
        dest = args.out / "water-slab"
        copy_basis(args.datasets / "water8", dest)
        for k, run in enumerate(("0004", "0019")):
            box = read_structure(args.datasets / "water8" / run / "input.fdf").atoms
            slab = with_vacuum(whole_molecules(box), 10.0)
            write_run(args.datasets / "water8/0000/input.fdf", slab, dest / f"{k:04d}")
    if "si-surface" in sets:
        dest = args.out / "si-surface"
        copy_basis(args.datasets / "si8", dest)
        for k, run in enumerate(("0004", "0019")):
            slab = read_structure(args.datasets / "si8" / run / "input.fdf").atoms.repeat((1, 1, 2))
            slab.wrap()
            slab = with_vacuum(slab, 10.0)
            write_run(args.datasets / "si8/0000/input.fdf", slab, dest / f"{k:04d}", (4, 4, 1))
    if "si-hot" in sets:
        dest = args.out / "si-hot"
        copy_basis(args.datasets / "si8", dest)
        for k, run in enumerate(("0004", "0014")):
            atoms = read_structure(args.datasets / "si8" / run / "input.fdf").atoms
            atoms.rattle(0.15, seed=700 + k)
            write_run(args.datasets / "si8/0000/input.fdf", atoms, dest / f"{k:04d}", (4, 4, 4))
    if "chno-complexes" in sets:
        dest = args.out / "chno-complexes"
        copy_basis(args.datasets / "g2", dest)
        for k, name in enumerate(UNSEEN_S22):
            atoms = s22[name].copy()
            atoms.rotate(*turns["chno-complexes"][k], center="COP")
            atoms.center(vacuum=4.5)
            atoms.pbc = True
            write_run(args.datasets / "g2/0000/input.fdf", atoms, dest / f"{k:04d}")
    print(f"wrote {', '.join(sets)} under {args.out}")


if __name__ == "__main__":
    from study_args import run_script

    run_script(main)
