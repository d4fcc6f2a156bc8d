"""Reading SIESTA's fdf input: its lines as SIESTA's fdf library reads them, the files it reads in, sisl's fdf
reader with the fixes it needs, the settings a model card compares, the k-point grid, and the files a run of it
reads and writes (``<SystemLabel>.DM``). One module per file format, as sisl's siles; the structure an fdf holds
is built from these in :mod:`siesta_dmguess.structure`.
"""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path

import numpy as np

from .errors import InputFileError

# fdf keys that decide the basis and the electronic structure; compared with a model card.
FDF_SETTING_KEYS = ("XC.functional", "XC.authors", "PAO.BasisSize", "PAO.EnergyShift", "Spin", "SpinPolarized",
                    "NonCollinearSpin", "SpinOrbit", "MeshCutoff", "NetCharge")
FDF_ENERGY_KEYS = ("PAO.EnergyShift", "MeshCutoff")


def normalized_fdf_key(key: str) -> str:
    """fdf keys ignore case and the characters ``.``, ``_`` and ``-`` (``kgrid.MonkhorstPack`` = ``KGRID_MONKHORSTPACK``)."""
    return key.lower().replace(".", "").replace("_", "").replace("-", "")


# SIESTA's fdf library (fdf/parse.F90) starts a comment at any of these outside a quoted string or a [list];
# sisl 0.20 knows only "#" after a value ("MeshCutoff 200 Ry ! grid" read as the value "200 Ry ! grid").
FDF_COMMENT_CHARS = "#!;"
_FORTRAN_REAL = re.compile(r"(?<![\w.+\-/])([+-]?(?:\d+\.?\d*|\.\d+))[dD]([+-]?\d+)(?![\w./])")


def fdf_line(line: str, numbers: bool = True) -> str:
    """An fdf line as SIESTA's fdf library reads it: its comment dropped (the line end kept), a UTF-8 byte-order
    mark before it dropped (an editor's, which SIESTA skips), and, with ``numbers``, Fortran exponents
    (``1.0d-5``, which SIESTA reads and Python does not) written with ``e`` (not in a text value: a SystemLabel
    ``1d3`` names SIESTA's files ``1d3.*``)."""
    line = line.lstrip("\ufeff")
    quote, in_list, in_token = "", False, False
    for i, c in enumerate(line):
        if quote:
            quote = "" if c == quote else quote
        elif c in "\"'`" and not in_token:  # a string starts at a token's start only (parse.F90)
            quote = c
        elif c in "[]":
            in_list = c == "["
        elif c in FDF_COMMENT_CHARS and not in_list:
            line = line[:i] + ("\n" if line.endswith("\n") else "")
            break
        in_token = not c.isspace()
    return _FORTRAN_REAL.sub(r"\1e\2", line) if numbers else line


def fdf_words(line: str) -> list[str]:
    """The words of an fdf line (:func:`fdf_line`: its comment dropped)."""
    return fdf_line(line).split()


def species_rows(lines) -> list[tuple[int, int, str]]:
    """(species index, atomic number, label) of the rows of a ``ChemicalSpeciesLabel`` block, in index order."""
    rows = []
    for line in lines:
        words = fdf_words(line)
        if len(words) >= 3:
            rows.append((int(words[0]), int(words[1]), words[2]))
    return sorted(rows)


def species_block(fdf_text: str) -> list[tuple[int, int, str]]:
    """:func:`species_rows` of the ``ChemicalSpeciesLabel`` block written in an fdf's text (not followed into
    ``%include`` files; :func:`read_structure` asks sisl, which does)."""
    lines, inside = [], False
    for line in fdf_text.splitlines():
        words = fdf_words(line)
        if not words:
            continue
        if words[0].lower() == "%block" and len(words) > 1 and normalized_fdf_key(words[1]) == "chemicalspecieslabel":
            inside = True
        elif words[0].lower() == "%endblock":
            inside = False
        elif inside:
            lines.append(line)
    return species_rows(lines)


