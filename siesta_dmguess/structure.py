"""Reading structures: SIESTA fdf files (through sisl) or anything ASE reads.

A structure is an :class:`ase.Atoms` plus one species label per atom; the label
names the basis (``<label>.ion.xml``) and is the chemical symbol unless an fdf's
``ChemicalSpeciesLabel`` block says otherwise.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from ase import Atoms

from .errors import InputFileError
from .fdf import (check_cell_spans_space, fdf_cell, fdf_sile, fdf_words, find_fdf, inlined_fdf_text,
                  read_fdf_settings, resolve_fdf, saved_geometry_file, species_block, species_rows, system_label)

log = logging.getLogger(__name__)


@dataclass
class Structure:
    atoms: Atoms
    labels: list[str]
    source: str = ""
    fdf_settings: dict = field(default_factory=dict)

    @property
    def periodic(self) -> bool:
        return bool(np.any(self.atoms.pbc))


# No two atoms of a real structure are this close (H2's bond is 0.74 Å); closer ones are a duplicated atom or a
# unit slip, and their orbitals make S nearly singular: a water molecule with one H listed twice got a predicted
# DM of 14423 electrons before its refinement, and SIESTA 4.1 stops on it ("rdiag: Error in Cholesky
# factorisation", checked).
MIN_ATOM_DISTANCE = 0.5  # Å


def closest_pair(atoms: Atoms, within: float) -> tuple[int, int, np.ndarray, float] | None:
    """(i, j, image shift of j, distance) of the two closest atoms, periodic images included, if any are closer
    than ``within`` Å; else None."""
    from ase.neighborlist import neighbor_list

    i, j, shift, d = neighbor_list("ijSd", atoms, within, self_interaction=False)
    if not i.size:
        return None
    k = int(np.argmin(d))
    return int(i[k]), int(j[k]), shift[k], float(d[k])


def check_geometry(structure: Structure, minimum: float = MIN_ATOM_DISTANCE) -> None:
    """Error naming the first atom (or the cell) without finite coordinates, or the closest pair of atoms
    (periodic images included) if any two are closer than ``minimum`` Å. Atoms are counted from 1 in every
    message, as SIESTA and an fdf's rows count them."""
    # A NaN or inf coordinate (a failed conversion, a blown-up MD step) passes every distance test and would
    # only surface as a linear-algebra failure deep in the refinement.
    positions = structure.atoms.positions
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if bad.size:
        i = int(bad[0])
        raise InputFileError(f"atom {i + 1} ({structure.labels[i]}) has coordinates that are not finite numbers "
                             f"({', '.join(str(x) for x in positions[i])}); {bad.size} atom(s) in all",
                             structure.source or None)
    if structure.atoms.pbc.any() and not np.isfinite(structure.atoms.cell.array).all():
        raise InputFileError("the cell has lattice vectors that are not finite numbers", structure.source or None)
    if structure.atoms.pbc.any():
        check_cell_spans_space(structure.atoms.cell.array, structure.source or None)
    pair = closest_pair(structure.atoms, minimum)
    if pair:
        i, j, shift, d = pair
        labels = structure.labels
        image = "" if not shift.any() else f" (its image in cell {tuple(int(x) for x in shift)})"
        raise InputFileError(f"atoms {i + 1} ({labels[i]}) and {j + 1} ({labels[j]}){image} are {d:.3f} Å apart, closer "
                             f"than the {minimum} Å of any real bond: an atom listed twice, or coordinates in another "
                             f"unit?", structure.source or None)


def element_symbol(z: int) -> str | None:
    """Chemical symbol of atomic number ``z`` (None for ghost or out-of-table numbers an fdf may hold)."""
    from ase.data import chemical_symbols

    return chemical_symbols[z] if 0 < z < len(chemical_symbols) else None


def _is_fdf(path: Path) -> bool:
    return path.suffix.lower() == ".fdf"


