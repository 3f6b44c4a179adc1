"""The result record of a cell: schema, atomic write, read-back, and the state of a cell folder.

`<cell_dir>/result.json` is written once per attempt, atomically (temp file + rename), with status
"completed" or "failed"; a cell folder without it is "running" (its job holds `running.json`) or
"pending". Nothing downstream parses stdout: analysis reads these files.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

RESULT_FILE = "result.json"
RUNNING_FILE = "running.json"
SCHEMA_VERSION = 1
STATES = ("pending", "running", "completed", "failed")


def write_json_atomic(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_result(cell_dir: Path, result: dict) -> Path:
    """Write result.json atomically; `result` must carry cell_id and status."""
    for key in ("cell_id", "status"):
        if key not in result:
            raise ValueError(f"a result needs {key!r}")
    if result["status"] not in ("completed", "failed"):
        raise ValueError(f"result status must be completed or failed, not {result['status']!r}")
    path = Path(cell_dir) / RESULT_FILE
    write_json_atomic(path, {"schema_version": SCHEMA_VERSION, **result})
    return path


class ResultError(ValueError):
    """A result.json that exists but cannot be used (torn, foreign, or from another schema)."""


def read_result(cell_dir: Path) -> Optional[dict]:
    """The cell's result, None if it has none; ResultError if the file is unreadable."""
    path = Path(cell_dir) / RESULT_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise ResultError(f"{path} is not valid JSON ({err}); delete it to re-run the cell") from err
    if not isinstance(data, dict) or "status" not in data or "cell_id" not in data:
        raise ResultError(f"{path} has no status/cell_id: not a tinyablate result")
    return data


def cell_state(cell_dir: Path) -> str:
    """pending | running | completed | failed."""
    try:
        result = read_result(cell_dir)
    except ResultError:
        return "failed"
    if result is not None:
        return result["status"]
    return "running" if (Path(cell_dir) / RUNNING_FILE).exists() else "pending"


def mark_running(cell_dir: Path, info: dict) -> None:
    write_json_atomic(Path(cell_dir) / RUNNING_FILE, info)


def clear_running(cell_dir: Path) -> None:
    try:
        (Path(cell_dir) / RUNNING_FILE).unlink()
    except FileNotFoundError:
        pass
