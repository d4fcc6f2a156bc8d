"""fdf DM-initialisation templates and self-contained run folders.

Two runs that differ only by the template block are the fair comparison: the
block is inlined (not %include'd) after removing any DM-initialisation keys the
original fdf had, so nothing else changes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import InputFileError
from ..fdf import fdf_words, inlined_fdf_text, normalized_fdf_key, species_block, system_label
from .runner import PSEUDO_SUFFIXES, fdf_value, find_pseudopotential

TEMPLATES = ("atomic", "ml", "extrapolation")
# The keys of a run's starting DM, which a template replaces (normalized: fdf.normalized_fdf_key), and
# those that make SIESTA take its atoms from a saved file instead of the fdf: the runs compare guesses for the
# fdf's atoms, which the prediction is made for (and the saved file is not copied into them).
DM_INIT_KEYS = {normalized_fdf_key(k) for k in ("DM.UseSaveDM", "DM.AllowExtrapolation", "DM.History.Depth",
                                                "File.DM.Init", "DM.Init.File", "DM.FormattedFiles",
                                                "MD.UseSaveXV", "MD.UseStructFile")}
# (File.DM.Init: SIESTA 4.1, m_new_dm.F90; DM.Init.File: SIESTA 5)


def template_path(name: str) -> Path:
    """Path of ``dm_init_<name>.fdf`` (installed package data, or ``integration/templates`` in a checkout)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown DM initialisation {name!r}; choose from {TEMPLATES}")
    filename = f"dm_init_{name}.fdf"
    try:
        from importlib.resources import files

        cand = Path(str(files("siesta_dmguess.templates") / filename))
        if cand.is_file():
            return cand
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "integration" / "templates" / filename


def lines_without_keys(fdf_text: str, keys) -> list[str]:
    """The fdf's lines, less those that set any of ``keys`` (in any spelling fdf accepts: ``normalized_fdf_key``)."""
    unwanted = {normalized_fdf_key(key) for key in keys}
    return [line for line in fdf_text.splitlines()
            if not (line.split() and normalized_fdf_key(line.split()[0]) in unwanted)]


def apply_dm_init(fdf_text: str, init: str) -> str:
    """fdf text with its DM-initialisation keys replaced by the template's block."""
    kept = lines_without_keys(fdf_text, DM_INIT_KEYS)
    block = template_path(init).read_text().rstrip()
    return "\n".join(kept + ["", f"# --- siesta-dmguess: DM initialisation '{init}' ---", block]) + "\n"


def _reads_saved_dm(fdf: Path) -> bool:
    """Whether a SIESTA run of ``fdf`` reads a saved DM: ``DM.UseSaveDM`` true at its first occurrence (fdf keeps
    a key's first value, as sisl's reader does)."""
    from ..fdf import fdf_sile, fdf_true

    return fdf_true(fdf_sile(fdf), "DM.UseSaveDM")


def dm_read_note(fdf: Path, dm_path: Path) -> str | None:
    """Why SIESTA (4.1) run from ``fdf``'s folder would not read the DM written to ``dm_path``, or None.

    SIESTA reads ``<SystemLabel>.DM`` from the folder it runs in, and only with ``DM.UseSaveDM T`` (default F).
    A ``DM.UseSaveDM T`` appended after a ``F`` is ignored: the note says where to put it.
    """
    from ..fdf import siesta_dm_init_path

    fdf, dm_path = Path(fdf), Path(dm_path)
    expected = siesta_dm_init_path(fdf)
    if dm_path.resolve() != expected.resolve():
        return f"SIESTA run from {fdf.parent} reads {expected}, not {dm_path}: copy it there before the run"
    if not _reads_saved_dm(fdf):
        said = "sets DM.UseSaveDM F" if fdf_value(fdf, "DM.UseSaveDM") is not None else \
            "does not set DM.UseSaveDM (default F)"
        return (f"{fdf.name} {said}, so SIESTA will not read this DM: put 'DM.UseSaveDM T' on its first line "
                "(fdf keeps a key's first value)")
    return None


def saved_geometry_note(fdf: Path) -> str | None:
    """Where SIESTA run from ``fdf`` takes its atoms from a file rather than the fdf (:func:`saved_geometry_file`),
    a note saying so: ``predict`` predicts for those atoms."""
    from ..fdf import saved_geometry_file

    found = saved_geometry_file(Path(fdf))
    if found is None:
        return None
    key, saved = found
    return (f"{Path(fdf).name} sets {key} T, so SIESTA takes its atoms from {saved.name}: the DM is predicted for "
            f"them, not for the fdf's coordinates")


def enable_dm_read(fdf: Path) -> Path | None:
    """Put ``DM.UseSaveDM T`` on the first line of ``fdf`` unless it already makes SIESTA read a saved DM; the
    new file is written atomically and the original kept as ``<name>.bak``. Returns the backup, or None if the
    fdf was left alone. Only the switch changes: lines that set it F stay, and are overridden, since fdf keeps a
    key's first value."""
    from ..files import atomic_write, move_to_backup

    fdf = Path(fdf)
    if _reads_saved_dm(fdf):
        return None
    text = fdf.read_text()
    backups = []
    atomic_write(fdf, lambda tmp: tmp.write_text("DM.UseSaveDM T   # siesta-dmguess: start from the predicted DM\n"
                                                 + text),
                 before_replace=lambda: backups.append(move_to_backup(fdf)))
    return backups[0]