def _geometry_block_problem(fdf) -> str | None:
    """Which row of the lattice or coordinates block is malformed, where sisl's own error is only an IndexError
    ("list index out of range"); None where these blocks look right."""
    def rows(name):
        block = fdf.get(name)
        if not isinstance(block, list):  # absent, or written as a key rather than a block
            return []
        return [words for words in map(fdf_words, block) if words]

    if rows("Zmatrix") and not rows("AtomicCoordinatesAndAtomicSpecies"):
        return ("its atoms are given as a Zmatrix block, which sisl does not read: give them as "
                "AtomicCoordinatesAndAtomicSpecies, or predict from the <SystemLabel>.STRUCT_OUT SIESTA writes "
                "(read as Γ-only: --fold no for a k-point run)")
    vectors = rows("LatticeVectors")
    if vectors and (len(vectors) != 3 or any(len(row) < 3 for row in vectors)):
        return f"LatticeVectors needs 3 rows of 3 numbers; it has {len(vectors)} rows"
    try:
        n_species = len(species_rows(fdf.get("ChemicalSpeciesLabel") or []))
    except ValueError:
        return "a ChemicalSpeciesLabel row is not 'index atomic-number label'"
    for number, row in enumerate(rows("AtomicCoordinatesAndAtomicSpecies"), 1):
        if len(row) < 4:
            return (f"row {number} of AtomicCoordinatesAndAtomicSpecies has {len(row)} columns; SIESTA needs x, y, "
                    "z and the species index")
        if not row[3].isdigit() or not 1 <= int(row[3]) <= n_species:
            return (f"row {number} of AtomicCoordinatesAndAtomicSpecies has species index {row[3]}, but "
                    f"ChemicalSpeciesLabel defines species 1 to {n_species}")
    return None


def _read_fdf_geometry(fdf, path: Path):
    """(sisl Geometry, whether SIESTA treats it as periodic). sisl 0.20 reads coordinates only with a
    LatticeConstant and lattice vectors; SIESTA also runs without them, so those two cases are read here with the
    cell SIESTA would use (:func:`fdf_cell`). Without a LatticeConstant SIESTA builds its automatic cell
    (``automatic_cell.f``): the atoms' extent plus each species' longest orbital on both sides, plus 10 %, so no
    orbital reaches a periodic image and the run is an isolated molecule (placeholder cell, not periodic)."""
    import sisl

    periodic = fdf.get("LatticeConstant") is not None
    if periodic and (fdf.get("LatticeVectors") or fdf.get("LatticeParameters")):
        return fdf.read_geometry(), True  # sisl reads the lattice itself (and its nsc), or says what is wrong
    cell = fdf_cell(fdf)
    if not periodic:
        fmt = str(fdf.get("AtomicCoordinatesFormat", default="Bohr"))
        if fmt.lower() in ("scaledcartesian", "latticeconstant", "fractional", "scaledbylatticevectors"):
            # SIESTA would scale them by a zero cell
            raise InputFileError(f"AtomicCoordinatesFormat {fmt} needs a lattice, and this fdf has no "
                                 "LatticeConstant", path)
        cell = 1000.0 * np.eye(3)  # a placeholder: sisl needs a cell to read Cartesian coordinates
    fdf.read_lattice = lambda *args, **kwargs: sisl.Lattice(cell)  # hand sisl's reader SIESTA's cell
    return fdf.read_geometry(), periodic


def read_run_structure(fdf: str | Path) -> Structure:
    """The structure a SIESTA run of ``fdf`` computes: :func:`read_structure`, with the atoms and cell of the file
    :func:`saved_geometry_file` names where there is one (a continued relaxation ran from its .XV: the DM
    predicted from the fdf's coordinates took it 8 SCF iterations, the one predicted from the .XV 3)."""
    import sisl

    structure = read_structure(fdf)
    found = saved_geometry_file(fdf)
    if found is None:
        return structure
    key, saved = found
    try:
        geometry = sisl.get_sile(str(saved)).read_geometry()
    except Exception as exc:
        raise InputFileError(f"cannot read the atoms SIESTA takes from it ({key} T): {type(exc).__name__}: {exc}",
                             saved) from exc
    numbers = [abs(int(geometry.atoms[ia].Z)) for ia in range(geometry.na)]
    problem = _other_atoms(structure, numbers)
    if problem:
        raise InputFileError(f"{problem}, which SIESTA takes with {key} T", saved)
    return _with_positions(structure, geometry.xyz, geometry.cell)


def _other_atoms(structure: Structure, numbers) -> str:
    """Why atoms of these atomic numbers are not the fdf's atoms, in their order, or ""."""
    if [int(z) for z in numbers] == [int(z) for z in structure.atoms.numbers]:
        return ""
    return f"holds other atoms than the fdf ({len(numbers)} atoms, the fdf {len(structure.atoms)})"