def fdf_input_files(path: str | Path, missing: list | None = None) -> list[Path]:
    """The fdf and every file it reads in, in order: ``%include FILE``, ``%block NAME < FILE`` and ``KEY < FILE``,
    followed into the files they name (relative to the fdf's folder, as SIESTA's fdf library resolves them).
    Files named but missing are left out, and appended to ``missing`` as (file, the fdf that names it)."""
    path = Path(path)
    seen: list[Path] = []
    todo = [(path, None)]
    while todo:
        current, named_in = todo.pop(0)
        if current in seen:
            continue
        if not current.is_file():
            if missing is not None and named_in is not None:
                missing.append((current, named_in))
            continue
        seen.append(current)
        for line in current.read_text(errors="replace").splitlines():
            words = fdf_words(line)
            if len(words) >= 2 and words[0].lower() == "%include":
                todo.append((path.parent / words[1], current))
            elif "<" in words[:-1]:
                todo.append((path.parent / words[words.index("<") + 1], current))
    return seen


def inlined_fdf_text(path: str | Path) -> str:
    """The fdf's text with what it reads in written in its place, as SIESTA's fdf library reads it (paths relative
    to the fdf's folder, as :func:`fdf_input_files`): ``%include FILE`` by FILE's text, ``%block NAME < FILE`` by
    the block with FILE's lines (less a ``%block``/``%endblock`` pair FILE may hold itself, which SIESTA skips),
    ``KEY < FILE`` by KEY's line or block in FILE. A run made from it needs none of those files beside it (a copy
    of the fdf in a run folder did), and the geometry it holds, wherever it was, is in the text to be replaced
    (``fdf_with_geometry``)."""
    path = Path(path)
    return "\n".join(_inlined_lines(path, path.parent, depth=0)) + "\n"


def _inlined_lines(file: Path, folder: Path, depth: int) -> list[str]:
    if depth > 20:  # SIESTA's fdf library nests includes only so deep; a file including itself would loop
        raise InputFileError("includes nest deeper than 20 files (a file that includes itself?)", file)
    if not file.is_file():
        raise InputFileError("reads in a file that does not exist: SIESTA would stop there", file)
    lines = []
    for line in file.read_text(errors="replace").splitlines():
        words = fdf_words(line)
        if len(words) >= 2 and words[0].lower() == "%include":
            lines += _inlined_lines(folder / words[1], folder, depth + 1)
        elif "<" in words[:-1] and words[0].lower() == "%block":
            name, source = words[1], folder / words[words.index("<") + 1]
            body = [l for l in _inlined_lines(source, folder, depth + 1) if fdf_words(l)]
            if body and fdf_words(body[0])[0].lower() == "%block":
                body = body[1:]
            body = [l for l in body if fdf_words(l)[0].lower() != "%endblock"]
            lines += [f"%block {name}", *body, f"%endblock {name}"]
        elif "<" in words[:-1]:  # KEY (or several) read from another fdf
            source = _inlined_lines(folder / words[words.index("<") + 1], folder, depth + 1)
            for key in words[:words.index("<")]:
                lines += _key_lines(source, key)
        else:
            lines.append(line)
    return lines


def _key_lines(lines: list[str], key: str) -> list[str]:
    """The first line, or block, that sets ``key`` in ``lines`` (fdf keys ignore case, '.', '_' and '-')."""
    want = normalized_fdf_key(key)
    for k, line in enumerate(lines):
        words = fdf_words(line)
        if words and normalized_fdf_key(words[0]) == want:
            return [line]
        if len(words) > 1 and words[0].lower() == "%block" and normalized_fdf_key(words[1]) == want:
            end = next((j for j in range(k + 1, len(lines)) if fdf_words(lines[j])[:1] and
                        fdf_words(lines[j])[0].lower() == "%endblock"), len(lines) - 1)
            return lines[k:end + 1]
    return []


