"""One sweep cell end to end: build → train → evaluate → write result.

    from tinyablate.cell import run_cell
    result = run_cell(spec)          # spec: tinyablate.config.CellSpec; returns result.json's content

`run_cell` is the one way into a cell: launch.py, the launchers' jobs, spawned ranks and tests all
call it. It runs the same in a notebook, a test, a local subprocess or a SLURM job: it imports no
launcher. Before anything loads it runs `preflight` (tinyablate/preflight.py: every check that needs no
weights, the same call a sweep's launcher makes) and takes the cell's lock (one process per cell;
CellBusy if another live one holds it). A cell started again resumes training from its last complete
checkpoint (its final one: no training, evaluation and export only). Its samples and exported adapter are
staged and published with its result (CellFolder.publish). Whatever happens, the cell ends with a result.json (status completed or failed) unless the
process itself is killed; a completed one evaluated problems and trained the steps asked for.
A `gpus: N > 1` cell runs as N ranks (distributed.py): started as one plain process, run_cell spawns
them on this machine; under torchrun or a SLURM task it is one of them. Every rank builds, trains
(DDP) and evaluates its share; rank 0 alone writes the result, metrics, W&B run and exported adapter.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import psutil
import torch
from transformers import set_seed

from . import console, distributed
from .adapters import Adapter, apply_adapter, load_trainable_state
from .cell_folder import (
    ADAPTER_DIR,
    ADAPTER_NATIVE_DIR,
    ADAPTER_STATE,
    CHECKPOINTS_DIR,
    TRAINER_STATE,
    AdapterRecord,
    AlgoRecord,
    CellBusy,
    CellFolder,
    CollapseRecord,
    ErrorRecord,
    Metrics,
    ModelRecord,
    Result,
    ResultError,
    TaskMetrics,
    TaskRecord,
    Timing,
    checkpoint_step,
    eval_samples_file,
    last_complete_checkpoint,
)
from .config import CellSpec, ModelInfo, cell_id, eval_task_configs, spec_to_dict
from .config.model import load_kind
from .distributed import Ranks
from .embedded import weights_provenance
from .evaluation import base_cache_key, base_cache_path, evaluate_task, read_base_cache, write_base_cache, write_samples
from .files import disk_full
from .metrics import MetricLogger, NullLogger, truncate_metrics, wandb_run_id
from .models import load_model_and_tokenizer, model_identity, resolve_cache_dir
from .preflight import preflight
from .provenance import collect_provenance
from .quantization import base_bytes
from .tasks import Task, load_task
from .train import FirstStepTimer, MetricLoggerCallback, build_trainer
from .train.attention_check import checked_attention
from .train.collapse import recorded_collapse
from .train.glue import compiled_glue, train_kernels


@dataclass
class BuiltCell:
    """What build() makes of a cell: the adapted model, tokenizer, tasks and device that training and evaluation use."""

    model: torch.nn.Module  # the adapted model (adapter.model)
    tokenizer: object  # a transformers tokenizer
    info: ModelInfo
    adapter: Adapter
    task: Task
    model_id: str
    device: torch.device
    load_s: float = 0.0  # reading the weights (excluded from the per-cell overhead)
    ranks: Ranks = Ranks()
    eval_tasks: dict = field(default_factory=dict)  # name -> Task: the training task first, then eval.tasks


def run_cell(spec: CellSpec, cell_dir: Optional[Path] = None, started: Optional[float] = None) -> dict:
    """Run one cell (checked here, once, by preflight) and return its result, as written to <cell_dir>/result.json.

    `cell_dir` defaults to <output_dir>/<sweep>/<cell_id>. Under RANK/WORLD_SIZE (torchrun, submitit
    tasks, spawned ranks) this process is one data-parallel rank; a `gpus: N > 1` cell started without
    them spawns its N ranks here. Every rank returns rank 0's result. `started`: when the cell began (its
    timing's start_to_first_step_s counts from it; default: the process's start).
    """
    console.quiet_known_warnings()
    started_as = distributed.ranks_from_env()
    preflight(spec, started_as.world_size if started_as.distributed else None)  # no weights loaded yet
    folder = CellFolder(cell_dir) if cell_dir is not None else CellFolder.of(spec)
    spawns = spec.gpus > 1 and not started_as.distributed  # (preflight checked this machine's GPUs: no folder yet)
    with _cell_lock(folder, started_as):  # one process runs a cell at a time (CellBusy otherwise)
        if spawns:
            os.environ[_LOCK_HELD_ENV] = str(folder.path)  # the spawned ranks inherit it: this process holds the lock
            distributed.spawn_ranks(spec.gpus, run_cell, spec, folder.path)
            return folder.read_result().to_dict()
        with distributed.process_group(spec.gpus) as ranks:
            return _run_ranks(spec, folder, ranks, started).to_dict()


def run_cells(
    specs: Sequence[CellSpec], cell_dirs: Sequence[Optional[Path]], warm: bool = False, started: Optional[float] = None
) -> list:
    """Cells one after another in this process (a bundle: hydra.launcher.cells_per_job), each through run_cell
    with its own folder, lock, result and metrics; returns one summary per cell (cell_id, status, accuracy,
    error). The process stays warm: imports, compiled kernels (kernels.py `compiled` keeps them per model
    and batch shape) and the base-accuracy cache serve every cell after the first. A cell that fails (its
    result says why) or that another process holds does not stop the cells after it; memory is released
    between cells. A bundle run again (a requeue) returns its completed cells' results and resumes the others.
    `warm`: this process ran a cell before, so even the first cell's start to first step counts from its own start.
    `started`: else, when the first cell's start to first step counts from (default: this process's start).
    """
    summaries = []
    for i, (spec, cell_dir) in enumerate(zip(specs, cell_dirs)):
        try:  # the first cell's start is the process's (imports included), a later one's its own
            summaries.append(cell_summary(run_cell(spec, cell_dir, started=time.time() if i or warm else started)))
        except Exception as err:  # noqa: BLE001 - the cell's own result.json records its failure
            status = "busy" if isinstance(err, CellBusy) else "failed"
            summaries.append(unfinished_summary(cell_id(spec), status, f"{type(err).__name__}: {err}"))
        finally:
            _release_memory()
    return summaries


def cell_summary(result: dict) -> dict:
    """What a job reports of a cell it ran (run_cell's result): cell_id, status, accuracy, world_size, error."""
    return {
        "cell_id": result["cell_id"],
        "status": result["status"],
        "accuracy": result["metrics"]["accuracy"],
        "world_size": result["timing"]["world_size"],
        "error": None,
    }


def unfinished_summary(cid: str, status: str, error: str) -> dict:
    """What a job reports of a cell that gave no result to it: `status` "failed" or "busy" (another process holds
    it), and why."""
    return {"cell_id": cid, "status": status, "accuracy": None, "world_size": None, "error": error}


def _release_memory() -> None:
    """What a finished cell held (model, engine, CUDA graphs, optimizer) back to the device before the next one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # each cell's timing.gpu_peak_gib is its own


def _cell_lock(folder: CellFolder, started_as: Ranks):
    """The cell's lock, taken by the process that owns the cell: a plain process (which holds it for
    the ranks it spawns) or rank 0 of ranks started by torchrun/SLURM tasks."""
    if started_as.distributed and (not started_as.is_main or os.environ.get(_LOCK_HELD_ENV) == str(folder.path)):
        return contextlib.nullcontext()
    return folder.locked()


_LOCK_HELD_ENV = "TINYABLATE_CELL_LOCK_HELD"


def _run_ranks(spec: CellSpec, folder: CellFolder, ranks: Ranks, started: Optional[float] = None) -> Result:
    cid = cell_id(spec)
    previous = None
    if ranks.is_main:
        folder.path.mkdir(parents=True, exist_ok=True)
        folder.remove_temp_files()  # what a killed write left (we hold the lock: nobody else writes)
        previous = _previous_result(folder, cid)
    previous = distributed.broadcast_from_main(previous)
    if previous is not None:
        return previous  # e.g. a requeue signal that arrived after the cell had finished
    start = time.time()
    try:
        if ranks.is_main:
            folder.write_spec(spec)
            folder.mark_running(ranks.world_size)
            print(console.banner(spec, cid, folder.path, ranks.world_size, _expected_params(spec)), flush=True)
        result = _run(spec, cid, folder, start, ranks, started)
    except Exception as err:  # a failed cell still leaves its record (a kill or requeue signal does not)
        full = disk_full(err, folder.path)  # said in one line, naming the path
        recorded = folder.has_result()  # the first rank to fail says why (the others follow it)
        if not recorded:
            recorded = folder.write_failure(_failure(spec, cid, start, full or err, ranks))
        if ranks.is_main and recorded:  # not recorded (a full disk): running.json stays, the cell reads interrupted
            folder.clear_running()
        if full is not None:
            raise full from err
        raise
    # Ctrl-C (KeyboardInterrupt) or a signal's SystemExit: no result, and running.json stays, so the cell
    # reads interrupted (like a killed one) and a re-run resumes it
    if ranks.is_main:
        folder.clear_running()
    return distributed.broadcast_from_main(result)


def _expected_params(spec: CellSpec) -> Optional[int]:
    """The trainable parameters the banner announces (counted on the model's shape, without weights)."""
    from .shapes import adapter_size

    try:
        return adapter_size(spec.model.name, spec.adapter)[0]
    except ValueError:  # the adapter does not fit the model: building it says why
        return None


def _previous_result(folder: CellFolder, cid: str) -> Optional[Result]:
    """This cell's completed result if it has one; any other is moved aside (this is a retry)."""
    try:
        result = folder.read_result()
    except ResultError:
        folder.move_result_aside("unreadable")
        return None
    if result is None:
        return None
    if result.completed and result.cell_id == cid:
        return result
    folder.move_result_aside(result.status)
    return None


def _run(
    spec: CellSpec, cid: str, folder: CellFolder, start: float, ranks: Ranks, started: Optional[float] = None
) -> Optional[Result]:
    """Build → base eval → train → eval → export; the result (rank 0; None on other ranks)."""
    built = build(spec, ranks)
    config = {
        **spec_to_dict(spec),
        "cell_id": cid,
        "trainable_params": built.adapter.trainable_params,
        "trainable_bytes": built.adapter.trainable_bytes,
        "model_family": built.info.family,
        "model_size": built.info.size,
        "world_size": ranks.world_size,
    }
    kept = _prepare_resume(spec, folder, ranks.world_size) if ranks.is_main else []  # each step once in metrics.jsonl
    logger = (
        MetricLogger(
            folder.path,
            spec.logger,
            run_id=wandb_run_id(cid),
            group=spec.sweep,
            job_type=spec.algo.name,
            name=cid,
            config=config,
        )
        if ranks.is_main
        else NullLogger()
    )
    with logger:
        t0 = time.time()
        bases = {name: base_accuracy(spec, built, task) for name, task in built.eval_tasks.items()}
        base = bases[spec.task.name]
        if not any(row["step"] == 0 for row in kept):  # a resumed cell logged it in its first attempt: steps ascend
            logger.log(
                {
                    f"eval/base_{k}": v
                    for k, v in base.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)
                },
                step=0,
            )
        train_info = train(spec, built, folder.path, [MetricLoggerCallback(logger)])
        t1 = time.time()
        finals = {
            name: evaluate_final(spec, built, folder, bases[name], trained=train_info["steps"] > 0, task=task)
            for name, task in built.eval_tasks.items()
        }
        final = finals[spec.task.name]
        t2 = time.time()
        if not ranks.is_main:
            return None
        export(built, folder)
        timing = {
            "wall_s": time.time() - start,
            "train_s": train_info["train_s"],
            "eval_s": (t2 - t1) + sum(b.get("eval_s", 0.0) for b in bases.values()),
            "setup_s": t0 - start,
            "model_load_s": built.load_s,
            **_overhead(train_info, built, base, started),
            **_gpu_peak(built.device),
        }
        result = make_result(spec, cid, built, base, final, train_info, timing, task_metrics(built, bases, finals))
        step = train_info["steps"] + 1
        logger.table("eval/tasks", TASK_TABLE_COLUMNS, task_table_rows(result.metrics.tasks), step=step)
        summary = {
            "eval/accuracy": final["accuracy"],
            "eval/accuracy_flexible": final.get("accuracy_flexible"),
            "eval/accuracy_strict": final.get("accuracy_strict"),
            "eval/n_eval": final["n_eval"],
            "eval/base_accuracy": base["accuracy"],
            "trainable_params": built.adapter.trainable_params,
            "trainable_bytes": built.adapter.trainable_bytes,
            "train_steps": train_info["steps"],
            "gpu_hours": result.timing.gpu_hours,
            "wall_s": result.timing.wall_s,
            **{f"collapse/{k}": v for k, v in (train_info["collapse"] or {}).items()},  # analysis/wandb_source.py
            **{
                f"eval/{name}/{k}": getattr(m, k)
                for name, m in result.metrics.tasks.items()
                for k in ("accuracy", "base_accuracy", "delta")
            },
        }
        summary = {k: v for k, v in summary.items() if v is not None}
        logger.log(summary, step=step)
        logger.summary(summary)
    folder.publish(result)  # after the logger closed: nothing after this can turn it into a failure
    return result


