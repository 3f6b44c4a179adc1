"""The training-rollout mismatch of GRPO with the engine's rollouts, and its correction.

The mismatch is |log p_rollout - log p_train| over completion tokens, log p_rollout from the engine as it
sampled and log p_train from the training forward itself; it is logged every step (`rollout_logp_diff_mean`,
`_max`). With algo.rollout_correction=truncated_is each token's advantage is weighted by
min(p_train / p_rollout, algo.rollout_is_cap) (truncated importance sampling). The trainer (train/trl_seam.py)
hands both their log-probabilities.
"""

from __future__ import annotations

from typing import Callable

import torch


def truncated_is_advantages(
    advantages: torch.Tensor, train: torch.Tensor, sampling: torch.Tensor, completion_mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Per-token advantages A * min(p_train / p_rollout, cap), zero outside the completion mask. `advantages`:
    one per completion (or already one per token); `train`, `sampling`: per-token log-probabilities."""
    weight = torch.exp(train - sampling).clamp(max=cap) * completion_mask
    return (advantages[:, None] if advantages.dim() == 1 else advantages) * weight


class MismatchMeter:
    """|log p_rollout - log p_train| since the last log, as [sum, count, max] on the device (no host sync)."""

    def __init__(self) -> None:
        self.stats = None

    def add(self, train: torch.Tensor, sampling: torch.Tensor, mask: torch.Tensor) -> None:
        diff = (train - sampling).abs()[mask]
        stats = torch.stack(
            [diff.sum(), diff.new_tensor(diff.numel()), diff.max() if diff.numel() else diff.new_zeros(())]
        )
        if self.stats is None:
            self.stats = stats
        else:
            self.stats = torch.stack(
                [self.stats[0] + stats[0], self.stats[1] + stats[1], torch.maximum(self.stats[2], stats[2])]
            )

    def take(self, gather: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """The metrics over every rank (`gather`: the accelerator's) since the last take, and start afresh; {} when
        nothing was added."""
        if self.stats is None:
            return {}
        total, count, peak = gather(self.stats[None]).view(-1, 3).double().unbind(-1)
        self.stats = None
        return {
            "rollout_logp_diff_mean": float(total.sum() / count.sum().clamp(min=1)),
            "rollout_logp_diff_max": float(peak.max()),
        }