def check_fdf_inputs(path: str | Path) -> None:
    """Error naming a file the fdf reads in (``%include``, ``< FILE``) that does not exist (SIESTA stops there,
    while sisl only warns and reads on without it), or one that reads itself in."""
    missing: list = []
    fdf_input_files(path, missing)
    if missing:
        file, named_in = missing[0]
        raise InputFileError(f"reads in {file}, which does not exist: SIESTA would stop there", named_in)
    # A file that reads itself in (through others or not): sisl would follow it until it runs out of open files.
    _inlined_lines(Path(path), Path(path).parent, depth=0)


def check_fdf_text(path: str | Path) -> None:
    """Error, naming the file, where the fdf or a file it reads in is not text or leaves a ``%block`` open:
    sisl 0.20 stops on the first with a bare UnicodeDecodeError and reads forever on the second."""
    for file in fdf_input_files(path):
        problem = _fdf_text_problem(file)
        if problem:
            raise InputFileError(problem, file)


def _fdf_text_problem(file: Path) -> str | None:
    """What keeps sisl from reading this fdf file, if anything: bytes that are not UTF-8 text, or a ``%block NAME``
    with no ``%endblock`` before the next block or the end of the file (a block piped in, ``%block NAME < FILE``,
    has none)."""
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (f"is not a text fdf: byte 0x{raw[exc.start]:02x} at position {exc.start} is not UTF-8 "
                "(a binary file, or a comment in another encoding)")
    if "\x00" in text:
        return "is not a text fdf: it holds NUL bytes (a binary file?)"
    open_block = None
    for number, line in enumerate(text.splitlines(), 1):
        words = fdf_words(line)
        if not words or words[0].lower() not in ("%block", "%endblock"):
            continue
        if open_block:
            if words[0].lower() == "%block":
                break
            open_block = None
        elif words[0].lower() == "%block" and "<" not in words:
            open_block = (number, " ".join(words[1:2]))
    if open_block:
        return f"%block {open_block[1]} (line {open_block[0]}) has no %endblock"
    return None


@functools.cache
def _fdf_sile_class():
    """sisl's fdf reader with three fixes, written here because sisl 0.20 lacks them, and one shortcut:

    - each line read as SIESTA's fdf library reads it (:func:`fdf_line`): a ``!`` or ``;`` comment after a value,
      a byte-order mark, Fortran ``d`` exponents;

    - a block piped from a file (``%block X < file``) whose file holds the ``%block X`` / ``%endblock X`` lines
      itself: SIESTA's fdf library skips them (checked with SIESTA 4.1: the same coordinates), sisl read them as
      data;
    - sisl's ``_seek`` reopened the file it already held, so its handle was never closed (a ResourceWarning per
      fdf), nor the parent of an ``%include`` file a key was found in;
    - the geometry's species come from the fdf alone (:meth:`read_basis`), not from the run's output files.
    """
    import sisl

    class FdfSile(sisl.io.siesta.fdfSileSiesta):
        # sisl names a sile's logger after its class's module: sisl's, not ours (`-v` showed sisl's file handling)
        __module__ = sisl.io.siesta.fdfSileSiesta.__module__

        def readline(self, comment=False):
            line = super().readline(comment)
            return line if comment else fdf_line(line, numbers=not getattr(self, "_as_text", False))

        def text(self, label, default=None):
            """A key's value as written (``get`` takes "y" or "no" for booleans: a SystemLabel ``y`` was True)."""
            self._as_text = True
            try:
                value = self._r_label(label)
            finally:
                self._as_text = False
            return default if value is None or isinstance(value, list) else str(value).strip()

        def _r_label(self, label):
            value = super()._r_label(label)
            if isinstance(value, list) and value and value[0].split()[0].lower() == "%block":
                value = value[1:]
                ends = [i for i, line in enumerate(value) if line.split()[0].lower() == "%endblock"]
                value = value[:ends[0]] if ends else value
            return value

        def read_basis(self, *args, **kwargs):
            # read_geometry asks for the basis only for each species' Z and label, which the fdf's
            # ChemicalSpeciesLabel holds; sisl's default looks first in the run's .nc, .ion files and .HSX (an
            # HSX read per structure: 20 % of reading one). The package reads the basis itself (basis.py).
            kwargs.setdefault("order", ["fdf"])
            return super().read_basis(*args, **kwargs)

        def _seek(self):
            if not hasattr(self, "fh"):
                return super()._seek()
            while self._popfile():
                pass
            self.fh.seek(0)
            self._line = 0

        def close(self):
            if len(self._fh_tells) == 1:
                while self._popfile():  # a key found in an %include file leaves its parents open
                    pass
            super().close()

    return FdfSile