def _prepare_resume(spec: CellSpec, folder: CellFolder, world_size: int) -> list:
    """Rank 0, before training: checkpoints past algo.max_steps dropped (an earlier version trained past it
    on resume), metrics.jsonl cut back to the checkpoint this attempt resumes from (its kept rows returned),
    an empty staging folder for this attempt's outputs (CellFolder.publish)."""
    dropped = folder.drop_checkpoints_past(spec.algo.max_steps)
    if dropped:
        print(f"removed {', '.join(dropped)}: past algo.max_steps={spec.algo.max_steps}", flush=True)
    folder.staged("").mkdir(parents=True, exist_ok=True)
    checkpoints = folder.file(CHECKPOINTS_DIR)
    return truncate_metrics(folder.path, resume_step(checkpoints, world_size, max_step=spec.algo.max_steps))


# -- build -------------------------------------------------------------------------------------
def build(spec: CellSpec, ranks: Ranks = Ranks()) -> BuiltCell:
    """Load the model and task, and apply the adapter (validated against the model first).

    Every rank builds the same thing; that the model and adapter agree across ranks is checked.
    """
    task = load_task(spec.task)  # data errors surface before the model loads (the evaluation tasks' too)
    eval_tasks = {
        name: task if name == spec.task.name else load_task(cfg) for name, cfg in eval_task_configs(spec).items()
    }
    if spec.train and spec.adapter.kind != "none":
        task.train_problems()  # a task without a training split says so before the model loads
    t0 = time.time()
    model, tokenizer, info = load_model_and_tokenizer(_model_config(spec, ranks))
    load_s = time.time() - t0
    model_id = model_identity(spec.model, model)
    set_seed(spec.seed)
    with distributed.main_first():  # rank 0 fills the SVD cache; the others read the same factors from it
        adapter = apply_adapter(model, spec.adapter, model_id)
    device = next(model.parameters()).device
    if ranks.distributed:  # DDP syncs only the trainable tensors: everything else must already agree
        distributed.require_same_on_all_ranks(
            distributed.tensors_fingerprint(adapter.model),
            "the model and adapter built (sampled weights and SVD factors)",
        )
    return BuiltCell(adapter.model, tokenizer, info, adapter, task, model_id, device, load_s, ranks, eval_tasks)


