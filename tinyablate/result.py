"""A completed cell's result: assembled from what building, training and evaluation came to, its exported
adapter, and what its W&B run is told.

    from tinyablate.result import Clock, completed_result, export, log_result
    export(built, folder)                                               # staged, published with the result
    result = completed_result(spec, cid, built, bases, finals, trained, clock)   # cell_folder.Result
    log_result(logger, result, built, trained)                          # the task table and the run's summary

cell.py calls these on rank 0 (the result's schema is cell_folder.py's; a failed cell's record is cell.py's).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import psutil
import torch

from .cell_folder import (
    ADAPTER_DIR,
    ADAPTER_NATIVE_DIR,
    AdapterRecord,
    AlgoRecord,
    CellFolder,
    CollapseRecord,
    Metrics,
    ModelRecord,
    Result,
    TaskRecord,
    Timing,
)
from .config import CellSpec, spec_to_dict
from .config.model import load_kind
from .embedded import weights_provenance
from .evaluation.plan import TASK_TABLE_COLUMNS, Evaluation, task_metrics, task_table_rows
from .provenance import collect_provenance
from .quantization import base_bytes
from .train.run import TrainOutcome

if TYPE_CHECKING:
    from .build import BuiltCell


@dataclass
class Clock:
    """When (time.time()) the cell's attempt started and its phases ended: setup (building, the metrics logger),
    training (with the base evaluations before it), the final evaluations."""

    start: float
    setup: float = 0.0
    trained: float = 0.0
    evaluated: float = 0.0


def export(built: BuiltCell, folder: CellFolder) -> None:
    """The PEFT-format adapter (anyone can load it) and, for TinyLoRA/LoRA-XS, the native one (staged until the
    result is ready)."""
    kind = built.adapter.cfg.kind
    if kind == "none":
        return
    built.adapter.export_peft(folder.staged(ADAPTER_DIR))
    if kind in ("tinylora", "lora_xs"):
        built.adapter.save_native(folder.staged(ADAPTER_NATIVE_DIR))


def completed_result(
    spec: CellSpec,
    cid: str,
    built: BuiltCell,
    bases: dict,
    finals: dict,
    trained: TrainOutcome,
    clock: Clock,
    started: Optional[float] = None,
) -> Result:
    """The result of a cell that ran to the end; `bases`, `finals`: evaluation task name -> Evaluation (the
    training task's is the headline). `started`: where its start to first step counts from (run_cell's)."""
    base, final = bases[spec.task.name], finals[spec.task.name]
    timing = cell_timing(built, trained, bases, clock, base, started)
    return make_result(spec, cid, built, base, final, trained, timing, task_metrics(built, bases, finals))


def make_result(
    spec: CellSpec,
    cid: str,
    built: BuiltCell,
    base: Evaluation,
    final: Evaluation,
    trained: TrainOutcome,
    timing: Timing,
    tasks: Optional[dict] = None,
) -> Result:
    """The completed result of a cell (the schema is documented in cell_folder.py)."""
    info = built.info
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
        adapter=AdapterRecord.pick(built.adapter.summary()),  # it also holds expected_trainable_params: not recorded
        algo=AlgoRecord(name=spec.algo.name, learning_rate=spec.algo.learning_rate, steps=trained.steps),
        task=TaskRecord(name=spec.task.name, scorer=spec.task.scorer),
        metrics=Metrics(
            accuracy=final.metrics["accuracy"],
            accuracy_strict=final.metrics.get("accuracy_strict"),
            accuracy_flexible=final.metrics.get("accuracy_flexible"),
            n_eval=final.metrics["n_eval"],
            base_accuracy=base.accuracy,
            base_accuracy_strict=base.metrics.get("accuracy_strict"),
            base_accuracy_flexible=base.metrics.get("accuracy_flexible"),
            base_cached=base.cached,
            reward=trained.reward,
            train_steps=trained.steps,
            resumed_from_step=trained.resumed_from_step,
            nonfinite_skipped_steps=trained.nonfinite_skipped_steps,
            tasks=tasks,
            collapse=CollapseRecord(**trained.collapse) if trained.collapse else None,
        ),
        timing=timing,
        provenance={**collect_provenance(), "attention_check": trained.attention_check},
    )


def cell_timing(
    built: BuiltCell, trained: TrainOutcome, bases: dict, clock: Clock, base: Evaluation, started: Optional[float]
) -> Timing:
    """The attempt's timing, now: its phases, its start to first step (`base`: the training task's), GPU-hours
    and peak memory."""
    wall_s = time.time() - clock.start
    n_gpus = built.ranks.world_size if getattr(built.device, "type", "cpu") == "cuda" else 0
    return Timing(
        wall_s=wall_s,
        train_s=trained.train_s,
        eval_s=(clock.evaluated - clock.trained) + sum(b.eval_s or 0.0 for b in bases.values()),
        setup_s=clock.setup - clock.start,
        model_load_s=built.load_s,
        **_overhead(trained, built, base, started),
        **_gpu_peak(built.device),
        n_gpus=n_gpus,
        world_size=built.ranks.world_size,
        gpu_hours=wall_s / 3600 * n_gpus,
    )


def _overhead(trained: TrainOutcome, built: BuiltCell, base: Evaluation, started: Optional[float] = None) -> dict:
    """The cell's start (its process's, or `started` in a bundle) to the first training step, and that minus
    weight loading and base evaluation."""
    first = trained.first_step_time
    if first is None:
        return {}
    since_start = first - (started if started is not None else psutil.Process().create_time())
    return {
        "start_to_first_step_s": since_start,
        "overhead_to_first_step_s": since_start - built.load_s - (base.eval_s or 0.0),
    }


def _gpu_peak(device) -> dict:
    """The most GPU memory the cell's process reserved (torch's allocator; the cost model packs cells by it)."""
    if getattr(device, "type", "cpu") != "cuda":
        return {}
    return {"gpu_peak_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def run_config(spec: CellSpec, cid: str, built: BuiltCell) -> dict:
    """The config of the cell's W&B run: its spec, id, trainable size, model family and size, ranks."""
    return {
        **spec_to_dict(spec),
        "cell_id": cid,
        "trainable_params": built.adapter.trainable_params,
        "trainable_bytes": built.adapter.trainable_bytes,
        "model_family": built.info.family,
        "model_size": built.info.size,
        "world_size": built.ranks.world_size,
    }


