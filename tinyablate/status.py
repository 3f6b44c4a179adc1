"""The state of every cell of a sweep, read from its folder (no scheduler needed).

    python -m tinyablate.status runs/embedded          # every cell folder under a sweep folder

States: pending (not started, or queued), running (a live process holds the cell's lock), interrupted
(started, then killed, stopped by Ctrl-C or cancelled without a result: a re-run resumes it from the
checkpoint its row names), completed, failed (with the log to read). A completed GRPO cell whose training
collapsed (result.json's metrics.collapse) gets a line saying since which step and why; the count of cells
that ended collapsed closes the table. Exit code 1 when a cell failed (the launcher's `status=true` too).
The launcher prints the same table at the end of a sweep and for `status=true`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

from .cell_folder import CHECKPOINTS_DIR, SPEC_FILE, CellFolder, ResultError, last_complete_checkpoint
from .console import collapse_note


def cell_row(cell_dir: Path, cell_id: Optional[str] = None, note: str = "") -> dict:
    """One line of the status table: state, accuracy, base, params, the log and error of a failure, and a completed
    GRPO cell's collapse (`collapse`: a few words, "" without one; `collapsed`: it ended collapsed)."""
    folder = CellFolder(cell_dir)
    row = {
        "cell_id": cell_id or folder.name,
        "state": "pending",
        "accuracy": None,
        "base": None,
        "params": None,
        "log": None,
        "error": None,
        "note": note,
        "collapse": "",
        "collapsed": False,
    }
    try:
        result = folder.read_result()
    except ResultError as err:
        result, row["state"], row["error"] = None, "failed", str(err)
    if result is None and row["error"] is None:
        row["state"] = folder.state()
        if row["state"] == "interrupted" and not note:
            row["note"] = resume_note(folder)
    elif result is not None and result.completed:
        row.update(
            state="completed",
            accuracy=result.metrics.accuracy,
            base=result.metrics.base_accuracy,
            params=result.adapter.trainable_params,
            collapse=collapse_note(result.metrics.collapse.to_dict() if result.metrics.collapse else None),
            collapsed=result.collapsed,
        )
    elif result is not None:
        row.update(state="failed", error=f"{result.error.type}: {result.error.message}"[:160])
    launch = folder.read_launch()
    if launch:
        row["log"] = launch.get("stderr")
        row["job_id"] = launch.get("job_id")
    return row


def resume_note(folder: CellFolder) -> str:
    """Where an interrupted cell resumes: its last complete checkpoint, or the start."""
    world_size = folder.read_running().get("world_size")
    max_steps = ((folder.read_spec() or {}).get("config") or {}).get("algo", {}).get("max_steps")
    last = last_complete_checkpoint(
        folder.file(CHECKPOINTS_DIR),
        world_size if isinstance(world_size, int) else 1,
        max_step=max_steps if isinstance(max_steps, int) else None,
    )
    return f"resumes from {last.name}" if last else "no checkpoint yet: starts over"


def live_job(cell_dir: Path) -> Optional[str]:
    """A description of the job that is running or queued for this cell right now, else None.

    SLURM: the job id of launch.json still known to `squeue`. Local: the pid in running.json alive on
    this host. Used so that re-running a sweep never starts a second copy of a live cell.
    """
    folder = CellFolder(cell_dir)
    holder = folder.holder()  # the cell's lock: held exactly while a live process runs it, on any host
    if holder:
        return f"{holder} running"
    launch = folder.read_launch()
    if launch.get("backend") == "slurm" and shutil.which("squeue"):
        try:
            out = subprocess.run(
                ["squeue", "-h", "-j", str(launch["job_id"]), "-o", "%T"], capture_output=True, text=True, timeout=60
            )
        except subprocess.TimeoutExpired:
            return f"SLURM job {launch['job_id']} (squeue did not answer: assumed live)"
        state = out.stdout.strip().splitlines()
        if out.returncode == 0 and state:
            return f"SLURM job {launch['job_id']} {state[0].lower()}"
    running = folder.read_running()
    if running.get("host") == socket.gethostname() and running.get("pid"):
        try:
            os.kill(int(running["pid"]), 0)
        except PermissionError:
            pass  # it exists, owned by someone else
        except (ProcessLookupError, ValueError):
            return None
        return f"process {running['pid']} running"
    return None


def format_table(rows: list[dict]) -> str:
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    lines = [f"{'state':<11} {'accuracy':>8} {'base':>6} {'params':>9}  cell"]
    for r in rows:
        acc = "" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        base = "" if r["base"] is None else f"{r['base']:.3f}"
        params = "" if r["params"] is None else f"{r['params']:,}"
        extra = f"  [{r['note']}]" if r["note"] else ""
        lines.append(f"{r['state']:<11} {acc:>8} {base:>6} {params:>9}  {r['cell_id']}{extra}")
        if r["state"] == "failed":
            lines.append(f"{'':<11} error: {r['error']}")
            if r["log"]:
                lines.append(f"{'':<11} log: {r['log']}")
        if r.get("collapse"):
            lines.append(f"{'':<11} {r['collapse']}")
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    collapsed = sum(bool(r.get("collapsed")) for r in rows)
    if collapsed:
        summary += f"; {collapsed} of the completed collapsed in training (left out of the analysis' means)"
    lines.append(f"{len(rows)} cells: {summary}")
    return "\n".join(lines)


def sweep_cell_dirs(sweep_dir: Path) -> list[Path]:
    """The cell folders of a sweep folder (those the launcher or a cell created: they hold spec.json)."""
    return sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and CellFolder(p).file(SPEC_FILE).exists())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Show the state of every cell under sweep folders.")
    parser.add_argument("sweep_dirs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for sweep_dir in args.sweep_dirs:
        if not sweep_dir.is_dir():
            print(f"{sweep_dir}: no such sweep folder", file=sys.stderr)
            return 2
        rows += [cell_row(d) for d in sweep_cell_dirs(sweep_dir)]
    print(format_table(rows))
    return 1 if any(r["state"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
