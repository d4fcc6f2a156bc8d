"""Atomic file writes and backup names, shared by the ``.DM`` writer, the model saver and the fdf editor.

A file is written under a temporary name in its own folder and renamed into place, so a run killed mid-write
keeps the previous file, never a truncated one. The standard library has the pieces (``tempfile``,
``os.replace``) but no single call that does this.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import InputFileError


def atomic_write(path: str | Path, write, suffix: str = "", before_replace=None) -> None:
    """``write(tmp)`` to a temporary file next to ``path``, then ``before_replace()`` (e.g. keep a backup of the
    existing file) and rename it over ``path``. ``suffix`` ends the temporary name, for writers that choose the
    format by extension (sisl). The file gets the permissions a plain write would (mkstemp's are 0600); on any
    failure the temporary file is removed and ``path`` is left as it was."""
    atomic_write_set({path: write}, suffix=suffix, before_replace=before_replace)


def atomic_write_set(writes: dict, suffix: str = "", before_replace=None) -> None:
    """:func:`atomic_write` for files that only make sense together (a model's weights and the card that holds
    their sha256): each ``write(tmp)`` goes to a temporary file, then all are renamed into place with Ctrl-C and
    SIGTERM held back until the last, so an interrupted save leaves the old set or the new one, never a mix (new
    weights beside the old card: a model no loader accepts)."""
    temporaries = {}
    umask = os.umask(0)  # (read by setting it; put back at once)
    os.umask(umask)
    try:
        for path, write in writes.items():
            path = Path(path)
            # A folder in the way (os.replace would fail only after the work, and a backup would move the folder
            # aside) or no folder to write into: said before any work on the file.
            check_output_file(path)
            try:
                # (the stem shortened: a name near the 255-byte limit would leave no room for the temporary's;
                # the suffix kept: sisl chooses the format by it)
                fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:60]}.", suffix=suffix, dir=path.parent)
            except OSError as exc:  # a read-only folder
                raise _unwritable(path, exc) from exc
            os.close(fd)
            temporaries[path] = tmp
            os.chmod(tmp, 0o666 & ~umask)
            try:
                write(Path(tmp))
            except OSError as exc:  # a full disk
                raise _unwritable(path, exc) from exc
        with _signals_held():
            try:
                path = next(iter(temporaries))
                if before_replace is not None:
                    before_replace()
                for path, tmp in temporaries.items():
                    os.replace(tmp, path)
            except OSError as exc:  # a backup, or a file, that may not be replaced
                raise _unwritable(path, exc) from exc
    finally:
        for tmp in temporaries.values():
            if os.path.exists(tmp):
                os.unlink(tmp)


@contextmanager
def fortran_path(path: str | Path, write: bool = False):
    """A name of ``path`` that sisl's compiled Fortran readers and writers (``.DM``, ``.HSX``) can open. f2py
    passes the file name as ASCII: any other character failed with a bare ``TypeError`` ("function takes exactly 5
    arguments"). Where ``path`` has one, reading goes through a link to it in an ASCII scratch folder, and
    writing to a scratch file that is then copied to ``path``."""
    import shutil

    path = Path(path)
    if str(path).isascii():
        yield path
        return
    scratch = Path(tempfile.mkdtemp(prefix="siesta-dmguess-"))
    try:
        if not str(scratch).isascii():
            raise InputFileError("sisl's SIESTA file routines need ASCII file names, and the temporary folder has "
                                 f"none ({scratch}) to work around this one's: rename it", path)
        name = scratch / ("file" + (path.suffix if path.suffix.isascii() else ""))
        if not write:
            os.symlink(path.resolve(), name)
        yield name
        if write:
            shutil.copyfile(name, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def fortran_records(path: str | Path, kind: str) -> list[tuple[int, int]]:
    """Walk a Fortran sequential file's records (each framed by its byte count, 4 bytes before and after) to its
    end; return each record's (offset of its data, byte count). A file cut short inside a record or overwritten in
    part is an error naming it: sisl's Fortran readers (.HSX) do not report one, they read a wrong size from it
    and abort the whole process ("Error allocating 28932898880 bytes"), which no ``except`` catches."""
    path = Path(path)
    size, records = path.stat().st_size, []
    with open(path, "rb") as f:
        while f.tell() < size:
            head = f.read(4)
            length = abs(int.from_bytes(head, "little", signed=True)) if len(head) == 4 else -1
            # (a negative count marks one part of a record over 2 GiB, gfortran's subrecords)
            if length < 0 or f.tell() + length + 4 > size:
                raise InputFileError(f"the {kind} file is truncated or corrupt (record {len(records) + 1} runs past "
                                     f"its end, at byte {size})", path)
            records.append((f.tell(), length))
            f.seek(length, 1)
            if abs(int.from_bytes(f.read(4), "little", signed=True)) != length:
                raise InputFileError(f"the {kind} file is corrupt (the byte counts framing record {len(records)} "
                                     "disagree)", path)
    if not records:
        raise InputFileError(f"the {kind} file is empty", path)
    return records


@contextmanager
def _signals_held():
    """Ctrl-C (SIGINT) and SIGTERM wait until the block is done, then take effect as they would have. Python runs
    signal handlers in the main thread whichever thread the signal arrives at (torch's threads, say), so the
    handlers are swapped, not the signal mask; elsewhere than the main thread nothing is held."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived = []
    previous = {sig: signal.signal(sig, lambda signum, frame: arrived.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) is not None}  # None: a handler set outside Python, which could not be put back
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if arrived:
            signal.raise_signal(arrived[0])


def check_output_file(path: str | Path, image: bool = False) -> None:
    """:func:`check_output_folder`, and error if a folder is in the way of the file or (``image``) its suffix is no
    image format matplotlib writes: checked before the work whose result it holds."""
    check_output_folder(path)
    path = Path(path)
    if path.is_dir():
        raise InputFileError("a folder is in the way: a file is to be written here", path)
    if image:
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()
        if path.suffix.lower().lstrip(".") not in formats:
            raise InputFileError(f"the image's format is given by its suffix: one of "
                                 f"{', '.join('.' + f for f in sorted(formats))}", path)


def _unwritable(path: Path, exc: OSError):
    return InputFileError(f"cannot write this file ({exc.strerror or exc})", path)


def check_output_folder(path: str | Path) -> None:
    """Error naming the folder ``path`` is to be written into, if it does not exist (checked before the work that
    makes the file, not when writing it)."""
    folder = Path(path).parent
    if not folder.is_dir():
        raise InputFileError("the output folder does not exist", folder)


def make_output_folder(path: str | Path, option: str = "--out", create: bool = True) -> Path:
    """Create the output folder ``path`` (and its parents), or error naming it: a file in the way, or no right to
    create it. Called before the work whose results go there, not when the first result is written; with
    ``create=False`` only the file in the way is checked (for a folder made once its inputs are known good)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputFileError(f"a file is in the way of the output folder ({option})", path)
    if not create:  # as mkdir would fail: the nearest existing folder above is a file
        existing = next((p for p in path.parents if p.exists()), None)
        if existing is not None and not existing.is_dir():
            raise InputFileError(f"cannot create the output folder ({option}): {existing} is a file", path)
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent that is a file, a read-only folder
        raise InputFileError(f"cannot create the output folder ({option}): {exc.strerror}", path) from exc
    return path


def backup_path(path: str | Path) -> Path:
    """First free ``<name>.bak``, ``<name>.bak1``, ... next to ``path``."""
    path = Path(path)
    cand = path.with_name(path.name + ".bak")
    n = 1
    while cand.exists():
        cand = path.with_name(f"{path.name}.bak{n}")
        n += 1
    return cand


def move_to_backup(path: str | Path) -> Path:
    """Rename ``path`` to :func:`backup_path`'s name (kept, never deleted); return that name."""
    backup = backup_path(path)
    try:
        os.replace(path, backup)
    except OSError as exc:  # a read-only folder: the file stays where it was
        raise _unwritable(backup, exc) from exc
    return backup
