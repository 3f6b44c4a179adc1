"""The collapse watch: a GRPO cell whose training has collapsed is named, not averaged.

A step is degenerate when the rollouts it trained on give GRPO nothing to learn from: every completion empty
(the end token first), every completion cut at algo.max_completion_length, or every group's rewards equal (zero
spread: all advantages zero, so a zero gradient, while AdamW's momentum still moves v). A cell has collapsed once
algo.collapse_steps steps in a row are degenerate; the collapse began at the first of them. The watch prints one
line then, and `record` holds what result.json keeps (cell_folder.CollapseRecord): the step it began, the step it
was named, why, whether training stopped there (algo.on_collapse=stop) and the step it recovered, if a healthy
step came after it (a new collapse later replaces it). With `stop`, no checkpoint is written at the stop, so a
resumed cell trains from its last checkpoint to the same stop.

Each step is judged by TRL's statistics of its rollouts, which TRL computes over every rank's completions
(`frac_reward_zero_std`, `completions/max_length`: tokens with the end token, `completions/clipped_ratio`): every
rank reaches the same verdict. The watch's state travels in each checkpoint's trainer_state.json (an
`ExportableState`), so a resumed cell goes on counting where its checkpoint left off.
"""

from __future__ import annotations

from typing import Optional

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..config.algo import COLLAPSE_ACTIONS
from ..console import collapse_line, recovery_line

ZERO_STD, MAX_LENGTH, CLIPPED = "frac_reward_zero_std", "completions/max_length", "completions/clipped_ratio"


def step_reason(stats: dict) -> Optional[str]:
    """Why a step's rollouts are degenerate (cell_folder.COLLAPSE_REASONS), None when they are not. `stats`: TRL's
    per-generation metrics, each a list whose last value is this generation's."""
    zero_std, max_length, clipped = (stats[key][-1] for key in (ZERO_STD, MAX_LENGTH, CLIPPED))
    if max_length <= 1 and clipped == 0:
        return "empty_completions"  # every completion is the end token alone
    if clipped >= 1:
        return "length_cap"
    if zero_std >= 1:
        return "zero_reward_spread"
    return None


class CollapseWatch(TrainerCallback, ExportableState):
    """See the module docstring. The trainer hands it each generation's statistics through `saw_rollouts`."""

    def __init__(self, steps: int = 5, action: str = "record") -> None:
        if action not in COLLAPSE_ACTIONS:
            raise ValueError(f"algo.on_collapse={action!r} is invalid: expected one of {COLLAPSE_ACTIONS}")
        self.steps, self.action = steps, action
        self.streak = 0  # degenerate steps in a row, up to the last step
        self.began: Optional[int] = None  # the first step of that streak
        self.record: Optional[dict] = None  # the last collapse (CollapseRecord's fields), None: none
        self.reason: Optional[str] = None  # the verdict on the newest rollouts (a step without new ones reuses it)

    def saw_rollouts(self, stats: dict) -> None:
        self.reason = step_reason(stats)

    def state(self) -> dict:
        return {
            "args": {"steps": self.steps, "action": self.action},
            "attributes": {"streak": self.streak, "began": self.began, "record": self.record},
        }

    def on_train_begin(self, args, state, control, **kwargs):
        name = type(self).__name__
        saved = state.stateful_callbacks.get(name)  # a resumed checkpoint's, else this watch's own
        if saved is None:  # a checkpoint written before the watch existed: transformers' save expects the key
            state.stateful_callbacks[name] = self.state()
            return
        for attribute, value in saved.get("attributes", {}).items():
            setattr(self, attribute, value)

    def on_step_end(self, args, state, control, **kwargs):
        step, main = state.global_step, state.is_world_process_zero
        if self.reason is None:
            if self.record is not None and self.record["recovered_step"] is None:
                self.record["recovered_step"] = step
                if main:
                    print(recovery_line(self.record), flush=True)
            self.streak, self.began = 0, None
            return
        self.streak += 1
        self.began = step if self.streak == 1 else self.began
        if self.streak != self.steps:
            return
        stop = self.action == "stop"
        self.record = {
            "step": self.began,
            "detected_step": step,
            "reason": self.reason,
            "stopped": stop,
            "recovered_step": None,
        }
        if main:
            print(collapse_line(self.record, self.steps), flush=True)
        if stop:
            control.should_training_stop = True
            control.should_save = False  # a resumed cell trains to this stop again from its last checkpoint


def recorded_collapse(trainer_state: dict) -> Optional[dict]:
    """The collapse a checkpoint's trainer_state.json holds (the watch's state, saved with it), else None."""
    saved = trainer_state.get("stateful_callbacks", {}).get(CollapseWatch.__name__, {})
    return saved.get("attributes", {}).get("record")