def _model_config(spec: CellSpec, ranks: Ranks = Ranks()):
    """model.device=auto follows the cell's `gpus`: cuda when it asks for a GPU, cpu otherwise.
    Rank r of a multi-GPU cell uses cuda:LOCAL_RANK."""
    if spec.model.device not in ("auto", "cuda"):
        return spec.model
    if spec.gpus > 0:
        if not torch.cuda.is_available():  # (each rank's own GPU was checked when it joined the group)
            raise RuntimeError(
                f"gpus={spec.gpus} but no CUDA device is visible to this process; run it on a GPU "
                "node (hydra/launcher=slurm requests one) or set gpus=0 for CPU"
            )
        return replace(spec.model, device=f"cuda:{ranks.local_rank}" if ranks.distributed else "cuda")
    if spec.model.device == "cuda":
        return spec.model
    return replace(spec.model, device="cpu")


# -- evaluation: which, when, where records go (the evaluation itself: tinyablate/evaluation/) ---
def base_accuracy(spec: CellSpec, built: BuiltCell, task: Optional[Task] = None) -> dict:
    """The base model's accuracy on `task` (default: the training task), adapter disabled, from the
    on-disk cache when possible."""
    task = task or built.task
    if not spec.eval.base:
        return {"accuracy": None, "n_eval": 0, "cached": False}
    dtype = str(next(built.model.parameters()).dtype)
    path = base_cache_path(resolve_cache_dir(spec.model), base_cache_key(built.model_id, task.cfg, spec.eval, dtype))
    cached = read_base_cache(path) if spec.eval.cache_base and built.ranks.is_main else None
    cached = distributed.broadcast_from_main(cached)  # every rank takes the same branch
    if cached is not None:
        return {**cached, "cached": True, "eval_s": 0.0}
    t0 = time.time()
    with built.adapter.disabled():
        metrics, _ = evaluate_task(built.model, built.tokenizer, task, spec.eval, desc=f"eval base {task.cfg.name}")
    if spec.eval.cache_base and built.ranks.is_main:
        write_base_cache(path, metrics)
    return {**metrics, "cached": False, "eval_s": time.time() - t0}


