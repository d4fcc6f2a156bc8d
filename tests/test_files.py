"""Atomic writes (files.atomic_write), used by the .DM writer and the model saver."""

import os

import pytest

from siesta_dmguess.errors import InputFileError
from siesta_dmguess.files import atomic_write


def test_a_failing_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "weights.pt"
    target.write_text("previous")

    def half_write(tmp):
        tmp.write_text("trunc")
        raise OSError("disk full")

    with pytest.raises(InputFileError, match="weights.pt: cannot write this file \\(disk full\\)"):
        atomic_write(target, half_write)
    assert target.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pt"]


def test_a_failing_hook_before_the_rename_keeps_the_previous_file(tmp_path):
    target = tmp_path / "card.json"
    target.write_text("previous")

    def refuse():
        raise PermissionError("backup folder is read-only")

    with pytest.raises(InputFileError, match="card.json: cannot write this file \\(backup folder is read-only\\)"):
        atomic_write(target, lambda tmp: tmp.write_text("new"), before_replace=refuse)
    assert target.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.json"]


def test_the_written_file_replaces_the_old_one_with_plain_write_permissions(tmp_path):
    target = tmp_path / "model_config.json"
    target.write_text("old")
    old = os.umask(0o027)
    try:
        atomic_write(target, lambda tmp: tmp.write_text("new"), suffix=".json")
    finally:
        os.umask(old)
    assert target.read_text() == "new"
    assert oct(target.stat().st_mode & 0o777) == oct(0o640)


def test_a_folder_in_the_way_is_named_before_anything_is_written_or_moved(tmp_path, capsys):
    """``predict -o X.DM`` where X.DM is a folder used to move the folder aside as X.DM.bak (or, with
    --overwrite, end in IsADirectoryError); ``train --out FILE`` ended in FileExistsError."""
    from siesta_dmguess.cli import main
    from siesta_dmguess.errors import InputFileError

    (tmp_path / "de.DM").mkdir()
    (tmp_path / "de.DM" / "inside").write_text("kept")
    moved = []
    with pytest.raises(InputFileError, match="de.DM: a folder is in the way"):
        atomic_write(tmp_path / "de.DM", lambda tmp: tmp.write_text("new"), before_replace=lambda: moved.append(1))
    assert not moved and sorted(p.name for p in tmp_path.iterdir()) == ["de.DM"]
    assert (tmp_path / "de.DM" / "inside").read_text() == "kept"
    (tmp_path / "model.txt").write_text("a file")
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "model.txt")]) == 2
    assert "model.txt: a file is in the way" in capsys.readouterr().err
    assert (tmp_path / "model.txt").read_text() == "a file"


def test_a_set_of_files_is_replaced_whole_and_a_ctrl_c_midway_waits_for_the_last(tmp_path):
    """A model's weights and the card holding their sha256: a save interrupted between the two left new weights
    beside the old card, which no loader accepts (train --init M --add-stage --out M then lost M). A failure while
    writing leaves every old file; a Ctrl-C while renaming is delivered after the last rename."""

    from siesta_dmguess.files import atomic_write_set

    a, b = tmp_path / "weights.pt", tmp_path / "card.json"
    a.write_text("old a")
    b.write_text("old b")

    def fail(tmp):
        raise KeyboardInterrupt  # Ctrl-C while the second file is written

    with pytest.raises(KeyboardInterrupt):
        atomic_write_set({a: lambda tmp: tmp.write_text("new a"), b: fail})
    assert (a.read_text(), b.read_text()) == ("old a", "old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.json", "weights.pt"]

    # A Ctrl-C as the renames start, in a fresh interpreter: a test process may hold an MPI library (mpi4py, imported
    # by another test) whose own SIGINT handler would take the signal before Python's
    import subprocess
    import sys

    script = (f"import os, signal, pathlib\nfrom siesta_dmguess.files import atomic_write_set\n"
              f"signal.signal(signal.SIGINT, signal.default_int_handler)  # a SIGINT ignored by the parent is not\n"
              f"a, b = pathlib.Path({str(a)!r}), pathlib.Path({str(b)!r})\n"
              f"try:\n"
              f"    atomic_write_set({{a: lambda t: t.write_text('new a'), b: lambda t: t.write_text('new b')}},\n"
              f"                     before_replace=lambda: os.kill(os.getpid(), signal.SIGINT))\n"
              f"except KeyboardInterrupt:\n"
              f"    print('interrupted after', a.read_text(), b.read_text())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "interrupted after new a new b", done.stderr
