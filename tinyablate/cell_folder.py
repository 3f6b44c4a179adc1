"""The cell folder: every file in it, the result record (typed and versioned), its state, the launch record.

    folder = CellFolder.of(spec)                  # <output_dir>/<sweep>/<cell_id>/
    folder.state()                                # pending | running | completed | failed
    result = folder.read_result()                 # a Result, None before the first attempt ends

A cell folder holds:

    spec.json            {"cell_id", "config"}: the cell's spec (written at submission and when it starts)
    launch.json          the launcher's record: backend, job_id, stdout, stderr, submitted, argv
    running.json         while a process runs it: pid, host, started, slurm_job_id, world_size
    result.json          the `Result` below: written once per attempt, atomically (temp file + rename)
    result.<status>-<unix time>.json   an earlier attempt's result, moved aside when the cell is retried
    metrics.jsonl, summary.json        the metrics sink (tinyablate/logging.py)
    eval_samples.jsonl   one record per evaluation problem of the final evaluation
    adapter/             the trained adapter in PEFT's LoRA format; adapter_native/ TinyLoRA/LoRA-XS's own
    checkpoints/         adapter-only training checkpoints (a restarted cell resumes from the last)
    wandb/               the W&B run (unless logger.dir puts it elsewhere)

The cell (cell.py), status.py, the launcher and analysis/ use this module for every one of these
paths and for reading and writing records; nothing else names them. Nothing downstream parses stdout.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Optional

from .config import CellSpec, cell_id, spec_to_dict

SCHEMA_VERSION = 1  # of result.json; readers refuse other versions (bump it when a field changes meaning)
STATES = ("pending", "running", "completed", "failed")
SPEC_FILE, LAUNCH_FILE, RUNNING_FILE, RESULT_FILE = "spec.json", "launch.json", "running.json", "result.json"
METRICS_FILE, SUMMARY_FILE, EVAL_SAMPLES_FILE = "metrics.jsonl", "summary.json", "eval_samples.jsonl"
ADAPTER_DIR, ADAPTER_NATIVE_DIR, CHECKPOINTS_DIR = "adapter", "adapter_native", "checkpoints"
CELL_MARKERS = (RESULT_FILE, SPEC_FILE, RUNNING_FILE)  # a folder holding one of these is a cell folder


# -- JSON on disk ---------------------------------------------------------------------------------
def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as JSON to `path` through a temp file and a rename: readers never see half a file."""
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


def read_json(path: Path) -> Any:
    """The JSON value in `path`, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# -- the result record ----------------------------------------------------------------------------
class ResultError(ValueError):
    """A result that exists but cannot be used (torn, foreign, another schema, a field missing)."""


class _Record:
    """A JSON object with typed fields: `from_dict` checks it (ResultError names what is wrong).

    A field added later is Optional (older results lack it), so SCHEMA_VERSION stays; keys a record
    does not know (written by a newer version) are kept in `extra` and written back.
    """

    omit_none = False  # True: fields that are None are left out of the JSON (Result's sections, Timing)

    @classmethod
    def from_dict(cls, raw: Any, where: str):
        if not isinstance(raw, dict):
            raise ResultError(f"{where} is {type(raw).__name__}, not an object")
        known = {f.name: f for f in fields(cls)}
        values = {}
        for name, f in known.items():
            if name in raw:
                values[name] = _parse(raw[name], f.type, f"{where}.{name}")
            elif f.default is MISSING and f.default_factory is MISSING:
                raise ResultError(f"{where}.{name} is missing")
        record = cls(**values)
        record.extra = {k: v for k, v in raw.items() if k not in known}
        return record

    def to_dict(self) -> dict:
        out = {f.name: _dump(getattr(self, f.name)) for f in fields(self)}
        if self.omit_none:
            out = {k: v for k, v in out.items() if v is not None}
        return {**out, **getattr(self, "extra", {})}


def _dump(value: Any) -> Any:
    return value.to_dict() if isinstance(value, _Record) else value


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,), "list": (list,),
          "Any": (object,)}


def _parse(value: Any, hint: str, where: str) -> Any:
    """Check `value` against a field's annotation (a string under `from __future__ import annotations`)."""
    optional = hint.startswith("Optional[")
    inner = hint[len("Optional["):-1] if optional else hint
    if value is None:
        if optional or inner == "Any":
            return None
        raise ResultError(f"{where} is null")
    record = _RECORDS.get(inner)
    if record is not None:
        return record.from_dict(value, where)
    allowed = _TYPES[inner]
    if not isinstance(value, allowed) or (inner in ("int", "float") and isinstance(value, bool)):
        raise ResultError(f"{where}={value!r} is not {'a' if inner != 'int' else 'an'} {inner}")
    return value


@dataclass
class ModelRecord(_Record):
    name: str  # registry name (tinyablate/config/model.py)
    family: Optional[str] = None  # "qwen2" | "llama"
    size: Optional[str] = None  # e.g. "7B"
    n_params: Optional[int] = None  # the base model's parameters (registry value)
    model_id: Optional[str] = None  # what names the weights, e.g. "hub:Qwen/Qwen2.5-7B-Instruct@<sha>"