def _with_positions(structure: Structure, positions, cell=None) -> Structure:
    """The fdf's structure (labels, settings) with other positions and, for a periodic run, another cell."""
    atoms = structure.atoms.copy()
    atoms.positions = positions
    if structure.periodic and cell is not None and np.linalg.matrix_rank(np.asarray(cell)) == 3:
        atoms.set_cell(cell)
    return replace(structure, atoms=atoms)


def as_atoms_of_run(structure: Structure, fdf: Path) -> Structure:
    """A structure file's atoms as the run of ``fdf`` will compute them: with that run's species labels and
    settings (k-points, so the DM is folded or not as SIESTA reads it), and the fdf's cell where the file has
    none. An error where the file holds other atoms than the run or the same in another order (a POSCAR groups
    them by element): SIESTA would read a DM of the wrong atoms (21 SCF iterations on a `water8` box, 12 from its
    atomic guess). A warning where they stand elsewhere: SIESTA runs the fdf's positions."""
    run = read_run_structure(fdf)
    if [int(z) for z in structure.atoms.numbers] != [int(z) for z in run.atoms.numbers]:
        raise InputFileError(f"the run {fdf} reads the DM written here, and this file holds other atoms than its fdf, "
                             f"or the same in another order ({structure.atoms.get_chemical_formula()} against "
                             f"{run.atoms.get_chemical_formula()}): SIESTA would start from a DM of other atoms. "
                             f"Predict from the run itself (siesta-dmguess predict {fdf.parent}), or write the atoms "
                             f"in the fdf's order", Path(structure.source) if structure.source else None)
    cell = structure.atoms.cell if structure.atoms.cell.rank == 3 else None
    moved = _moves(run.atoms.positions - structure.atoms.positions, run.atoms.cell, run.periodic)
    largest = float(moved.max()) if len(moved) else 0.0
    if largest > 0.1:
        log.warning("%s: its atoms stand up to %.2f Å from those of %s, which SIESTA will run with the DM predicted "
                    "for this file's", structure.source, largest, fdf)
    return replace(_with_positions(run, structure.atoms.positions, cell), source=structure.source)


def run_fdf_of(path: str | Path) -> Path | None:
    """The fdf of the run that wrote SIESTA's structure file ``path`` (``<SystemLabel>.XV`` and the like, or a frame
    of its ``.ANI``, ``siesta.ANI@3``): the run folder's fdf whose SystemLabel is the file's name (as SIESTA names
    it, case and all); None for any other file."""
    path = frame_selection(path)[0]
    if path.suffix not in (".XV", ".STRUCT_OUT", *SIESTA_FILE_FORMATS):
        return None
    try:
        fdf = find_fdf(path.parent)
    except InputFileError:
        return None
    return fdf if system_label(fdf) == path.stem else None


