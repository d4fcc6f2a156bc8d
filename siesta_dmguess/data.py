"""SIESTA run folders -> model-ready samples (structure, graphs, block layout, DM targets).

A run folder holds an fdf, the converged ``<SystemLabel>.DM`` and optionally the
``.HSX``; the species' ``.ion.xml`` files sit in the folder itself or in a
``basis/`` folder next to it (the layout of ``../shared/datasets``). A dataset
folder is a folder of run folders, optionally with an ``index.json`` that names
each run's ``split`` (``train`` / ``val``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .basis import SpeciesBasis, atom_radii, find_basis_files, read_species_basis
from .dm import (BlockLayout, build_geometry, build_layout, read_density_matrix, reference_lookup,
                 siesta_orbital_mask)
from .errors import InputFileError
from .fdf import find_fdf, siesta_dm_path
from .graph import Edges, Neighbours, extend_for_folding, pattern_pairs, pattern_reach, radius_pairs
from .structure import Structure, read_structure

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One structure, ready for the model; targets are present for training and evaluation."""

    name: str
    structure: Structure
    species: np.ndarray  # (N,) index into the model's species list
    mp_edges: Edges  # message-passing graph
    pattern: Edges  # the DM's atom-pair blocks
    layout: BlockLayout
    fold: bool  # the reference (and the natural output) is folded into the unit cell
    target_index: np.ndarray | None = None  # (M,) stored reference element of each flat element, or -1
    target_values: np.ndarray | None = None  # (nnz,) stored reference elements (SIESTA basis)
    meta: dict = field(default_factory=dict)
    in_siesta_pattern: np.ndarray | None = None  # (M,) bool: elements SIESTA stores (dm.siesta_orbital_mask)

    def stored_cell_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(row, column in the unit cell) of every stored element of a folded reference; -1 for the few that
        no flat element reaches (the pattern leaves < 1e-4 of the reference's norm outside it)."""
        covered = self.target_index >= 0
        rows = np.full(self.target_values.size, -1, np.int64)
        cols = rows.copy()
        rows[self.target_index[covered]] = self.layout.rows[covered]
        cols[self.target_index[covered]] = self.layout.cols[covered] % self.layout.no
        return rows, cols


def siesta_pattern(structure: Structure, basis: dict[str, SpeciesBasis]) -> Edges:
    """The atom pairs of SIESTA's DM sparsity pattern for a structure (:func:`~siesta_dmguess.graph.pattern_pairs`
    with each atom's largest orbital and KB-projector radius)."""
    return pattern_pairs(structure.atoms, *atom_radii(structure.labels, basis))


def prepare_sample(structure: Structure, basis: dict[str, SpeciesBasis], species: list[str],
                   mp_cutoff: float, dm_ref=None, name: str = "", meta: dict | None = None, fold_reach: float = 0.0,
                   fold: bool | None = None) -> Sample:
    """Build graphs and the block layout for a structure; map a reference DM onto it if given.

    ``fold`` (default: from the reference, else True) says whether the DM is folded into the cell (Γ-only runs,
    molecules); for a folded periodic structure, pairs up to ``fold_reach`` Å that fold onto stored elements get
    blocks too (:func:`~siesta_dmguess.graph.extend_for_folding`), and so do the pairs of an unfolded reference
    whose supercell reaches beyond SIESTA's pattern (a crystal reference, which stores them).
    """
    missing = sorted(set(structure.labels) - set(species))
    if missing:
        raise InputFileError(f"species {missing} are not covered (known: {species})", structure.source or None)
    index = {s: k for k, s in enumerate(species)}
    spec = np.array([index[l] for l in structure.labels], dtype=np.int64)
    atoms = structure.atoms
    # One neighbour search for every graph below (graph.Neighbours).
    orbital_radius, kb_radius = atom_radii(structure.labels, basis)
    neighbours = Neighbours.search(atoms, max(pattern_reach(orbital_radius, kb_radius), mp_cutoff, fold_reach))
    pattern = pattern_pairs(atoms, orbital_radius, kb_radius, neighbours)  # = siesta_pattern, from the table
    if fold is None:
        fold = dm_ref is None or bool(np.prod(dm_ref.geometry.lattice.nsc) == 1)
    if fold or (dm_ref is not None and np.any(dm_ref.geometry.lattice.nsc > pattern.nsc)):
        # Unfolded, a reference reaching beyond SIESTA's pattern is a crystal's DM on the pairs within the reach
        # (integration/benchmarks/crystal_references.py): it gives those pairs their own targets.
        pattern = extend_for_folding(atoms, pattern, fold_reach, neighbours)
    mp_edges = radius_pairs(atoms, mp_cutoff, neighbours)
    lattice = build_geometry(structure, basis, nsc=pattern.nsc).lattice
    layout = build_layout(structure, basis, pattern, lattice)
    target_index = target_values = None
    if dm_ref is not None:
        target_index, target_values = reference_lookup(layout, dm_ref)
    return Sample(name, structure, spec, mp_edges, pattern, layout, fold, target_index, target_values, meta or {},
                  siesta_orbital_mask(structure, basis, layout, fold, neighbours))


def sampling_period(sample: Sample) -> float | None:
    """The period (Å) with which the run's k-sampling repeats the crystal (the shortest vector of SIESTA's k-grid
    supercell; for a Γ-only run, of the cell), or None for a molecule without periodic images."""
    from .fdf import shortest_period

    length = sample.structure.fdf_settings.get("k_supercell_length")
    if length is None and sample.fold and np.all(sample.structure.atoms.pbc):
        length = shortest_period(sample.structure.atoms.cell)  # no fdf: Γ only, as the prediction assumes
    return length


def dm_range(sample: Sample) -> float:
    """The longest atom-pair distance (Å) in the DM's pattern."""
    vectors = sample.layout.block_vectors(sample.structure)
    return float(np.linalg.norm(vectors, axis=1).max()) if len(vectors) else 0.0


def is_aliased(sample: Sample) -> bool:
    """Whether the run samples the crystal with a period shorter than its DM's range: each stored element then
    sums one orbital pair over images at different distances (a Γ-only DM of a small cell is folded), a DM that
    a model trained only on finely sampled runs has not seen (``Prediction.sampling_reason``)."""
    period = sampling_period(sample)
    return period is not None and period < dm_range(sample)


@dataclass
class RunRecord:
    folder: Path
    id: str
    split: str = ""  # "train" / "val" from index.json; "" for a folder without one
    meta: dict = field(default_factory=dict)

    def in_split(self, split: str | None) -> bool:
        """Whether the run belongs to ``split`` (None: all). A run without a recorded split belongs to every
        split, so ``evaluate`` and ``bench`` (default: val) take all runs of a user's own folder."""
        return split is None or not self.split or self.split == split


def resolve_split(data_dir: str | Path, split: str | None) -> str | None:
    """The split to use in ``data_dir``: ``"auto"`` means ``"val"`` where its index.json records val runs and
    every run (None) where it does not, e.g. a folder of new structures; other values are returned unchanged."""
    if split is None or split == "all":
        return None
    runs = list_runs(data_dir)
    if split != "auto":
        if not any(r.split for r in runs):
            log.warning("%s: its runs record no split (no index.json or run.json), so --split %s takes all %d runs",
                        data_dir, split, len(runs))
        return split
    if any(r.split == "val" for r in runs):
        return "val"
    if any(r.split for r in runs):
        log.warning("%s: its runs' records (index.json or run.json) hold no 'val' split; using all %d runs",
                    data_dir, len(runs))
    return None


def empty_split_error(data_dir: str | Path, split: str | None) -> InputFileError:
    """The error for a split that selects no run, naming the splits the folder's runs do record."""
    from collections import Counter

    recorded = Counter(r.split or "(none)" for r in list_runs(data_dir))
    listed = ", ".join(f"{name} ({n})" for name, n in sorted(recorded.items()))
    return InputFileError(f"no runs in split {split!r}; the runs record {listed}; --split all takes every run",
                          data_dir)


def list_runs(data_dir: str | Path) -> list[RunRecord]:
    """The run folders of a dataset, with their split (from ``index.json`` when present)."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise InputFileError("a file, where a dataset folder (of SIESTA run folders) is expected", data_dir)
    if not data_dir.is_dir():
        raise InputFileError("dataset folder not found", data_dir)
    index = data_dir / "index.json"
    if index.is_file():
        try:
            records = json.loads(index.read_text())
        except json.JSONDecodeError as exc:
            raise InputFileError(f"index.json is not valid JSON ({exc})", index) from exc
        listed = [_indexed_record(data_dir, r, index) for r in _index_entries(records, index)]
        _say_unlisted_runs(index, {r.folder.name for r in listed})
        return listed
    runs = sorted(p.parent for p in data_dir.glob("*/*.fdf"))
    if (data_dir / "input.fdf").is_file() or list(data_dir.glob("*.DM")):
        runs = [data_dir]
    if not runs:
        raise InputFileError("no run folders (sub-folders with an .fdf) found", data_dir)
    return [_record_of_folder(p) for p in sorted(set(runs))]


def _first_of(items, most: int) -> str:
    """The first ``most`` items, and how many more: "a, b, c and 4 more"."""
    return ", ".join(map(str, items[:most])) + (f" and {len(items) - most} more" if len(items) > most else "")


_UNLISTED_SAID: set = set()


def _say_unlisted_runs(index: Path, listed: set[str]) -> None:
    """Warn (once per dataset) about run folders beside an ``index.json`` that it does not list: runs added to a
    copy of a dataset were left out of evaluate, train and bench without a word."""
    unlisted = sorted({p.parent.name for p in index.parent.glob("*/*.fdf")} - listed)
    if unlisted and (index, tuple(unlisted)) not in _UNLISTED_SAID:
        _UNLISTED_SAID.add((index, tuple(unlisted)))
        log.warning("%s does not list %d run folder(s) beside it (%s), so they are left out: if they belong to the "
                    "dataset, add them to it with their split (or give their folders on their own)", index,
                    len(unlisted), _first_of(unlisted, 5))


def _index_entries(records, index: Path) -> list[dict]:
    """The entries of an ``index.json``: a list of objects, each naming its run folder by ``id``."""
    if not isinstance(records, list) or not all(isinstance(r, dict) and "id" in r for r in records):
        raise InputFileError('index.json must be a list of run records, each an object with the run folder\'s "id" '
                             '(e.g. [{"id": "0000", "split": "train"}, ...])', index)
    return records


def _indexed_record(data_dir: Path, record: dict, index: Path) -> RunRecord:
    folder = data_dir / str(record["id"])
    if not folder.is_dir():
        raise InputFileError(f"index.json lists run {record['id']!r}, whose folder {folder} does not exist (remove "
                             f"it from index.json, or the index.json of a partly copied dataset)", index)
    return RunRecord(folder, str(record["id"]), str(record.get("split") or ""), record)


def _record_of_folder(folder: Path) -> RunRecord:
    """A run folder outside an indexed dataset, with its split from the ``run.json`` the datasets keep beside each
    run (the same record as in their index.json), so that copied runs keep the split they were measured in."""
    record_file = folder / "run.json"
    if not record_file.is_file():
        return RunRecord(folder, folder.name)
    try:
        record = json.loads(record_file.read_text())
    except json.JSONDecodeError as exc:
        raise InputFileError(f"run.json is not valid JSON ({exc})", record_file) from exc
    if not isinstance(record, dict):
        raise InputFileError("run.json holds no record (a JSON object) of the run", record_file)
    return RunRecord(folder, folder.name, str(record.get("split") or ""), record)


def run_basis(folder: Path, labels) -> dict[str, SpeciesBasis]:
    """Basis of every species of a run: ``.ion.xml`` in the run folder, else in ``../basis`` (a dataset's shared
    basis folder), else in ``<run>/basis``."""
    labels = sorted(set(labels))
    found = find_basis_files(folder, labels)
    for extra in (folder.parent / "basis", folder / "basis"):
        rest = [l for l in labels if l not in found]
        if rest and extra.is_dir():
            found.update(find_basis_files(extra, rest))
    missing = [l for l in labels if l not in found]
    if missing:
        raise InputFileError(f"no basis file for species {missing} (looked for {missing[0]}.ion.xml here, in "
                             f"../basis and in basis/)", folder)
    return {l: read_species_basis(p) for l, p in found.items()}


def load_run(folder: str | Path):
    """Read a run folder: (structure, basis, reference DM or None, HSX path or None). A ``.DM`` that ``predict``
    wrote into the folder is no reference (:func:`check_dm_is_siestas`), and a run with ghost atoms no model's
    data: errors."""
    from .guard import ghost_problem

    folder = Path(folder)
    fdf = find_fdf(folder)
    structure = read_structure(fdf)
    if ghosts := ghost_problem(structure):  # train learned them as a species of their own, which predict refused
        raise InputFileError(f"{ghosts}: leave the run out", fdf)
    basis = run_basis(folder, structure.labels)
    dm_path = siesta_dm_path(fdf)
    dm = None
    if dm_path.is_file():
        check_dm_is_siestas(dm_path)
        dm = read_density_matrix(dm_path, build_geometry(structure, basis))
    hsx = dm_path.with_suffix(".HSX")  # <SystemLabel>.HSX
    return structure, basis, dm, (hsx if hsx.is_file() else None)


def select_runs(data_dirs, split: str | None = None, max_train: int = 0) -> list[RunRecord]:
    """The runs :func:`load_samples` reads: every run of the datasets (optionally one split); with ``max_train``
    (``train --max-train``), where some run records a ``val`` split (or ``split="train"`` is asked), only the first
    ``max_train`` training runs, in order, which are all that training keeps. Without a val split the hold-out is
    drawn from every run, so all are kept."""
    records, seen = [], set()
    for rec in (r for d in data_dirs for r in list_runs(d)):
        key = rec.folder.resolve()
        if key in seen:  # a folder given twice (or inside two given folders) would train twice, or validate on
            log.warning("%s: given more than once; taken once", rec.folder)  # a structure it trained on
            continue
        seen.add(key)
        if rec.in_split(split):
            records.append(rec)
    if max_train and (split == "train" or any(r.split == "val" for r in records)):
        training = {id(r) for r in [r for r in records if r.in_split("train")][:max_train]}
        records = [r for r in records if r.split == "val" or id(r) in training]
    return records


def load_samples(data_dirs, species: list[str], basis: dict[str, SpeciesBasis], mp_cutoff: float,
                 split: str | None = None, progress: bool = False, with_overlap: bool = False,
                 fold_reach: float = 0.0, max_train: int = 0, species_of=None) -> list[Sample]:
    """Read every run of the given datasets (optionally one split) into samples with targets.

    ``species_of`` (``evaluate``: :func:`~siesta_dmguess.guard.model_species_of` for its model) maps each run's
    species labels onto the model's (``Ow`` → ``O``), as ``predict`` does; without it the labels are the species.

    ``with_overlap`` also reads S and H from the run's ``.HSX`` (where present) into
    ``sample.meta['overlap']`` and ``sample.meta['hamiltonian']`` (eV), aligned with the stored reference
    elements, for Tr(D S) and the band-structure energy Tr(D H).

    ``max_train``: read only the training runs that training keeps (:func:`select_runs`).
    """
    from tqdm.auto import tqdm

    from .overlap import overlap_calculator

    samples, unconfirmed = [], []
    calculator = overlap_calculator(basis) if with_overlap else None  # S for the electron count (tables lazy)
    for rec in tqdm(select_runs(data_dirs, split, max_train), desc="reading runs", disable=not progress):
        structure, run_b, dm, hsx = load_run(rec.folder)
        if species_of is not None:
            names = {label: model or label for label, model in species_of(structure).items()}
            structure = replace(structure, labels=[names[label] for label in structure.labels])
            run_b = {names[label]: b for label, b in run_b.items()}
        check_basis_matches(run_b, basis, rec.folder)
        if dm is None:
            expected = siesta_dm_path(find_fdf(rec.folder)).name
            others = sorted(p.name for p in rec.folder.glob("*.DM"))
            raise InputFileError(f"the run folder has no {expected}, the .DM its fdf's SystemLabel names (SIESTA's "
                                 "converged DM is the reference)" + (
                                     f"; it holds {', '.join(others)}, of another SystemLabel: a run of another "
                                     "fdf?" if others else "") + ": run SIESTA there, or leave the folder out",
                                 rec.folder)
        if not check_converged(rec):
            unconfirmed.append(rec.folder)
        sample = prepare_sample(structure, basis, species, mp_cutoff, dm, name=str(rec.folder),
                                meta={"split": rec.split, **rec.meta}, fold_reach=fold_reach)
        if with_overlap and hsx is not None:
            sample.meta["overlap"], sample.meta["hamiltonian"] = read_hsx_at(hsx, dm)
        if with_overlap:
            check_reference_electrons(sample, hsx, calculator)
        samples.append(sample)
    if unconfirmed:  # said, not refused: a folder of DMs from elsewhere may be all a user has
        log.warning("%d run folder(s) hold no SIESTA output (*.out, *.out.gz) and no record that SIESTA converged "
                    "them (%s): their .DM is taken as converged, though a run stopped at MaxSCFIterations leaves "
                    "one too. Keep SIESTA's output beside the .DM to have it checked", len(unconfirmed),
                    _first_of(unconfirmed, 3))
    return samples


def check_reference_electrons(sample: Sample, hsx: Path | None, calculator=None) -> None:
    """Error if the reference DM does not hold the structure's electrons, Tr(D S) with S computed from the basis
    at the fdf's geometry by ``calculator`` (SIESTA's own DM gives N within 4e-5 on every shared run) and, where
    the run has an ``.HSX``, with its S (within 3e-7). A ``.DM`` or ``.HSX`` of another structure, copied into the
    folder, was trained on or scored against without a word (7.80 of 8 electrons); a ``.DM`` and ``.HSX`` copied
    together agree with each other, so the basis's S, which only the fdf's geometry gives, is checked first."""
    from .evaluate import folded_to_reference
    from .predict import expected_electrons

    checks = []  # (which S, S at the stored elements, which file is another run's where the count is wrong)
    if calculator is not None:  # the fdf's geometry: a .DM and .HSX copied together from another run fail here
        checks.append(("S computed from the basis",
                       folded_to_reference(sample, calculator.flat(sample.structure, sample.layout)), "the .DM"))
    if sample.meta.get("overlap") is not None:  # (an .HSX of other supercells has none)
        # the basis's S, checked first, clears the .DM: then only the .HSX can be another run's
        checks.append((f"the {hsx.name}'s overlap", sample.meta["overlap"],
                       f"the {hsx.name}" if calculator is not None else f"the .DM or the {hsx.name}"))
    electrons = expected_electrons(sample.structure, sample.layout.atomic.sum())
    for where, overlap, files in checks:
        held = float(np.dot(sample.target_values, overlap))
        if abs(held - electrons) > 1e-3 + 1e-6 * electrons:
            raise InputFileError(f"the .DM with {where} holds Tr(D S) = {held:.4f} electrons, but the structure has "
                                 f"{electrons:g}: {files} is not of this run's structure (a converged SIESTA run "
                                 "gives it within 1e-4), or the run's charge is not its fdf's NetCharge. Rerun SIESTA "
                                 "in the folder, or leave it out", Path(sample.name))


def check_converged(rec: RunRecord) -> bool:
    """Error if the run's record (index.json) or its SIESTA output (``*.out``, ``*.out.gz`` in the folder) says the
    SCF did not converge, or that the run moved its atoms (a relaxation or an MD: its .DM is the last geometry's).
    SIESTA writes its ``.DM`` at every iteration, so a run stopped at ``MaxSCFIterations`` or killed midway leaves
    a ``.DM`` that looks like any other but is not the answer a model should learn, or be measured against. A
    folder without an output is taken as converged: the DM is all there is. Returns whether an output or the
    record said that the SCF converged."""
    from .siesta.output import parse_output

    if rec.meta.get("converged") is False:
        raise InputFileError("the run's record (index.json or run.json) says that SIESTA did not converge it, so "
                             "its .DM is not a converged density matrix: rerun it or leave the folder out", rec.folder)
    outputs = False
    for output in sorted([*rec.folder.glob("*.out"), *rec.folder.glob("*.out.gz")]):
        parsed = parse_output(output)
        if not parsed.converged:
            raise InputFileError(f"{output.name} does not say that SIESTA's SCF converged (it did not, or the "
                                 f"output stops before), so the .DM is not a converged density matrix: rerun it or "
                                 f"leave the folder out", rec.folder)
        if len(parsed.scf_histories) > 1:  # the fdf holds the first geometry, the .DM the last one's
            raise InputFileError(f"{output.name} holds {len(parsed.scf_histories)} geometry steps (a relaxation or "
                                 f"MD run), so the .DM is the last step's and not the density matrix of the fdf's "
                                 f"structure: use single-point runs (a final geometry, e.g. from <SystemLabel>"
                                 f".STRUCT_OUT, run again), or leave the folder out", rec.folder)
        outputs = True
    return outputs or rec.meta.get("converged") is True


def check_dm_is_siestas(dm_path: Path) -> None:
    """Error if the run's ``.DM`` looks written by ``predict`` rather than by SIESTA: a backup of it sits beside it
    (``predict`` keeps the DM it replaces as ``<name>.bak``, ``.bak1``, ...) and it is newer than every SIESTA output
    of the folder. ``predict RUN/`` on a converged run does exactly that, and a model evaluated or trained on the
    folder would then be measured against its own prediction. The message names the backup to put back: the newest
    one written before that output (SIESTA writes its ``.DM`` at every SCF iteration, its output last), not the
    first, which after a prediction made before the run is that prediction."""
    backups = sorted(dm_path.parent.glob(dm_path.name + ".bak*"))
    if not backups:
        return
    outputs = [*dm_path.parent.glob("*.out"), *dm_path.parent.glob("*.out.gz")]
    newest_output = max((p.stat().st_mtime for p in outputs), default=None)
    if newest_output is None:
        raise InputFileError(f"a backup ({backups[0].name}) sits beside this .DM and the folder holds no SIESTA output "
                             "(*.out): it looks written by `siesta-dmguess predict`, not converged by SIESTA. Rerun "
                             "SIESTA in the folder", dm_path)
    if dm_path.stat().st_mtime <= newest_output + 1.0:
        times = [dm_path.stat().st_mtime, newest_output, *(b.stat().st_mtime for b in backups)]
        if max(times) - min(times) <= 2.0:  # a folder copied without its file times (cp -r): no order to go by
            log.warning("%s: a backup (%s) sits beside this .DM and both carry the time of the folder's SIESTA "
                        "output (a folder copied without its file times?), so it cannot be told whether it is "
                        "SIESTA's DM or one written by `siesta-dmguess predict`; it is taken as SIESTA's", dm_path,
                        backups[0].name)
        return
    before = [b for b in backups if b.stat().st_mtime <= newest_output + 1.0]
    restore = (f"Put SIESTA's DM back (mv {max(before, key=lambda b: b.stat().st_mtime).name} {dm_path.name}) or "
               "rerun SIESTA in the folder" if before else
               f"No backup ({', '.join(b.name for b in backups)}) is older than the folder's SIESTA output either: "
               "rerun SIESTA in the folder")
    raise InputFileError(f"this .DM is newer than the folder's SIESTA output and a backup of it sits beside it: it "
                         f"looks written by `siesta-dmguess predict`, not converged by SIESTA. {restore}", dm_path)


def read_hsx_at(hsx: Path, dm_ref) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(S, H) from an .HSX, at the reference DM's stored elements (None if the supercells differ). H is in eV
    (sisl converts SIESTA's Ry) and is the spin-unpolarized one (the models' runs; ``check_compatibility`` refuses
    spin-polarized ones)."""
    import warnings

    import sisl

    from .dm import values_at_stored
    from .files import fortran_path

    check_hsx_file(hsx)
    try:
        with warnings.catch_warnings(), fortran_path(hsx) as readable:
            warnings.simplefilter("ignore")
            sile = sisl.get_sile(str(readable))
            overlap = sile.read_overlap(geometry=dm_ref.geometry)
            hamiltonian = sile.read_hamiltonian(geometry=dm_ref.geometry)
    except InputFileError:
        raise
    except Exception as exc:
        raise InputFileError(f"cannot read the overlap and Hamiltonian ({type(exc).__name__}: {exc})", hsx) from exc
    return values_at_stored(dm_ref, overlap), values_at_stored(dm_ref, hamiltonian)


def check_hsx_file(hsx: Path) -> None:
    """Error naming the file if an ``.HSX`` of SIESTA 4.1's layout (``iohs.F``; sisl's "version 0") is cut short or
    corrupt, before sisl reads it: sisl's Fortran reader then reads sizes from records that are not there and
    aborts the whole process in about 2 runs of 5 (a file cut between two records passes a walk of its records).
    The layout: sizes (no_u, no_s, nspin, nnz), gamma, [indxuo], numh, no_u rows of listh, nspin * no_u of H,
    no_u of S, (Qtot, temp), no_u of xij, nspecies, (label, zval, no) per species, one record per orbital of each
    species, na_u, isa. Files of sisl's later versions (a first record of one integer) are only walked."""
    from .files import fortran_records

    records = fortran_records(hsx, ".HSX")
    with open(hsx, "rb") as f:
        def ints(k: int) -> np.ndarray:
            offset, length = records[k]
            f.seek(offset)
            return np.frombuffer(f.read(length), "<i4") if length % 4 == 0 else np.zeros(0, "<i4")

        def need(k: int, what: str, length: int | None = None) -> None:
            if k >= len(records) or (length is not None and records[k][1] != length):
                found = "ends" if k >= len(records) else "is corrupt"
                raise InputFileError(f"the .HSX file is truncated or corrupt (it {found} at {what}, record {k + 1} of "
                                     f"{len(records)})", hsx)

        if records[0][1] != 16:
            return  # a later layout (or another program's): the walk above is all
        no_u, no_s, nspin, nnz = (int(v) for v in ints(0))
        if min(no_u, no_s, nspin, nnz) <= 0:
            need(0, "its sizes", -1)  # (no record has length -1: "is corrupt")
        need(1, "the gamma flag", 4)
        k = 2 if ints(1)[0] else 3  # indxuo for k-point runs
        need(k, "numh", 4 * no_u)
        k += 1 + no_u * (nspin + 2) + 1 + no_u  # listh, H, S, (Qtot, temp), xij
        need(k, "the species count", 4)
        nspecies = int(ints(k)[0])
        need(k + 1, "the species", 32 * nspecies if nspecies > 0 else -1)  # label*20, zval real*8, no
        per_species = ints(k + 1).reshape(nspecies, 8)[:, 7]
        k += 2 + int(per_species.sum())  # one record per orbital of each species
        need(k, "the atom count", 4)
        need(k + 1, "the atoms' species", 4 * int(ints(k)[0]))


def check_basis_matches(run_basis_: dict[str, SpeciesBasis], model_basis: dict[str, SpeciesBasis], where) -> None:
    """Error naming the species whose basis differs between a run and a model."""
    for label, b in run_basis_.items():
        if label not in model_basis:
            from .errors import ModelCompatibilityError

            raise ModelCompatibilityError(f"species {label!r} is not covered by the model "
                                          f"(model species: {sorted(model_basis)})", where)
        if not b.same_orbitals(model_basis[label]):  # the same orbitals, whatever the run calls the species
            from .errors import ModelCompatibilityError

            raise ModelCompatibilityError(
                f"basis of {label!r} differs from the model's: {b.describe()} (hash {b.hash}) vs "
                f"{model_basis[label].describe()} (hash {model_basis[label].hash})", where)
