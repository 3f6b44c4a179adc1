"""Training: GRPO and SFT through TRL on the adapter already applied to the model."""

from .collapse import CollapseWatch
from .common import (
    FirstStepTimer,
    MetricLoggerCallback,
    RankSyncCheck,
    ignore_frozen_in_ddp,
    use_console,
)
from .grpo import build_grpo_trainer
from .guard import NonFiniteGuard, NonFiniteTraining
from .sft import build_sft_trainer
from .trl_seam import TrainerSettings


def build_trainer(model, tokenizer, task, spec, output_dir, device, callbacks=(), world_size: int = 1):
    """The TRL trainer for `spec.algo.name` (grpo or sft; train/trl_seam.py); `world_size` ranks share each step's
    batch. Its `guard` (train/guard.py) checks every step for a non-finite loss, gradient or trainable tensor; a
    GRPO trainer's `collapse_watch` (train/collapse.py) names a collapse of its training (None for SFT). Both are
    given to the trainer at construction (TrainerSettings)."""
    guard = NonFiniteGuard(model, spec.algo.nonfinite)
    callbacks = [guard, *callbacks]  # first: its on_log count reaches the metrics callback
    watch = CollapseWatch(spec.algo.collapse_steps, spec.algo.on_collapse) if spec.algo.name == "grpo" else None
    if watch is not None:
        callbacks.append(watch)
    if world_size > 1:
        ignore_frozen_in_ddp(model)
        callbacks = [*callbacks, RankSyncCheck(model)]
    build = build_grpo_trainer if spec.algo.name == "grpo" else build_sft_trainer
    settings = TrainerSettings(guard=guard, collapse_watch=watch)
    trainer = build(model, tokenizer, task, spec, output_dir, device, callbacks, world_size, settings)
    use_console(trainer)
    return trainer


__all__ = ["FirstStepTimer", "MetricLoggerCallback", "NonFiniteTraining", "build_trainer"]