def read_structure(path: str | Path) -> Structure:
    """Read an fdf (via sisl, keeping species labels and the lattice) or any file ASE reads; a SIESTA run
    folder stands for its fdf.

    Structures without a cell (e.g. an .xyz molecule) are treated as isolated: no
    periodic images. An fdf with a lattice keeps its periodic box; one without a LatticeConstant is a
    molecule in SIESTA's automatic cell, which no orbital crosses (:func:`_read_fdf_geometry`).
    """
    path = resolve_fdf(path)
    if not frame_selection(path)[0].is_file():
        raise InputFileError("structure file not found", path)
    if _is_fdf(path):
        try:
            fdf = fdf_sile(path)  # (checks the files it reads in first)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                geom, periodic = _read_fdf_geometry(fdf, path)
        except InputFileError:
            raise
        except Exception as exc:
            reason = _geometry_block_problem(fdf) or str(exc)
            raise InputFileError(f"sisl cannot read a geometry from this fdf ({reason})", path) from exc
        if geom is None or geom.na == 0:
            raise InputFileError("the fdf holds no atoms (AtomicCoordinatesAndAtomicSpecies missing?)", path)
        labels = _fdf_labels(fdf, geom)
        if fdf.get("ChemicalSpeciesLabel") is None:  # sisl then names every atom 'unknown'
            raise InputFileError("the fdf has no ChemicalSpeciesLabel block, which SIESTA needs to know the species "
                                 "(index, atomic number, label) of its atoms", path)
        atoms = Atoms(numbers=[int(geom.atoms[ia].Z) for ia in range(geom.na)], positions=geom.xyz,
                      cell=geom.cell if periodic else None, pbc=periodic)
        if fdf.get("AtomicCoordinatesFormat") is None:
            _warn_if_bohr_by_default(atoms, path)
        rows = [r for r in fdf.get("AtomicCoordinatesAndAtomicSpecies") or [] if str(r).split()]
        if len(rows) > len(atoms):  # SIESTA, and sisl, read NumberOfAtoms rows: a miscount drops atoms quietly
            log.warning("%s: NumberOfAtoms is %d but AtomicCoordinatesAndAtomicSpecies has %d rows; SIESTA reads "
                        "the first %d only, and so does this prediction", path, len(atoms), len(rows), len(atoms))
        settings = read_fdf_settings(path)
        if "ghost_species" in settings:  # a ghost species no atom is of changes nothing
            settings["ghost_species"] = [label for label in settings["ghost_species"] if label in labels]
            if not settings["ghost_species"]:
                del settings["ghost_species"]
        return Structure(atoms, labels, str(path), settings)
    frames = read_frames(path)
    atoms = frames[-1]
    file = frame_selection(path)[0]
    if len(frames) > 1:  # ASE's default; say so, since one DM per file is written
        log.warning("%s holds %d structures; predicting the last one. For another, name it as %s@INDEX (%s@0 is "
                    "the first); along all of them, run `siesta-dmguess bench TRAJ --fdf FDF` or the ASE calculator",
                    path, len(frames), file.name, file.name)
    run_fdf = run_fdf_of(path)
    if run_fdf is not None:  # SIESTA's own file in its run folder: the run's settings (k-points, basis) apply
        structure = read_structure(run_fdf)
        problem = _other_atoms(structure, atoms.numbers)
        if not problem:
            log.info("%s: predicting its atoms with the settings of %s, the run that wrote it", path, run_fdf.name)
            return replace(_with_positions(structure, atoms.positions, atoms.cell), source=str(path))
        log.warning("%s %s (%s, beside it), so it is predicted on its own, without the run's settings", path,
                    problem, run_fdf.name)
    if file.suffix == ".ANI":  # SIESTA writes no cell into it, so a crystal's frame would pass for a cluster
        log.warning("%s is a SIESTA .ANI file, which holds no cell: predicting an isolated structure. For a "
                    "periodic run, predict from its fdf, .XV or .STRUCT_OUT (or `bench %s --fdf FDF`, which puts "
                    "each frame into the fdf's cell)", path, path.name)
    if atoms.pbc.any() and atoms.cell.rank < 3:  # a chain or slab without its vacuum vectors: SIESTA has no such
        # cell (it runs three vectors, or a molecule in its own box); predicting a molecule would say nothing
        raise InputFileError(f"periodic along {''.join('abc'[k] for k in np.flatnonzero(atoms.pbc))} (pbc "
                             f"{[bool(x) for x in atoms.pbc]}) but its cell has {atoms.cell.rank} independent "
                             "vector(s): SIESTA runs a cell of three. Give the cell its other vectors (vacuum for a "
                             "chain or slab), or set pbc False for a molecule", path)
    return structure_from_atoms(atoms, source=str(path))


# SIESTA's own structure files that ASE reads but does not recognise by their suffix (it finds .XV and
# .STRUCT_OUT itself): the other STRUCT files share .STRUCT_OUT's layout, and an .ANI is an xyz trajectory in Å.
SIESTA_FILE_FORMATS = {".STRUCT_IN": "struct_out", ".STRUCT_NEXT_ITER": "struct_out", ".ANI": "xyz"}


def frame_selection(path: str | Path) -> tuple[Path, str]:
    """(file, index) of ASE's ``FILE@INDEX`` (``md.traj@-1``, ``md.traj@0:10``: frames of a trajectory, as
    ``ase.io.read`` takes them), or (path, ":") for a plain path (and for an existing file whose name has an @)."""
    path = Path(path)
    base, at, index = str(path).rpartition("@")
    if at and not path.exists() and Path(base).is_file():
        return Path(base), index
    return path, ":"


