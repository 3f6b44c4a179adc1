"""The guard against non-finite training: a NaN or inf loss, gradient or trainable tensor stops the cell
(`algo.nonfinite=fail`, the default) or skips the optimizer step (`skip`).

Checked once per optimizer step, after the gradients are clipped and before the optimizer moves (one host
sync): every micro-batch's loss and every trainable tensor's gradient. After the step the trainable tensors
themselves are checked (a finite gradient times a huge learning rate can still overflow an fp16 vector); that
check fails the cell in either mode, since the step cannot be undone. A failure raises `NonFiniteTraining`
before the step's checkpoint is written, so the newest checkpoint on disk holds finite values, and the cell
ends `failed` with the step and the quantity named.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import TrainerCallback

from .. import distributed
from ..config.algo import NONFINITE_MODES

SKIPPED_KEY = "nonfinite_skipped_steps"  # logged every step in skip mode (metrics.jsonl: train/...)


class NonFiniteTraining(RuntimeError):
    """Training produced a non-finite loss, gradient or trainable tensor."""


class NonFiniteGuard(TrainerCallback):
    """See the module docstring. The trainer (train/trl_seam.py) reports each micro-batch's loss through
    `saw_loss`."""

    def __init__(self, model, mode: str = "fail") -> None:
        if mode not in NONFINITE_MODES:
            raise ValueError(f"algo.nonfinite={mode!r} is invalid: expected one of {NONFINITE_MODES}")
        self.mode = mode
        self.params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.skipped = 0
        self._loss_ok: Optional[torch.Tensor] = None  # all of this step's losses finite (on the device: no sync)

    def saw_loss(self, loss: torch.Tensor) -> None:
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        loss_ok, self._loss_ok = self._loss_ok, None
        flags = [torch.isfinite(p.grad).all() for _, p in self.params if p.grad is not None]
        if loss_ok is not None:
            flags.append(loss_ok)
        ok = torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)
        if distributed.current().distributed:  # a loss that went bad on one rank stops every rank
            ok = torch.tensor(all(distributed.gather_to_all(bool(ok))))
        if bool(ok):
            return
        step = state.global_step + 1
        what = self._what(loss_ok)
        if self.mode == "fail":
            raise NonFiniteTraining(
                f"step {step}: {what} is not finite; training stopped before the optimizer "
                f"step{_kept(args)}. Lower algo.learning_rate (or raise the precision: "
                "model.dtype, adapter.precision), or set algo.nonfinite=skip to skip such steps"
            )
        for _, p in self.params:  # skip: the optimizer leaves a tensor without a gradient alone
            p.grad = None
        self.skipped += 1

    def on_step_end(self, args, state, control, **kwargs):
        if not self.params or bool(torch.stack([torch.isfinite(p.detach()).all() for _, p in self.params]).all()):
            return  # one host sync a step, whatever the number of trainable tensors
        bad = [name for name, p in self.params if not bool(torch.isfinite(p.detach()).all())]
        if bad:
            raise NonFiniteTraining(
                f"step {state.global_step}: the trainable tensor {_names(bad)} became non-finite "
                f"after a finite gradient (an overflow of its precision){_kept(args)}. Lower "
                "algo.learning_rate or raise adapter.precision"
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.mode == "skip" and "train_runtime" not in logs:
            logs[SKIPPED_KEY] = self.skipped

    def _what(self, loss_ok: Optional[torch.Tensor]) -> str:
        bad = [name for name, p in self.params if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        parts = []
        if loss_ok is not None and not bool(loss_ok):
            parts.append("the loss")
        if bad:
            parts.append(f"the gradient of {_names(bad)}")
        return " and ".join(parts) or "a gradient"


def _names(names: list) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} (and {len(names) - 1} more trainable tensors)"


def _kept(args) -> str:
    """Where the last checkpoint is: every one on disk was written before the non-finite step."""
    return f"; any checkpoint in {args.output_dir} was written before it and holds finite values"
