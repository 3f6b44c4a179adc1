"""Files written whole or not at all, and file locks: the one place the library does either.

- `atomic_write(path, write)`: `write` fills a temp file beside `path` (named .<name>.<random>.tmp, so
  `TMP_SUFFIX` finds what a killed writer left), which is synced and renamed over `path`: a reader sees the
  old file or the new one, never half of one. `write_json_atomic` / `write_text_atomic` are the common cases.
- `replace_path(src, dst)`: a file or folder moved over `dst` (a folder replaced whole: the old one is first
  renamed to a temp name, so a kill leaves `dst` old, new or absent, and what it left is found by `TMP_SUFFIX`).
- `disk_full(err, where)`: a `DiskFull` (one line: the path, that its disk is full) when `err` or what caused it
  is a full disk or quota, else None.
- `exclusive_lock(path)`: a blocking exclusive lock for the block (e.g. one process converts a model while the
  others wait), a no-op where fcntl is missing (the atomic rename still holds).
- `try_lock(fd, shared)`: a non-blocking lock attempt (the cell folder's liveness lock: a live process holds it).

Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

TMP_SUFFIX = ".tmp"  # atomic_write's temp files: .<name>.<random>.tmp (a kill can leave one)


def umask() -> int:
    """This process's umask, read without changing it (Linux /proc; else set and restore it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write: Callable[[Path], None], mode: Optional[int] = None) -> None:
    """`write(tmp)` into a temp file beside `path`, synced, then renamed over `path`. `mode`: the file's
    permission bits (default 0666 minus the umask, as a plain open gives; mkstemp alone would give 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~umask() if mode is None else mode)
        os.close(fd)
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path, data: Any) -> None:
    """`data` as JSON (indented, non-JSON values as strings) in `path`, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, default=str)))


def write_text_atomic(path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def replace_path(src, dst) -> None:
    """Move the file or folder `src` to `dst`, replacing what is there (a folder: renamed aside, then deleted)."""
    src, dst = Path(src), Path(dst)
    if dst.is_dir() and not dst.is_symlink():
        old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=TMP_SUFFIX))
        os.replace(dst, old)  # (onto the empty temp folder)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(src, dst)


class DiskFull(OSError):
    """A write failed because the disk (or the user's quota) is full; its message names the path."""

    def __str__(self) -> str:
        return self.strerror


LOW_SPACE = 64 * 1024  # bytes: a disk with less free is full for what a cell writes (a checkpoint, a result)


def disk_full(err: BaseException, where) -> Optional[DiskFull]:
    """A DiskFull naming the path (the failed write's, else `where`) when `err`, or an error it came from, is
    ENOSPC or EDQUOT (some writers, torch.save and safetensors, keep only the words or nothing of it: then
    the disk holding `where` has less than LOW_SPACE free); else None."""
    seen, full = set(), None
    while err is not None and id(err) not in seen and full is None:
        seen.add(id(err))
        if isinstance(err, DiskFull):
            return err
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            full = (err.errno, err.filename or where)
        elif "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            full = (errno.ENOSPC, where)
        err = err.__cause__ or err.__context__
    if full is None and free_bytes(where) < LOW_SPACE:
        full = (errno.ENOSPC, where)
    if full is None:
        return None
    code, path = full
    return DiskFull(
        code,
        f"the disk holding {path} is full ({os.strerror(code)}): free space there, or set output_dir to a "
        "folder on another disk",
    )


def free_bytes(path) -> int:
    """Free bytes on the disk holding `path` (its nearest existing folder); a large number if unknown."""
    path = Path(path).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    try:
        return shutil.disk_usage(existing).free if existing else 1 << 62
    except OSError:
        return 1 << 62


def read_json(path) -> Any:
    """The JSON value in `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def exclusive_lock(path) -> Iterator[None]:
    """An exclusive lock on `path` for the block, waiting for it (no-op where fcntl is missing)."""
    if fcntl is None:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def try_lock(fd: int, shared: bool = False) -> bool:
    """Lock the open file `fd` without waiting (shared: readers never block each other); False when another
    process holds it. The lock lasts until `fd` is closed. Needs POSIX fcntl."""
    if fcntl is None:
        raise OSError("file locks need fcntl (POSIX): the cell folder's lock cannot be taken on this platform")
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
