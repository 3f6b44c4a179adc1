"""tinyablate/files.py: whole files or none, and the locks."""

from __future__ import annotations

import errno
import os

import pytest

from tinyablate.files import (
    TMP_SUFFIX,
    DiskFull,
    atomic_write,
    disk_full,
    exclusive_lock,
    read_json,
    replace_path,
    try_lock,
    umask,
    write_json_atomic,
)


def test_an_interrupted_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "a.json"
    write_json_atomic(path, {"v": 1})
    assert read_json(path) == {"v": 1} and os.stat(path).st_mode & 0o777 == 0o666 & ~umask()

    def fail(tmp):
        tmp.write_text("{half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail)
    assert read_json(path) == {"v": 1}
    assert not list(tmp_path.glob(f".*{TMP_SUFFIX}"))


def test_locks(tmp_path):
    path = tmp_path / "lock"
    with exclusive_lock(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            assert not try_lock(fd, shared=True)  # held exclusively by the block above (another open file)
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert try_lock(fd, shared=True)
    finally:
        os.close(fd)


def test_a_folder_replaces_a_folder_whole_and_a_file_a_file(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "only_old").write_text("1")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "a").write_text("2")
    replace_path(tmp_path / "new", tmp_path / "old")
    assert [p.name for p in (tmp_path / "old").iterdir()] == ["a"] and not (tmp_path / "new").exists()
    (tmp_path / "f.new").write_text("3")
    replace_path(tmp_path / "f.new", tmp_path / "old" / "a")
    assert (tmp_path / "old" / "a").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no temp folder left


def test_a_full_disk_is_named_in_one_line_however_the_writer_said_it(tmp_path):
    full = disk_full(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "a")), tmp_path)
    assert isinstance(full, DiskFull) and str(full).startswith(f"the disk holding {tmp_path / 'a'} is full (")
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert f"the disk holding {tmp_path} is full" in str(disk_full(wrapped, tmp_path))  # no filename: `where`
    said = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")  # safetensors
    assert "\n" not in str(disk_full(said, tmp_path)) and disk_full(said, tmp_path).errno == errno.ENOSPC
    assert disk_full(RuntimeError("unexpected pos 704 vs 598"), tmp_path) is None  # (this disk has room)
    assert disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path) is None