def evaluate_final(
    spec: CellSpec, built: BuiltCell, folder: CellFolder, base: dict, trained: bool, task: Optional[Task] = None
) -> dict:
    """Accuracy of the adapted model on `task` (default: the training task); per-problem records go to
    eval_samples.jsonl (the training task) or eval_samples.<task>.jsonl, staged until the result is ready."""
    task = task or built.task
    if not trained and base.get("accuracy") is not None and built.adapter.trainable_params == 0:
        return {k: v for k, v in base.items() if k not in ("cached", "eval_s")}
    desc = f"eval trained {task.cfg.name}"
    metrics, records = evaluate_task(built.model, built.tokenizer, task, spec.eval, desc=desc)
    if built.ranks.is_main:
        write_samples(folder.staged(eval_samples_file(None if task is built.task else task.cfg.name)), records)
    return metrics


TASK_TABLE_COLUMNS = ["task", "scorer", "accuracy", "base_accuracy", "delta", "n_eval"]


def task_metrics(built: BuiltCell, bases: dict, finals: dict) -> dict:
    """result.json's metrics.tasks: per evaluation task, `accuracy` (its scorer), the base's, the change,
    and every measure of both (strict/flexible or acc/acc_norm/chance)."""
    out = {}
    for name, task in built.eval_tasks.items():
        final, base = finals[name], bases[name]
        accuracy, base_accuracy = final["accuracy"], base.get("accuracy")
        out[name] = TaskMetrics(
            accuracy=accuracy,
            scorer=task.cfg.scorer,
            base_accuracy=base_accuracy,
            delta=None if base_accuracy is None else accuracy - base_accuracy,
            n_eval=final["n_eval"],
            trained_on=task is built.task,
            base_cached=base.get("cached"),
            final=final,
            base={k: v for k, v in base.items() if k not in ("cached", "eval_s")},
        )
    return out