def read_frames(path: str | Path) -> list[Atoms]:
    """Every frame of a file ASE reads (a structure or a trajectory), or an :class:`InputFileError` naming the
    file and the problem: missing, a folder, unreadable, or without atoms."""
    import ase.io

    path, index = frame_selection(path)
    if not path.exists():
        raise InputFileError("file not found", path)
    if path.is_dir():
        raise InputFileError("a folder, where a structure or trajectory file is expected", path)
    try:
        # parallel=False: under MPI (predict's ranks), ASE would read on rank 0 only and hand every rank that
        # file, so each rank would predict rank 0's structure under its own file's name
        frames = ase.io.read(str(path), index=":", parallel=False, format=SIESTA_FILE_FORMATS.get(path.suffix))
    except KeyError as exc:  # ASE's own message is the bare symbol, e.g. 'Xx'
        raise InputFileError(f"ASE cannot read this structure: unknown chemical symbol {exc}", path) from exc
    except Exception as exc:
        raise InputFileError(f"ASE cannot read this structure ({type(exc).__name__}: {exc})", path) from exc
    if index != ":":  # FILE@INDEX, chosen here so that a wrong index is said as such
        from ase.io.formats import string2index

        count = len(frames)
        try:
            chosen = string2index(index)
            frames = frames[chosen] if isinstance(chosen, slice) else [frames[chosen]]
            if not frames:
                raise IndexError(index)
        except (ValueError, IndexError, TypeError):
            raise InputFileError(f"@{index} is no frame of its {count} (FILE@INDEX takes a frame, e.g. @0 or "
                                 f"@-1, or a slice, e.g. @0:10)", path) from None
    if not frames or any(len(atoms) == 0 for atoms in frames):
        raise InputFileError("the file holds no atoms" if len(frames) <= 1 else "a frame of the file holds no atoms",
                             path)
    return frames


def _warn_if_bohr_by_default(atoms: Atoms, path: Path, shortest: float = 0.7) -> None:
    """An fdf without ``AtomicCoordinatesFormat`` gives its coordinates in Bohr, SIESTA's default; coordinates
    meant in Å then shrink by 0.53 (an O–H bond to 0.51 Å). Say so where two atoms end up closer than any bond
    but H2's (0.74 Å): the DM is still predicted, for the structure SIESTA will run."""
    pair = closest_pair(atoms, shortest)
    if pair:
        i, j, _, d = pair
        log.warning("%s has no AtomicCoordinatesFormat, so SIESTA reads its coordinates in Bohr (its default), "
                    "and atoms %d and %d are then %.2f Å apart: if they are in Å, add "
                    "'AtomicCoordinatesFormat Ang'", path, i + 1, j + 1, d)


def _fdf_labels(fdf, geom) -> list[str]:
    """Each atom's label from the fdf's ChemicalSpeciesLabel block. sisl names an atom after the label inside
    an ``.ion.xml`` it finds next to the fdf, which is the element for a file copied from another run (an
    ``Ow.ion.xml`` made as ``O``); the fdf's label is what names the basis and pseudopotential files."""
    tags = [str(geom.atoms[ia].tag) for ia in range(geom.na)]
    try:
        rows = species_rows(fdf.get("ChemicalSpeciesLabel") or [])
    except ValueError:  # a malformed block: sisl read the geometry, so keep its names
        return tags
    unique = geom.atoms.atom
    if len(rows) != len(unique) or any(z != abs(atom.Z) for (_, z, _), atom in zip(rows, unique)):
        return tags  # sisl's species order is not the block's: keep its names
    return [rows[int(k)][2] for k in geom.atoms.species]


def structure_from_atoms(atoms: Atoms, labels=None, source: str = "") -> Structure:
    """Wrap an in-memory ASE Atoms (e.g. from an ASE calculator) as a Structure. A cell of fewer than three
    independent vectors is none (a molecule), and dropped: ASE's neighbour lists would try to invert it."""
    atoms = atoms.copy()
    if atoms.cell.rank < 3:
        atoms.pbc = False
        atoms.set_cell(np.zeros((3, 3)))
    return Structure(atoms, list(labels) if labels is not None else list(atoms.get_chemical_symbols()), source)