def fdf_sile(path: str | Path):
    """sisl's fdf reader (:func:`_fdf_sile_class`), for an fdf that :func:`check_fdf_text` passes; its warning
    about sibling output files it could also read is noise here."""
    import sisl

    check_fdf_text(path)
    check_fdf_inputs(path)  # (else sisl warns, with its reader's repr, at each read of the missing file)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sisl.SislWarning)
        return _fdf_sile_class()(str(path))


def read_fdf_settings(path: str | Path) -> dict:
    """The basis- and XC-relevant settings of an fdf (strings as written, energies as "<value> Ry" whatever
    unit the fdf used; absent keys omitted), and ``ghost_species``: the labels the ChemicalSpeciesLabel block
    gives a negative atomic number (SIESTA's ghost atoms: orbitals without nucleus or electrons)."""
    fdf = fdf_sile(path)
    out = {}
    try:
        ghosts = [label for _, z, label in species_rows(fdf.get("ChemicalSpeciesLabel") or []) if z < 0]
    except ValueError:  # a malformed block: read_structure names it
        ghosts = []
    if ghosts:
        out["ghost_species"] = ghosts
    for key in FDF_SETTING_KEYS:
        if key in FDF_ENERGY_KEYS:  # sisl converts energies to eV; cards keep SIESTA's unit and say so
            value = fdf.get(key, unit="Ry")
            if value is not None:
                out[key] = f"{value:.6g} Ry"  # 6 digits: the same energy written in eV or meV compares equal
            continue
        # NetCharge as written: sisl takes a word after it for a unit it cannot convert ("NetCharge 1 e"), where
        # SIESTA reads the number (predict.expected_electrons)
        value = fdf.text(key) if key == "NetCharge" else fdf.get(key)
        if value is not None:
            out[key] = " ".join(str(value).split())
    options, sizes = _basis_options(path, fdf)
    if options:
        out["basis_options"] = options
    if sizes:
        out["basis_sizes"] = sizes
    cell = fdf_cell(fdf)
    supercell, displaced = k_grid_supercell(fdf, cell)
    # More than Γ (the DM then keeps its images; a Γ-only one is folded): SIESTA's gamma_scf (kpoint_scf.F90) is
    # one k-point at k = 0, i.e. a grid supercell of the cell's own volume and no displacement.
    out["kgrid"] = supercell is None or displaced or round(abs(np.linalg.det(supercell))) != 1
    if supercell is not None and cell is not None:
        out["k_supercell_length"] = shortest_period(supercell @ cell)
    return out


# Shapes the basis, but compared on its own (FDF_SETTING_KEYS; PAO.BasisSizes per species).
_COMPARED_BASIS_KEYS = {normalized_fdf_key(k) for k in ("PAO.BasisSize", "PAO.EnergyShift", "PAO.BasisSizes")}


BARE_NUMBER_BASIS_KEYS = {normalized_fdf_key(k) for k in ("PAO.SoftPotential", "PAO.SoftInnerRadius", "PAO.SplitNorm",
                                                           "PAO.SplitNormH")}


