"""Tests' reader of W&B offline runs: a run's identity, config, history, summary and exit code, from its
`.wandb` file(s) alone, to check what a cell or the analysis logged.

    from wandb_reader import find_offline_runs, read_run, read_runs    # tests/ is on sys.path
    run = read_run(find_offline_runs(cell_dir)[-1])                    # an OfflineRun
    run.config, run.history, run.summary, run.exit_code
    read_runs(wandb_dir, run_id)                                       # every segment of a resumed run, merged

Records come from the library's decoder (`tinyablate.wandb_files.read_records`, whose docstring has the
file layout). Values are JSON strings (`value_json`); keys sit in `key` or, in history and summary records,
in the repeated `nested_key` (one element for a flat key such as "eval/accuracy").
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from tinyablate.wandb_files import read_records

# Run directories: `offline-run-<YYYYMMDD_HHMMSS>-<id>[-<n>]` (offline) or `run-...` (online);
# wandb appends `-<n>` when a resumed run starts within the same second as the previous one.
_RUN_DIR_RE = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-(.+)$")


@dataclass
class OfflineRun:
    """What one `.wandb` file (or several segments of a resumed run, merged) says."""

    # The `.wandb` file(s) this was read from, oldest first.
    paths: List[Path]
    run_id: Optional[str] = None
    project: Optional[str] = None
    entity: Optional[str] = None
    group: Optional[str] = None
    job_type: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    # True when wandb.init got `resume=` (any mode). Offline, wandb cannot know whether the
    # run existed before, so this is set on the first segment of a resumable run too.
    resume_requested: bool = False
    # User config (the "_wandb" bookkeeping key is dropped).
    config: Dict[str, Any] = field(default_factory=dict)
    # One dict per committed history row, with "_step" (plus "_runtime", "_timestamp").
    history: List[Dict[str, Any]] = field(default_factory=list)
    # Final summary after applying every summary record in order.
    summary: Dict[str, Any] = field(default_factory=dict)
    # Exit code of the last exit record; None when the run never finished (crash, running).
    exit_code: Optional[int] = None
    # define_metric records: name -> raw options (e.g. {"summary": {"last": True}}).
    metrics: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # How many records of each type were read (stats, telemetry, files... are only counted).
    record_counts: Dict[str, int] = field(default_factory=dict)


def find_offline_runs(wandb_dir: Union[str, Path], run_id: Optional[str] = None) -> List[Path]:
    """Run directories under `wandb_dir`, oldest first (the `latest-run` link is skipped).

    `wandb_dir` is the `wandb/` folder itself or the folder that holds it (wandb.init's `dir`).
    Online run directories (`run-*`) are included too; their `.wandb` file has the same format.
    With `run_id`, only the segments of that run (a resumed run has one directory per start).
    """
    root = Path(wandb_dir)
    if (root / "wandb").is_dir():
        root = root / "wandb"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        key = _run_dir_sort_key(child, run_id)
        if key is not None:
            found.append((key, child))
    return [path for _, path in sorted(found)]


def _run_dir_sort_key(child: Path, run_id: Optional[str]) -> Optional[tuple]:
    """(timestamp, same-second counter) for a run directory of `run_id`; None to skip it."""
    match = _RUN_DIR_RE.match(child.name)
    if match is None or child.is_symlink() or not child.is_dir():
        return None
    files = sorted(child.glob("run-*.wandb"))
    if not files:
        return None
    file_id = files[0].name[len("run-") : -len(".wandb")]
    if run_id is not None and file_id != run_id:
        return None
    suffix = match.group(2)[len(file_id) :]
    counter = int(suffix[1:]) if suffix[1:].isdigit() else 0
    return match.group(1), counter


def run_file(run_dir_or_file: Union[str, Path]) -> Path:
    """The `run-<id>.wandb` file of a run directory (or the file itself)."""
    path = Path(run_dir_or_file)
    if path.is_file():
        return path
    files = sorted(path.glob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb in {path}, found {len(files)}")
    return files[0]


def read_run(run_dir_or_file: Union[str, Path]) -> OfflineRun:
    """Decode one run directory or `.wandb` file into an `OfflineRun`."""
    path = run_file(run_dir_or_file)
    run = OfflineRun(paths=[path])
    for record in read_records(path):
        _apply_record(run, record)
    return run


def read_runs(wandb_dir: Union[str, Path], run_id: str) -> OfflineRun:
    """Read every segment of `run_id` under `wandb_dir` (one per resume) and merge them."""
    paths = find_offline_runs(wandb_dir, run_id)
    if not paths:
        raise FileNotFoundError(f"no run directory for run id {run_id!r} under {wandb_dir}")
    return merge_runs([read_run(p) for p in paths])


def merge_runs(segments: Sequence[OfflineRun]) -> OfflineRun:
    """Merge segments of one resumed run, oldest first, as the W&B server would see them."""
    merged = OfflineRun(paths=[])
    for seg in segments:
        merged.paths += seg.paths
        for name in ("run_id", "project", "entity", "group", "job_type", "name"):
            setattr(merged, name, getattr(seg, name) or getattr(merged, name))
        merged.tags = seg.tags or merged.tags
        merged.resume_requested = merged.resume_requested or seg.resume_requested
        merged.config.update(seg.config)
        merged.history += seg.history
        merged.summary.update(seg.summary)
        merged.exit_code = seg.exit_code
        merged.metrics.update(seg.metrics)
        for kind, count in seg.record_counts.items():
            merged.record_counts[kind] = merged.record_counts.get(kind, 0) + count
    return merged


def _apply_record(run: OfflineRun, record: Any) -> None:
    """Fold one record into `run`."""
    kind = record.WhichOneof("record_type") or "none"
    run.record_counts[kind] = run.record_counts.get(kind, 0) + 1
    if kind == "run":
        _apply_run(run, record.run)
    elif kind == "config":
        _apply_config(run.config, record.config)
    elif kind == "history":
        run.history.append(_history_row(record.history))
    elif kind == "summary":
        _apply_items(run.summary, record.summary.update, record.summary.remove)
    elif kind == "exit":
        run.exit_code = record.exit.exit_code
    elif kind == "metric":
        run.metrics[record.metric.name or record.metric.glob_name] = _metric_options(record)


def _apply_run(run: OfflineRun, rec: Any) -> None:
    """Copy the identity fields of a RunRecord (empty proto strings become None)."""
    run.run_id = rec.run_id or run.run_id
    run.project = rec.project or run.project
    run.entity = rec.entity or run.entity
    run.group = rec.run_group or run.group
    run.job_type = rec.job_type or run.job_type
    run.name = rec.display_name or run.name
    run.tags = list(rec.tags) or run.tags
    run.resume_requested = run.resume_requested or rec.resumed or rec.resume
    _apply_config(run.config, rec.config)


def _apply_config(config: Dict[str, Any], rec: Any) -> None:
    """Apply a ConfigRecord's updates and removals, dropping W&B's "_wandb" bookkeeping."""
    _apply_items(config, rec.update, rec.remove)
    config.pop("_wandb", None)


def _apply_items(target: Dict[str, Any], updates: Any, removes: Any = ()) -> None:
    """Set each (nested) key of `updates` to its decoded JSON value; delete each of `removes`."""
    for item in updates:
        _set_nested(target, _item_path(item), json.loads(item.value_json))
    for item in removes:
        _pop_nested(target, _item_path(item))


def _history_row(rec: Any) -> Dict[str, Any]:
    """Decode a HistoryRecord into a dict; "_step" falls back to the record's step number."""
    row: Dict[str, Any] = {}
    _apply_items(row, rec.item)
    if "_step" not in row and rec.HasField("step"):
        row["_step"] = rec.step.num
    return row


def _metric_options(record: Any) -> Dict[str, Any]:
    """A MetricRecord as a plain dict (without the metric's name)."""
    from google.protobuf.json_format import MessageToDict  # with wandb.proto, as above

    options = MessageToDict(record.metric, preserving_proto_field_name=True)
    options.pop("name", None)
    return options


def _item_path(item: Any) -> List[str]:
    """The key path of a config/summary/history item: `key`, else the `nested_key` list."""
    return [item.key] if item.key else list(item.nested_key)


def _set_nested(target: Dict[str, Any], path: List[str], value: Any) -> None:
    """target[p0][p1]...[pn] = value, creating intermediate dicts."""
    for part in path[:-1]:
        child = target.get(part)
        if not isinstance(child, dict):
            child = target[part] = {}
        target = child
    target[path[-1]] = value


def _pop_nested(target: Dict[str, Any], path: List[str]) -> None:
    """Delete target[p0]...[pn] if present."""
    for part in path[:-1]:
        target = target.get(part)
        if not isinstance(target, dict):
            return
    target.pop(path[-1], None)
