"""Atomic writes (files.atomic_write), used by the .DM writer and the model saver."""

import os

import pytest

from siesta_dmguess.files import atomic_write


def test_a_failing_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "weights.pt"
    target.write_text("previous")

    def half_write(tmp):
        tmp.write_text("trunc")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_write)
    assert target.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pt"]


def test_a_failing_hook_before_the_rename_keeps_the_previous_file(tmp_path):
    target = tmp_path / "card.json"
    target.write_text("previous")

    def refuse():
        raise PermissionError("backup folder is read-only")

    with pytest.raises(PermissionError):
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