def _basis_options(path: str | Path, fdf) -> tuple[dict[str, str], dict[str, str]]:
    """The fdf's other basis settings: every ``PAO.*`` key or block (split norms, soft confinement, polarization,
    a ``PAO.Basis`` block, ...) and ``User.Basis*`` (orbitals read from .ion files), each as sisl reads it ({name: value};
    a block's lines joined by "; "), and the ``PAO.BasisSizes`` block ({species label: size}). Only their names
    are looked for in the text (sisl has no list of an fdf's keys); their values come from sisl, which follows
    ``%include`` and ``<`` as SIESTA does, and keeps a key's first value."""
    names = {}
    for file in fdf_input_files(path):
        for line in file.read_text(errors="replace").splitlines():
            words = fdf_words(line)
            if words and words[0].lower() == "%block" and len(words) > 1:
                name = words[1]
            elif words and not words[0].startswith("%"):
                name = words[0]
            else:
                continue
            key = normalized_fdf_key(name)
            if (key.startswith("pao") or key.startswith("userbasis")) and key not in _COMPARED_BASIS_KEYS:
                names.setdefault(key, name)
    options = {}
    for key, name in names.items():
        # SIESTA reads these with fdf_double (basis_specs.f), a bare number in its own units whatever word
        # follows, where sisl would turn "40 Ry" into eV: keep the number as SIESTA reads it.
        if key in BARE_NUMBER_BASIS_KEYS:
            value = _FORTRAN_REAL.sub(r"\1e\2", ((fdf.text(name) or "").split() or ["(no value)"])[0])
        else:
            value = fdf.get(name)
        if isinstance(value, list):  # a block
            value = "; ".join(" ".join(str(line).split()) for line in value)
        options[name] = " ".join(str(value).split())
    sizes = {}
    for line in fdf.get("PAO.BasisSizes") or []:
        words = str(line).split()
        if len(words) >= 2:
            sizes.setdefault(words[0], words[1])
    return options, sizes


# Keys SIESTA reads with fdf_physical, which stops on a value without a unit ("no unit specified for ..."):
# sisl took the number in the unit asked for (a LatticeConstant of 8 read as 8 Å; SIESTA's unit for it is Bohr).
FDF_PHYSICAL_KEYS = ("LatticeConstant", "MeshCutoff", "PAO.EnergyShift")


def check_units(fdf) -> None:
    """Error, naming the fdf (or the file it includes that holds the line), for a key of
    :data:`FDF_PHYSICAL_KEYS` whose value has no unit."""
    for key in FDF_PHYSICAL_KEYS:
        words = (fdf.text(key) or "").split()
        if len(words) == 1:
            unit = "Bohr (or Ang)" if key == "LatticeConstant" else "Ry"
            raise InputFileError(f"{key} {words[0]} has no unit, and SIESTA stops on it (\"no unit specified for "
                                 f"{key}\"): write the one meant, e.g. {key} {words[0]} {unit}",
                                 _file_defining(Path(str(fdf.file)), key, words))


def _file_defining(fdf: Path, key: str, words: list[str]) -> Path:
    """The first of the fdf's input files (:func:`fdf_input_files`) with the line ``key words``, else the fdf:
    sisl gives a key's value but not the file it came from."""
    wanted = [normalized_fdf_key(key), *words]
    for path in fdf_input_files(fdf):
        for line in path.read_text(errors="replace").splitlines():
            found = fdf_words(line)
            if found and [normalized_fdf_key(found[0]), *found[1:]] == wanted:
                return path
    return fdf


def fdf_cell(fdf) -> np.ndarray | None:
    """The fdf's lattice vectors (Å) as SIESTA reads them (``redcel.F``), or None where SIESTA builds its
    automatic cell (no ``LatticeConstant``: a molecule) or the lattice cannot be read (a partial fdf)."""
    check_units(fdf)
    try:
        alat = fdf.get("LatticeConstant", unit="Ang")
        if alat is None:
            return None  # SIESTA multiplies the vectors by a lattice constant of 0: the cell is automatic
        if not (fdf.get("LatticeVectors") or fdf.get("LatticeParameters")):
            return float(alat) * np.eye(3)  # SIESTA's default vectors; sisl 0.20 refuses this fdf
        cell = np.asarray(fdf.read_lattice().cell, float)
    except Exception:  # sisl raises SileError or ValueError for a malformed lattice
        return None
    check_cell_spans_space(cell, Path(str(fdf.file)))
    return cell