_GEOMETRY_KEYS = {normalized_fdf_key(k) for k in ("NumberOfAtoms", "LatticeConstant", "AtomicCoordinatesFormat",
                                                   "AtomicCoordinatesOrigin")}
_GEOMETRY_BLOCKS = {normalized_fdf_key(k)
                    for k in ("LatticeVectors", "LatticeParameters", "AtomicCoordinatesAndAtomicSpecies")}


def fdf_with_geometry(fdf_text: str, atoms, labels: list[str]) -> str:
    """The fdf text with its geometry replaced by ``atoms`` (Å, Cartesian), species by ``labels``.

    Everything else (basis, XC, mesh, SCF and k-point settings) is kept, so a
    trajectory's frames are run with exactly the settings of one reference fdf.
    """
    species = [label for _, _, label in species_block(fdf_text)]
    missing = sorted(set(labels) - set(species))
    if missing:
        raise InputFileError(f"species {missing} are not in the fdf's ChemicalSpeciesLabel block ({species})")
    kept, skipping = [], False
    for line in fdf_text.splitlines():
        words = fdf_words(line)
        if skipping:
            skipping = not (words and words[0].lower() == "%endblock")
            continue
        if (words and words[0].lower() == "%block" and len(words) > 1
                and normalized_fdf_key(words[1]) in _GEOMETRY_BLOCKS):
            skipping = "<" not in words  # a block read from a file (%block NAME < FILE) is this one line
            continue
        if words and normalized_fdf_key(words[0]) in _GEOMETRY_KEYS:
            continue
        kept.append(line)
    block = [f"NumberOfAtoms {len(atoms)}"]
    if atoms.cell.rank == 3:
        block += ["LatticeConstant 1.0 Ang", "%block LatticeVectors",
                  *(" ".join(f"{x:.10f}" for x in row) for row in atoms.cell.array), "%endblock LatticeVectors"]
    # Without a cell no lattice at all: SIESTA then builds its automatic cell (a LatticeConstant alone would make
    # a cube of that side, redcel.F)
    block += ["AtomicCoordinatesFormat Ang", "%block AtomicCoordinatesAndAtomicSpecies"]
    block += [" ".join(f"{x:.10f}" for x in pos) + f" {species.index(label) + 1}"
              for pos, label in zip(atoms.positions, labels)]
    block += ["%endblock AtomicCoordinatesAndAtomicSpecies"]
    return "\n".join(kept + ["", "# --- siesta-dmguess: geometry ---", *block]) + "\n"


def species_pseudopotentials(fdf_text: str, fdf: Path, pseudo_dirs=()) -> list[Path]:
    """The pseudopotential of each species of ``fdf_text`` (the text of ``fdf``), looked for next to ``fdf`` and in
    ``pseudo_dirs``; an error naming the first species without one."""
    found = []
    for _, _, label in species_block(fdf_text):
        path = find_pseudopotential(label, [Path(fdf).parent, *map(Path, pseudo_dirs)], PSEUDO_SUFFIXES)
        if path is None:
            raise InputFileError(f"pseudopotential for species {label!r} not found (looked next to the fdf and "
                                 f"in {[str(p) for p in pseudo_dirs]})", Path(fdf).parent / f"{label}.psf")
        found.append(path)
    return found


def prepare_run(src_fdf: str | Path, workdir: str | Path, init: str, dm_file: str | Path | None = None,
                pseudo_dirs=()) -> Path:
    """Copy an fdf (with the DM-init block) and its pseudopotentials into ``workdir``; returns the new fdf.

    ``init='atomic'`` removes any stale ``<SystemLabel>.DM``; ``init='ml'`` copies
    ``dm_file`` to ``<SystemLabel>.DM``.
    """
    src_fdf, workdir = Path(src_fdf), Path(workdir)
    if not src_fdf.is_file():
        raise InputFileError("fdf file not found", src_fdf)
    if init == "ml" and (dm_file is None or not Path(dm_file).is_file()):
        raise InputFileError("the ML initialisation needs a predicted .DM file", dm_file or workdir)
    text = apply_dm_init(inlined_fdf_text(src_fdf), init)  # what it reads in, in its text: not copied
    pseudos = species_pseudopotentials(text, src_fdf, pseudo_dirs)  # all found before the folder is made
    workdir.mkdir(parents=True, exist_ok=True)
    fdf = workdir / "input.fdf"
    fdf.write_text(text)
    for found in pseudos:
        if found.resolve() != (workdir / found.name).resolve():  # in place: kept
            shutil.copy(found, workdir / found.name)
    dm_target = workdir / f"{system_label(fdf)}.DM"
    if init == "atomic":
        dm_target.unlink(missing_ok=True)
    elif init == "ml":
        if Path(dm_file).resolve() != dm_target.resolve():
            shutil.copy(dm_file, dm_target)
    return fdf