@dataclass
class AdapterRecord(_Record):
    trainable_params: int  # unique trainable parameters, counted on the built model
    kind: Optional[str] = None  # tinylora | lora_xs | lora | none
    r: Optional[int] = None  # frozen rank (0 for none)
    u: Optional[int] = None  # parameters per shared group (r² for lora_xs; None for lora/none)
    tie: Any = None  # as configured: an int or "all"
    sharing: Optional[str] = None
    precision: Optional[str] = None
    trainable_bytes: Optional[int] = None  # their storage at `precision`
    n_modules: Optional[int] = None  # adapted linear modules
    n_groups: Optional[int] = None  # distinct trainable vectors / matrices
    # TinyLoRA / LoRA-XS: how exact the frozen bases are (adapters/svd_adapter.basis_report).
    svd_method: Optional[str] = None  # exact | full
    svd_max_sin_bound: Optional[float] = None  # largest certified sine to the true top-r, modules with a gap
    svd_min_rel_gap: Optional[float] = None  # smallest (σ_r − σ_{r+1}) / σ_1 over the modules
    svd_ties: Optional[list] = None  # modules whose top-r subspace is not unique (gap below TIE_GAP)


@dataclass
class AlgoRecord(_Record):
    name: str  # grpo | sft
    learning_rate: Optional[float] = None
    steps: Optional[int] = None  # optimizer steps done (0: not trained)


@dataclass
class TaskRecord(_Record):
    name: str  # arithmetic | gsm8k
    scorer: Optional[str] = None  # strict | flexible: which one `metrics.accuracy` is


@dataclass
class Metrics(_Record):
    accuracy: float  # greedy pass@1 of the trained adapter under task.scorer
    accuracy_strict: Optional[float] = None  # \boxed{} (else ####)
    accuracy_flexible: Optional[float] = None  # the last number in the completion
    n_eval: Optional[int] = None  # problems evaluated
    base_accuracy: Optional[float] = None  # the base model (adapter disabled), under task.scorer; None: eval.base=false
    base_accuracy_strict: Optional[float] = None
    base_accuracy_flexible: Optional[float] = None
    base_cached: Optional[bool] = None  # base accuracy read from the on-disk cache
    reward: Optional[dict] = None  # GRPO: first, last, mean_last10, max; SFT: first_loss, last_loss
    train_steps: Optional[int] = None
    resumed_from_step: Optional[int] = None  # the checkpoint this attempt resumed from (None: from scratch)


@dataclass
class Timing(_Record):
    omit_none = True  # a failed attempt has only wall_s; an untrained cell no first-step times

    wall_s: float = 0.0  # the attempt, start to result
    train_s: Optional[float] = None
    eval_s: Optional[float] = None  # base (unless cached) + final evaluation
    setup_s: Optional[float] = None  # start to the end of building (weights, adapter, task)
    model_load_s: Optional[float] = None  # reading the weights (excluded from the per-cell overhead)
    start_to_first_step_s: Optional[float] = None  # process start to the first training step
    overhead_to_first_step_s: Optional[float] = None  # the same minus weight loading and base evaluation
    n_gpus: Optional[int] = None  # GPUs used (0 on CPU)
    world_size: Optional[int] = None  # data-parallel ranks
    gpu_hours: Optional[float] = None  # wall_s / 3600 x n_gpus


@dataclass
class ErrorRecord(_Record):
    type: str  # the exception's class
    message: str
    traceback: Optional[str] = None
    rank: Optional[int] = None  # the rank that failed first
    world_size: Optional[int] = None


@dataclass
class Result(_Record):
    """result.json, schema version 1. A completed result has model, adapter, algo, task and metrics;
    a failed one has error instead. Every result has cell_id, status, sweep, config, timing, provenance."""

    omit_none = True

    cell_id: str
    status: str  # completed | failed
    schema_version: int = SCHEMA_VERSION
    sweep: Optional[str] = None
    config: Optional[dict] = None  # the whole CellSpec (spec_to_dict); rebuild it with config.spec_from_dict
    model: Optional[ModelRecord] = None
    adapter: Optional[AdapterRecord] = None
    algo: Optional[AlgoRecord] = None
    task: Optional[TaskRecord] = None
    metrics: Optional[Metrics] = None
    timing: Optional[Timing] = None
    provenance: Optional[dict] = None  # tinyablate.provenance.collect_provenance(): git, packages, host, GPUs
    error: Optional[ErrorRecord] = None

    @classmethod
    def parse(cls, raw: Any, where: str = "result") -> "Result":
        """Check a result.json-shaped dict; ResultError says what does not fit."""
        if not isinstance(raw, dict) or "status" not in raw or "cell_id" not in raw:
            raise ResultError(f"{where} has no status/cell_id: not a tinyablate result")
        version = raw.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ResultError(f"{where} has schema_version {version!r} (expected {SCHEMA_VERSION})")
        result = cls.from_dict(raw, where)
        if result.status not in ("completed", "failed"):
            raise ResultError(f"{where} has unknown status {result.status!r}")
        needed = ("model", "adapter", "algo", "task", "metrics") if result.status == "completed" else ("error",)
        missing = [name for name in needed if getattr(result, name) is None]
        if missing:
            raise ResultError(f"{where}: a {result.status} result lacks {', '.join(missing)}")
        return result

    def to_dict(self) -> dict:
        """The JSON object of result.json (schema_version first)."""
        out = super().to_dict()
        return {"schema_version": out.pop("schema_version"), **out}

    @property
    def completed(self) -> bool:
        return self.status == "completed"