def log_result(logger, result: Result, built: BuiltCell, trained: TrainOutcome) -> None:
    """The result's last metrics step (the step after training's last): the per-task table and the summary, which
    is also the run's summary."""
    step = trained.steps + 1
    logger.table("eval/tasks", TASK_TABLE_COLUMNS, task_table_rows(result.metrics.tasks), step=step)
    summary = wandb_summary(result, built, trained)
    logger.log(summary, step=step)
    logger.summary(summary)


def wandb_summary(result: Result, built: BuiltCell, trained: TrainOutcome) -> dict:
    """What a cell's W&B run summarizes (analysis/wandb_source.py reads it back); None values left out."""
    m = result.metrics
    summary = {
        "eval/accuracy": m.accuracy,
        "eval/accuracy_flexible": m.accuracy_flexible,
        "eval/accuracy_strict": m.accuracy_strict,
        "eval/n_eval": m.n_eval,
        "eval/base_accuracy": m.base_accuracy,
        "trainable_params": built.adapter.trainable_params,
        "trainable_bytes": built.adapter.trainable_bytes,
        "train_steps": trained.steps,
        "gpu_hours": result.timing.gpu_hours,
        "wall_s": result.timing.wall_s,
        **{f"collapse/{k}": v for k, v in (trained.collapse or {}).items()},  # analysis/wandb_source.py
        **{
            f"eval/{name}/{k}": getattr(t, k)
            for name, t in m.tasks.items()
            for k in ("accuracy", "base_accuracy", "delta")
        },
    }
    return {k: v for k, v in summary.items() if v is not None}