def task_table_rows(tasks: dict) -> list:
    """One row per evaluation task, TASK_TABLE_COLUMNS (the W&B table of a cell)."""
    return [[name, m.scorer, m.accuracy, m.base_accuracy, m.delta, m.n_eval] for name, m in tasks.items()]


# -- training ----------------------------------------------------------------------------------
def train(spec: CellSpec, built: BuiltCell, cell_dir: Path, callbacks) -> dict:
    """Train with TRL, resuming from the last complete checkpoint; returns steps and reward summary. A last
    checkpoint at algo.max_steps is the trained adapter: loaded, not trained on (TRL would take another step)."""
    if not spec.train or built.adapter.trainable_params == 0:
        return _train_info(0, None, None, None)
    t0 = time.time()
    checkpoints = cell_dir / CHECKPOINTS_DIR
    world = built.ranks.world_size
    last = last_complete_checkpoint(checkpoints, world, max_step=spec.algo.max_steps)
    if last is not None and checkpoint_step(last) == spec.algo.max_steps:
        return _trained_already(spec, built, last)
    times: dict = {}
    callbacks = [*callbacks, FirstStepTimer(times)]
    trainer = build_trainer(built.model, built.tokenizer, built.task, spec, checkpoints, built.device, callbacks, world)
    glue = train_kernels(spec.algo, built.device.type) == "compiled"
    log = print if built.ranks.is_main else (lambda _line: None)
    with compiled_glue(built.model, enabled=glue), checked_attention(built.model, built.device, log) as attention:
        trainer.train(resume_from_checkpoint=str(last) if last else None)
    resumed = checkpoint_step(last) if last else None  # None: this attempt started from scratch
    skipped = trainer.guard.skipped if spec.algo.nonfinite == "skip" else None
    watch = trainer.collapse_watch  # GRPO: the last collapse of training (train/collapse.py), if any
    info = _train_info(trainer.state.global_step, resumed, reward_summary(trainer.state.log_history), skipped)
    return {
        **info,
        "train_s": time.time() - t0,
        "first_step_time": times.get("first_step"),
        "attention_check": attention.as_dict() if attention else None,
        "collapse": watch.record if watch is not None else None,
    }