def structure_as_siesta_runs(atoms: Atoms, labels=None) -> Structure:
    """Atoms as SIESTA runs them from the fdf that ASE's ``Siesta`` (or ``fdf_with_geometry``) writes: a cell,
    whenever one is set, is written and SIESTA treats it as periodic, whatever ``atoms.pbc`` says; without a cell
    SIESTA builds its automatic cell, which no orbital crosses (an isolated molecule)."""
    structure = structure_from_atoms(atoms, labels)
    structure.atoms.pbc = structure.atoms.cell.rank == 3
    return structure


def periodic_cell(atoms: Atoms) -> np.ndarray | None:
    """The lattice vectors SIESTA runs ``atoms`` in, or None for a molecule in its automatic cell (the rule of
    :func:`structure_as_siesta_runs`): what the trajectory history follows wrapped atoms across."""
    return atoms.cell.array if atoms.cell.rank == 3 else None


# No atom of an MD or relaxation step moves this far (Å); two atoms of one element swapped in a file do.
LARGEST_STEP = 1.0


def _moves(step: np.ndarray, cell, periodic: bool | None = None) -> np.ndarray:
    """How far each atom moved by ``step`` (Å): where periodic (by default, in a full cell: SIESTA runs it periodic
    whatever ``pbc`` says), the shortest way across the cell's boundaries."""
    from ase.geometry import find_mic

    periodic = cell.rank == 3 if periodic is None else periodic
    return np.linalg.norm(find_mic(step, cell, True)[0] if periodic else step, axis=1)


def _largest_jump(frames: list[Atoms]) -> tuple[int, int, float] | None:
    """(frame, atom, distance) of the first step in which an atom moves more than LARGEST_STEP, across periodic
    boundaries by the shortest way (a wrapped trajectory's jump by a lattice vector is no move), or None."""
    for t in range(1, len(frames)):
        moved = _moves(frames[t].positions - frames[t - 1].positions, frames[t].cell)
        if moved.max() > LARGEST_STEP:
            return t, int(moved.argmax()), float(moved.max())
    return None


# A step in which this many atoms move more than LARGEST_STEP is to another structure (an isomer, an unrelated
# frame), not a step along a trajectory: its history starts SIESTA further off than nothing (ethanol to dimethyl
# ether: 14 SCF iterations from the previous DM, 12 from SIESTA's atomic guess; water8 frames 0004 to 0005, 4 of 24
# atoms over 1 Å: 15 and 12). One atom pulled far (a bond breaking, a scan) still keeps it.
FAR_STEP_ATOMS = 2


def new_structure_reason(previous_positions: np.ndarray, previous_cell, atoms: Atoms) -> str:
    """Why ``atoms`` are not the next step of a trajectory whose last step had ``previous_positions`` (in
    ``previous_cell``; None for no cell), or "": the same elements given in another order (an atom that moved more
    than LARGEST_STEP to within half that of where an atom of its element stood), or another structure altogether
    (:data:`FAR_STEP_ATOMS`). A history followed atom by atom cannot use either. Periodic
    moves are measured in the cell's fractions (a cell scaled with its atoms does not move them) and the shortest
    way across it."""
    from itertools import product

    from scipy.spatial import cKDTree

    periodic = atoms.cell.rank == 3  # SIESTA runs any full cell as periodic, whatever the frame's pbc says
    previous_positions = np.asarray(previous_positions, float)
    if periodic:
        before = previous_positions @ np.linalg.inv(np.asarray(previous_cell, float)) \
            if previous_cell is not None and np.linalg.matrix_rank(np.asarray(previous_cell)) == 3 \
            else atoms.cell.scaled_positions(previous_positions)
        fraction = atoms.cell.scaled_positions(atoms.positions) - before
        step = (fraction - np.rint(fraction)) @ atoms.cell.array
    else:
        step = atoms.positions - previous_positions
    moved = np.linalg.norm(step, axis=1)
    far = np.flatnonzero(moved > LARGEST_STEP)
    if not far.size:
        return ""
    now, sites = atoms.positions, previous_positions  # where the atoms are, and where they stood
    owner = np.arange(len(atoms))
    if periodic:  # both wrapped into the cell, the sites with their 26 neighbouring images
        cell = atoms.cell.array
        now = (atoms.cell.scaled_positions(now) % 1.0) @ cell
        sites = (atoms.cell.scaled_positions(sites) % 1.0) @ cell
        shifts = np.array(list(product((-1, 0, 1), repeat=3))) @ cell
        sites = (sites[None, :, :] + shifts[:, None, :]).reshape(-1, 3)
        owner = np.tile(owner, len(shifts))
    tree = cKDTree(sites)  # one search for all far-moved atoms: O(N log N), not a distance per pair
    for i, near in zip(far, tree.query_ball_point(now[far], LARGEST_STEP / 2)):
        if np.any(atoms.numbers[owner[near]] == atoms.numbers[i]):
            return (f"atom {i + 1} moved {moved[i]:.2f} Å since the previous step, to where another atom of its "
                    "element stood (the atoms given in another order)")
    if far.size >= FAR_STEP_ATOMS:
        return (f"{far.size} atoms moved more than {LARGEST_STEP:g} Å since the previous step (up to "
                f"{moved.max():.2f} Å): another structure, not the next step of a trajectory")
    return ""