_RECORDS = {c.__name__: c for c in (ModelRecord, AdapterRecord, AlgoRecord, TaskRecord, Metrics, Timing,
                                    ErrorRecord, Result)}


# -- the folder -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellFolder:
    """One cell's folder; see the module docstring for what it holds."""

    path: Path

    @classmethod
    def of(cls, spec: CellSpec, cid: Optional[str] = None) -> "CellFolder":
        """<output_dir>/<sweep>/<cell_id>/ of a spec (`cid`: its cell_id, when already computed)."""
        return cls(Path(spec.output_dir) / spec.sweep / (cid or cell_id(spec)))

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def name(self) -> str:
        return self.path.name

    def file(self, name: str) -> Path:
        """A path inside the folder, e.g. folder.file(METRICS_FILE)."""
        return self.path / name

    def is_cell(self) -> bool:
        return any((self.path / name).is_file() for name in CELL_MARKERS)

    # -- result ----------------------------------------------------------------------------------
    def read_result(self) -> Optional[Result]:
        """This cell's result, None if it has none; ResultError if the file cannot be used."""
        path = self.path / RESULT_FILE
        if not path.exists():
            return None
        try:
            raw = json.loads(path.read_text())
        except ValueError as err:
            raise ResultError(f"{path} is not valid JSON ({err}); delete it to re-run the cell") from err
        return Result.parse(raw, str(path))

    def write_result(self, result: Result) -> Path:
        """Write result.json atomically (checked against the schema first)."""
        data = result.to_dict()
        Result.parse(data, "the result to write")
        path = self.path / RESULT_FILE
        write_json_atomic(path, data)
        return path

    def has_result(self) -> bool:
        return (self.path / RESULT_FILE).exists()

    def move_result_aside(self, status: str) -> None:
        """Keep an earlier attempt's result as result.<status>-<unix time>.json (a retry starts over)."""
        os.replace(self.path / RESULT_FILE, self.path / f"result.{status}-{int(time.time())}.json")

    def state(self) -> str:
        """pending | running | completed | failed (an unusable result.json counts as failed)."""
        try:
            result = self.read_result()
        except ResultError:
            return "failed"
        if result is not None:
            return result.status
        return "running" if (self.path / RUNNING_FILE).exists() else "pending"

    # -- spec, running, launch records -----------------------------------------------------------
    def write_spec(self, spec: CellSpec) -> None:
        write_json_atomic(self.path / SPEC_FILE, {"cell_id": cell_id(spec), "config": spec_to_dict(spec)})

    def read_spec(self) -> Optional[dict]:
        """spec.json's {"cell_id", "config"}, None when missing or unreadable."""
        data = read_json(self.path / SPEC_FILE)
        return data if isinstance(data, dict) else None

    def mark_running(self, ranks_world_size: int) -> None:
        """running.json: who runs the cell now (live_job in status.py reads it)."""
        write_json_atomic(self.path / RUNNING_FILE, {
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "world_size": ranks_world_size})

    def read_running(self) -> dict:
        data = read_json(self.path / RUNNING_FILE)
        return data if isinstance(data, dict) else {}

    def clear_running(self) -> None:
        try:
            (self.path / RUNNING_FILE).unlink()
        except FileNotFoundError:
            pass

    def write_launch(self, backend: str, job_id: str, stdout: str, stderr: str, argv: list) -> None:
        """launch.json: how the launcher submitted the cell (its job and log files)."""
        write_json_atomic(self.path / LAUNCH_FILE, {
            "backend": backend, "job_id": str(job_id), "stdout": str(stdout), "stderr": str(stderr),
            "submitted": time.time(), "argv": list(argv)})

    def read_launch(self) -> dict:
        data = read_json(self.path / LAUNCH_FILE)
        return data if isinstance(data, dict) else {}


def sweep_cell_folders(root: Path, depth: int = 2) -> list:
    """Cell folders at `root`, under it, or one level deeper (an output root holding sweeps); hidden
    folders (.submitit, .hydra), `_`-folders and wandb/ are skipped."""
    root = CellFolder(Path(root))
    if root.is_cell():
        return [root]
    if depth == 0 or not root.path.is_dir():
        return []
    found = []
    for child in sorted(root.path.iterdir()):
        if child.is_dir() and not child.name.startswith((".", "_")) and child.name != "wandb":
            found += sweep_cell_folders(child, depth - 1)
    return found
