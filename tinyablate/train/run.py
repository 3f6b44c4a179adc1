"""A cell's training run: resumed from its last complete checkpoint, or loaded from its final one, and what it
came to (`TrainOutcome`).

    from tinyablate.train.run import prepare_resume, train
    kept = prepare_resume(spec, folder, world_size)    # rank 0, before the metrics logger opens
    outcome = train(spec, built, folder.path, callbacks)   # built: tinyablate.build.BuiltCell

cell.py calls both; the trainer itself is `build_trainer` (train/__init__.py).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..adapters import load_trainable_state
from ..cell_folder import (
    ADAPTER_STATE,
    CHECKPOINTS_DIR,
    TRAINER_STATE,
    CellFolder,
    checkpoint_step,
    last_complete_checkpoint,
)
from ..config import CellSpec
from ..metrics import truncate_metrics
from . import FirstStepTimer, build_trainer
from .attention_check import checked_attention
from .collapse import recorded_collapse
from .glue import compiled_glue, train_kernels

if TYPE_CHECKING:
    from ..build import BuiltCell


@dataclass
class TrainOutcome:
    """What train() came to: 0 and None where this attempt did not train (or loaded its final checkpoint)."""

    steps: int  # the trainer's global step at the end (the steps asked for, unless training stopped early)
    train_s: float = 0.0
    resumed_from_step: Optional[int] = None  # None: this attempt started from scratch
    reward: Optional[dict] = None  # reward_summary of the logged steps
    first_step_time: Optional[float] = None  # time.time() at the end of this attempt's first step
    nonfinite_skipped_steps: Optional[int] = None  # algo.nonfinite=skip: the steps this attempt dropped
    attention_check: Optional[dict] = None  # the SDPA backends training used (train/attention_check.py)
    collapse: Optional[dict] = None  # GRPO: the last collapse of training (train/collapse.py), if any


def train(spec: CellSpec, built: BuiltCell, cell_dir: Path, callbacks) -> TrainOutcome:
    """Train with TRL, resuming from the last complete checkpoint; returns steps and reward summary. A last
    checkpoint at algo.max_steps is the trained adapter: loaded, not trained on (TRL would take another step)."""
    if not spec.train or built.adapter.trainable_params == 0:
        return TrainOutcome(steps=0)
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
    watch = trainer.collapse_watch  # GRPO: the last collapse of training (train/collapse.py), if any
    return TrainOutcome(
        steps=trainer.state.global_step,
        train_s=time.time() - t0,
        resumed_from_step=checkpoint_step(last) if last else None,
        reward=reward_summary(trainer.state.log_history),
        first_step_time=times.get("first_step"),
        nonfinite_skipped_steps=trainer.guard.skipped if spec.algo.nonfinite == "skip" else None,
        attention_check=attention.as_dict() if attention else None,
        collapse=watch.record if watch is not None else None,
    )


def _trained_already(spec: CellSpec, built: BuiltCell, last: Path) -> TrainOutcome:
    """A cell whose last checkpoint is its final one (stopped during evaluation or export, or its result lost):
    the trained tensors from it, its logged rewards, no training step."""
    from safetensors.torch import load_file

    load_trainable_state(built.model, load_file(str(last / ADAPTER_STATE)), source=f"checkpoint {last}")
    state = json.loads((last / TRAINER_STATE).read_text())
    if built.ranks.is_main:
        print(f"training was complete ({last.name}): evaluating and exporting", flush=True)
    step = checkpoint_step(last)
    return TrainOutcome(
        steps=step,
        resumed_from_step=step,
        reward=reward_summary(state.get("log_history", [])),
        nonfinite_skipped_steps=0 if spec.algo.nonfinite == "skip" else None,  # steps this attempt dropped: none
        collapse=recorded_collapse(state),
    )


def prepare_resume(spec: CellSpec, folder: CellFolder, world_size: int) -> list:
    """Rank 0, before training: checkpoints past algo.max_steps dropped (an earlier version trained past it
    on resume), metrics.jsonl cut back to the checkpoint this attempt resumes from (its kept rows returned),
    an empty staging folder for this attempt's outputs (CellFolder.publish)."""
    dropped = folder.drop_checkpoints_past(spec.algo.max_steps)
    if dropped:
        print(f"removed {', '.join(dropped)}: past algo.max_steps={spec.algo.max_steps}", flush=True)
    folder.staged("").mkdir(parents=True, exist_ok=True)
    checkpoints = folder.file(CHECKPOINTS_DIR)
    return truncate_metrics(folder.path, resume_step(checkpoints, world_size, max_step=spec.algo.max_steps))


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