class FdfFrames:
    """Frames of a trajectory (ASE Atoms) as Structures in the species and settings of an fdf template.

    ASE frames know elements; the fdf's ChemicalSpeciesLabel names (e.g. ``Ow`` for oxygen) name the basis and
    pseudopotential files, and its settings (k-points) decide the DM layout, so both come from the template.
    """

    def __init__(self, fdf_path: str | Path):
        self.path = resolve_fdf(fdf_path)  # a run folder stands for its fdf
        self.text = inlined_fdf_text(self.path)  # each frame's fdf is written elsewhere: with what it reads in
        self.label_of = {element_symbol(z): label for _, z, label in species_block(self.text)}
        self.settings = read_fdf_settings(self.path)
        self.cell = fdf_cell(fdf_sile(self.path))  # None for a molecule in SIESTA's own cell (a template may hold
        # no coordinates: the frames give them)

    def in_cell(self, frames: list[Atoms], source=None) -> list[Atoms]:
        """The frames, those without a cell in the fdf's lattice: SIESTA's own trajectories (``.ANI``, the
        ``WriteCoorXmol`` ``.xyz``) hold coordinates only, and such a frame ran in SIESTA's automatic cell (a
        crystal as an isolated cluster) where the run it came from had the fdf's."""
        if self.cell is None or all(atoms.cell.rank == 3 for atoms in frames):
            return frames
        log.warning("%s: frames without a cell run in the lattice of %s", source or "trajectory", self.path)
        framed = []
        for atoms in frames:
            if atoms.cell.rank < 3:
                atoms = atoms.copy()
                atoms.set_cell(self.cell)
                atoms.pbc = True
            framed.append(atoms)
        return framed

    def labels(self, atoms: Atoms) -> list[str]:
        return [self.label_of.get(symbol, symbol) for symbol in atoms.get_chemical_symbols()]

    def check_trajectory(self, frames: list[Atoms], source) -> None:
        """Before any frame is run: every frame holds the first one's atoms in its order (a trajectory, whose
        DMs the history guesses extrapolate), and the fdf has a species for each of its elements."""
        first = frames[0].get_chemical_symbols()
        for t, atoms in enumerate(frames[1:], 1):
            if atoms.get_chemical_symbols() != first:
                raise InputFileError(f"frame {t} holds {atoms.get_chemical_formula()} ({len(atoms)} atoms) where frame "
                                     f"0 holds {frames[0].get_chemical_formula()} ({len(first)} atoms): a trajectory's "
                                     f"frames must hold the same atoms in the same order", source)
        missing = sorted(set(first) - set(self.label_of))
        if missing:
            raise InputFileError(f"no species in its ChemicalSpeciesLabel block for the trajectory's element(s) "
                                 f"{missing} (it has {sorted(self.label_of)})", self.path)
        jump = _largest_jump(frames)
        if jump is not None:  # same elements, but atoms swapped (a re-sorted file) or frames far apart
            t, i, d = jump
            log.warning("%s: atom %d moves %.2f Å from frame %d to %d; the history guesses (reuse, extrapolation, "
                        "ml+residual) follow each atom from frame to frame, and start far off where frames hold the "
                        "atoms in another order or lie this far apart", source or "trajectory", i + 1, d, t - 1, t)

    def structure(self, atoms: Atoms) -> Structure:
        structure = structure_as_siesta_runs(atoms, self.labels(atoms))
        structure.fdf_settings = self.settings
        return structure