def check_cell_spans_space(cell, source=None) -> None:
    """Error if the lattice vectors span no volume (two of them parallel, or one zero): SIESTA cannot run such a
    cell, and the k-grid and image counts built on it would divide by zero."""
    cell = np.asarray(cell, float)
    if np.isfinite(cell).all() and abs(np.linalg.det(cell)) < 1e-6 * max(np.abs(cell).max(), 1.0) ** 3:
        raise InputFileError(f"the lattice vectors span no volume (cell volume {abs(np.linalg.det(cell)):.3g} Å³: "
                             f"two of them parallel, or one zero); a periodic cell needs three independent vectors",
                             source)


def _monkhorst_pack(block) -> tuple[np.ndarray, list[float]]:
    """(3x3 supercell matrix as written, displacement per row) of a ``kgrid_Monkhorst_Pack`` block: each of its
    three lines holds a supercell vector in cell vectors and a displacement (SIESTA reads the first four numbers).
    Raises ValueError or IndexError for a malformed block."""
    if len(block) < 3:
        raise ValueError(f"{len(block)} lines, not 3")
    rows = [[float(x) for x in line.split()[:4]] for line in block[:3]]
    return np.array([row[:3] for row in rows]), [row[3] if len(row) > 3 else 0.0 for row in rows]


def k_grid_supercell(fdf, cell: np.ndarray | None) -> tuple[np.ndarray | None, bool]:
    """SIESTA's k-point grid as the integer matrix M of its supercell (supercell vector i = sum_j M[i, j] a_j: a
    grid samples the crystal as if it repeated with that period) and whether the grid is displaced from Γ. Γ only
    is the identity. SIESTA's order (``kpoint_t.F90``): a Monkhorst-Pack block, else ``kgrid.Cutoff``, else
    ``kgrid.File`` (a list of k-points, no supercell: None). ``cell`` is the fdf's (:func:`fdf_cell`). Written
    here because sisl reads the keys but does not build SIESTA's grid."""
    block = fdf.get("kgrid_Monkhorst_Pack")  # sisl ignores case and '.', '_', '-' in keys
    if block:
        try:
            matrix, shifts = _monkhorst_pack(block)
        except (ValueError, IndexError) as exc:
            raise InputFileError(f"cannot read its kgrid_Monkhorst_Pack block ({exc})", fdf.file) from exc
        # SIESTA honours a given displacement: "1 0 0 0.5" is one k-point at the zone boundary, not Γ
        return matrix.round().astype(int), any(min(x % 1.0, 1.0 - x % 1.0) > 1e-8 for x in shifts)
    cutoff = fdf.get("kgrid.Cutoff", unit="Ang")
    if cutoff is not None and float(cutoff) > 0:  # SIESTA: a cutoff <= 0 means Γ only
        # setup_cutoff: int(2 rc / |v|) + 1 cells along each vector v of the reduced cell
        from ase.geometry import minkowski_reduce

        if cell is None:
            return None, True
        reduced, op = minkowski_reduce(cell)
        factors = (2.0 * float(cutoff) / np.linalg.norm(reduced, axis=1)).astype(int) + 1
        return factors[:, None] * op, False
    if fdf.get("kgrid.File"):
        return None, True
    return np.eye(3, dtype=int), False


def shortest_period(cell) -> float:
    """Length (Å) of the shortest lattice vector of ``cell`` (after reduction, so a skewed cell is not misread)."""
    from ase.geometry import minkowski_reduce

    return float(np.linalg.norm(minkowski_reduce(np.asarray(cell, float))[0], axis=1).min())


def read_monkhorst_pack(path: str | Path) -> tuple[list[int], list[float]] | None:
    """(grid sizes, displacements in grid units) of an fdf's diagonal ``kgrid_Monkhorst_Pack`` block (what ASE
    writes); None without one or for a non-diagonal block."""
    block = fdf_sile(path).get("kgrid_Monkhorst_Pack")
    if not isinstance(block, (list, tuple)):
        return None
    try:
        matrix, shifts = _monkhorst_pack(block)
    except (ValueError, IndexError):
        return None
    if np.any(matrix != np.diag(np.diag(matrix))):
        return None
    return [int(n) for n in np.diag(matrix)], shifts  # int() truncates, as before the shared parser