def _trained_already(spec: CellSpec, built: BuiltCell, last: Path) -> dict:
    """A cell whose last checkpoint is its final one (stopped during evaluation or export, or its result lost):
    the trained tensors from it, its logged rewards, no training step."""
    from safetensors.torch import load_file

    load_trainable_state(built.model, load_file(str(last / ADAPTER_STATE)), source=f"checkpoint {last}")
    state = json.loads((last / TRAINER_STATE).read_text())
    if built.ranks.is_main:
        print(f"training was complete ({last.name}): evaluating and exporting", flush=True)
    skipped = 0 if spec.algo.nonfinite == "skip" else None  # steps this attempt dropped: none
    step = checkpoint_step(last)
    info = _train_info(step, step, reward_summary(state.get("log_history", [])), skipped)
    return {**info, "collapse": recorded_collapse(state)}


def _train_info(steps: int, resumed: Optional[int], reward: Optional[dict], skipped: Optional[int]) -> dict:
    """What train() returns (train_s, first_step_time, attention_check and collapse: 0 and None unless it trained)."""
    return {
        "steps": steps,
        "train_s": 0.0,
        "resumed_from_step": resumed,
        "reward": reward,
        "first_step_time": None,
        "nonfinite_skipped_steps": skipped,
        "attention_check": None,
        "collapse": None,
    }


def resume_step(checkpoints: Path, world_size: int, max_step: Optional[int] = None) -> Optional[int]:
    """The step of the last complete checkpoint at most `max_step` (None: training starts from scratch)."""
    last = last_complete_checkpoint(checkpoints, world_size, max_step=max_step)
    return checkpoint_step(last) if last else None


def reward_summary(log_history: list) -> Optional[dict]:
    """GRPO: first, last, mean of the last 10 and max reward; SFT: first and last loss. Finite values only: the
    steps that algo.nonfinite=skip dropped are counted in result.json's metrics.nonfinite_skipped_steps."""
    rewards = [entry["reward"] for entry in log_history if _finite(entry.get("reward"))]
    if not rewards:
        losses = [entry["loss"] for entry in log_history if _finite(entry.get("loss"))]
        return {"first_loss": losses[0], "last_loss": losses[-1]} if losses else None
    tail = rewards[-10:]
    return {"first": rewards[0], "last": rewards[-1], "mean_last10": sum(tail) / len(tail), "max": max(rewards)}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# -- outputs -----------------------------------------------------------------------------------
