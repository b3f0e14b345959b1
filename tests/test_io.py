"""The writers of sgdph_tools/io.py: what is at the path decides how it is written; one line on failure."""

from __future__ import annotations

import errno
import os
import stat
import tempfile

import pytest
import torch

from sgdph_tools.errors import UserError
from sgdph_tools.io import atomic_save, atomic_write_text, refuse_overwriting_input


def test_a_new_file_gets_the_umask_permissions_and_an_existing_one_keeps_its_own(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text("a\n", tmp_path / "new.txt")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # as open() makes it, not mkstemp's 0600
        os.chmod(path, 0o640)
        atomic_write_text("b\n", path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_text() == "b\n"
    finally:
        os.umask(old)


def test_a_symlink_is_written_through_and_stays_a_link(tmp_path):
    real = tmp_path / "real.pt"
    real.write_text("old")
    link = tmp_path / "link.pt"
    link.symlink_to(real)
    atomic_save({"x": torch.ones(2)}, link)
    assert link.is_symlink() and torch.load(real)["x"].sum() == 2


def test_a_device_is_written_through_not_replaced():
    before = os.stat("/dev/null")
    atomic_save({"x": torch.ones(2)}, "/dev/null")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and (before.st_ino, before.st_rdev) == (after.st_ino, after.st_rdev)


def test_a_folder_is_refused_with_one_line(tmp_path):
    with pytest.raises(UserError, match=r"it is a folder; give a file name") as info:
        atomic_write_text("x", tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "code, message",
    [(errno.EACCES, "is not writable"), (errno.ENOSPC, "no space left"), (errno.EROFS, "is not writable")],
)
def test_write_failures_name_the_path_not_the_temporary(tmp_path, monkeypatch, code, message):
    def failing(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / ".out.pt.abc.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", failing)
    with pytest.raises(UserError, match=message) as info:
        atomic_save({}, tmp_path / "out.pt")
    text = str(info.value)
    assert str(tmp_path / "out.pt") in text and ".tmp" not in text and "\n" not in text


def test_a_full_disk_mid_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = atomic_write_text("old\n", tmp_path / "f.txt")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="no space left"):
        atomic_write_text("new\n", path)
    assert path.read_text() == "old\n" and not list(tmp_path.glob(".*.tmp"))


def test_the_input_is_not_overwritten(tmp_path):
    source = tmp_path / "model.pt"
    source.write_text("x")
    link = tmp_path / "alias.pt"
    link.symlink_to(source)
    for output in (source, link):
        with pytest.raises(UserError, match="is the input file"):
            refuse_overwriting_input(output, source)
    refuse_overwriting_input(tmp_path / "other.pt", source)  # a new path is fine