def find_fdf(folder: Path) -> Path:
    """The fdf of a SIESTA run folder: ``input.fdf`` if present, else the only ``*.fdf``."""
    folder = Path(folder)
    if (folder / "input.fdf").is_file():
        return folder / "input.fdf"
    fdfs = sorted(folder.glob("*.fdf"))
    if len(fdfs) != 1:
        raise InputFileError(f"expected one .fdf in the run folder, found {len(fdfs)}", folder)
    return fdfs[0]


# SIESTA keeps the first 64 characters of SystemLabel (files.f: label_length) and names its files by them.
LABEL_LENGTH = 64


def system_label(fdf: str | Path) -> str:
    """The fdf's ``SystemLabel`` as SIESTA names its files by it (default ``siesta``; at most 64 characters)."""
    return _label(fdf_sile(fdf))


# fdf's token characters (fdf/parse.F90: letters, digits, $ % & * + - . / @ ^ _ | ~) and string/list delimiters;
# anything else between a key and its value ("SystemLabel = water") separates tokens and is not part of the value.
_VALUE_START = re.compile(r"^[^A-Za-z0-9$%&*+\-./@^_|~\"'`\[]+")


def _label(sile) -> str:
    """:func:`system_label` from an fdf already open (each opening reads the fdf again), as SIESTA 4.1 takes it
    (``reinit.F``): the value from its first token on, its first 64 characters, trailing blanks trimmed. One with a
    space inside is an error, as in SIESTA ("SystemLabel must *NOT* contain any spaces!"), which would stop before
    reading the DM written under that name."""
    label = _VALUE_START.sub("", sile.text("SystemLabel") or "")[:LABEL_LENGTH].rstrip() or "siesta"
    if " " in label:
        one_word = "_".join(label.strip("\"'`").split())
        raise InputFileError(f"SystemLabel {label!r} contains spaces, which SIESTA refuses (it stops at start-up): "
                             f"use one word, e.g. {one_word}", Path(str(sile.file)))
    return label


def fdf_true(sile, key: str) -> bool:
    """A logical fdf key's value (default false): a key on its own is true (SIESTA's fdf_boolean)."""
    value = sile.get(key, False)
    return value is True or value == ""


def saved_geometry_file(fdf: str | Path) -> tuple[str, Path] | None:
    """(key, file) where SIESTA run from ``fdf`` takes its atoms from a file instead of the fdf: ``MD.UseSaveXV T``
    with a ``<SystemLabel>.XV`` beside it (how a relaxation is continued), or ``MD.UseStructFile T`` with a
    ``<SystemLabel>.STRUCT_IN``; else None."""
    fdf = Path(fdf)
    sile = fdf_sile(fdf)
    label = _label(sile)
    for key, suffix in (("MD.UseSaveXV", ".XV"), ("MD.UseStructFile", ".STRUCT_IN")):
        saved = fdf.parent / f"{label}{suffix}"
        if fdf_true(sile, key) and saved.is_file():
            return key, saved
    return None


def siesta_dm_path(fdf: str | Path) -> Path:
    """The DM file a SIESTA run of ``fdf`` writes: ``<SystemLabel>.DM`` beside it (and reads, unless
    :func:`siesta_dm_init_path` says otherwise)."""
    fdf = Path(fdf)
    return fdf.parent / f"{system_label(fdf)}.DM"


def siesta_dm_init_path(fdf: str | Path) -> Path:
    """The DM file a SIESTA run of ``fdf`` reads with ``DM.UseSaveDM T``: ``File.DM.Init`` where the fdf names one
    (4.1's m_new_dm.F90; relative to the folder it runs in), else :func:`siesta_dm_path`."""
    fdf = Path(fdf)
    sile = fdf_sile(fdf)
    return fdf.parent / (sile.text("File.DM.Init") or f"{_label(sile)}.DM")


def resolve_fdf(path: str | Path) -> Path:
    """A SIESTA run folder stands for its fdf (:func:`find_fdf`); any other path is returned as it is."""
    path = Path(path)
    return find_fdf(path) if path.is_dir() else path