def export(built: BuiltCell, folder: CellFolder) -> None:
    """The PEFT-format adapter (anyone can load it) and, for TinyLoRA/LoRA-XS, the native one (staged until the
    result is ready)."""
    kind = built.adapter.cfg.kind
    if kind == "none":
        return
    built.adapter.export_peft(folder.staged(ADAPTER_DIR))
    if kind in ("tinylora", "lora_xs"):
        built.adapter.save_native(folder.staged(ADAPTER_NATIVE_DIR))


def make_result(
    spec: CellSpec,
    cid: str,
    built: BuiltCell,
    base: dict,
    final: dict,
    train_info: dict,
    timing: dict,
    tasks: Optional[dict] = None,
) -> Result:
    """The completed result of a cell (the schema is documented in cell_folder.py)."""
    info, adapter = built.info, built.adapter
    n_gpus = built.ranks.world_size if getattr(built.device, "type", "cpu") == "cuda" else 0
    summary = adapter.summary()
    return Result(
        cell_id=cid,
        status="completed",
        sweep=spec.sweep,
        config=spec_to_dict(spec),
        model=ModelRecord(
            name=info.name,
            family=info.family,
            size=info.size,
            n_params=info.n_params,
            model_id=built.model_id,
            quantization=spec.model.quantization,
            base_bytes=base_bytes(built.model),
            weights=weights_provenance(info.name) if load_kind(spec.model, info) == "gguf" else None,
        ),
        adapter=AdapterRecord.pick(summary),  # the summary also holds expected_trainable_params: not recorded
        algo=AlgoRecord(name=spec.algo.name, learning_rate=spec.algo.learning_rate, steps=train_info["steps"]),
        task=TaskRecord(name=spec.task.name, scorer=spec.task.scorer),
        metrics=Metrics(
            accuracy=final["accuracy"],
            accuracy_strict=final.get("accuracy_strict"),
            accuracy_flexible=final.get("accuracy_flexible"),
            n_eval=final["n_eval"],
            base_accuracy=base.get("accuracy"),
            base_accuracy_strict=base.get("accuracy_strict"),
            base_accuracy_flexible=base.get("accuracy_flexible"),
            base_cached=base.get("cached"),
            reward=train_info["reward"],
            train_steps=train_info["steps"],
            resumed_from_step=train_info["resumed_from_step"],
            nonfinite_skipped_steps=train_info.get("nonfinite_skipped_steps"),
            tasks=tasks,
            collapse=CollapseRecord(**train_info["collapse"]) if train_info.get("collapse") else None,
        ),
        timing=Timing(
            **timing, n_gpus=n_gpus, world_size=built.ranks.world_size, gpu_hours=timing["wall_s"] / 3600 * n_gpus
        ),
        provenance={**collect_provenance(), "attention_check": train_info.get("attention_check")},
    )


def _overhead(train_info: dict, built: BuiltCell, base: dict, started: Optional[float] = None) -> dict:
    """The cell's start (its process's, or `started` in a bundle) to the first training step, and that minus
    weight loading and base evaluation."""
    first = train_info.get("first_step_time")
    if first is None:
        return {}
    since_start = first - (started if started is not None else psutil.Process().create_time())
    return {
        "start_to_first_step_s": since_start,
        "overhead_to_first_step_s": since_start - built.load_s - base.get("eval_s", 0.0),
    }


def _gpu_peak(device) -> dict:
    """The most GPU memory the cell's process reserved (torch's allocator; the cost model packs cells by it)."""
    if getattr(device, "type", "cpu") != "cuda":
        return {}
    return {"gpu_peak_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def _failure(spec: CellSpec, cid: str, start: float, err: BaseException, ranks: Ranks) -> Result:
    """The failed result: what was raised, where, after how long."""
    return Result(
        cell_id=cid,
        status="failed",
        sweep=spec.sweep,
        config=spec_to_dict(spec),
        error=ErrorRecord(
            type=type(err).__name__,
            message=str(err),
            traceback=traceback.format_exc(),
            rank=ranks.rank,
            world_size=ranks.world_size,
        ),
        timing=Timing(wall_s=time.time() - start),
        provenance=collect_provenance(),
    )
