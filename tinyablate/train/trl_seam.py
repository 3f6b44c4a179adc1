"""The one seam to TRL and transformers' Trainer: every method of theirs that tinyablate overrides, and every
attribute of their trainers that it reads, are in this module; the rest of train/ is tinyablate's own functions,
which the overrides call.

TRL is pinned only `trl>=1.0,<2` and most of these methods are private, so tests/test_trl_seam.py records the
signature of each overridden method in the installed TRL / transformers, and each trainer attribute read here:
an upgrade that changes one fails that test instead of a sweep.

A trainer's tinyablate settings (`TrainerSettings`) are given to its constructor and kept, read-only; nothing
is set on a trainer from outside after construction. `trainer.guard` and `trainer.collapse_watch` read them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Iterator, Optional, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessorList
from trl import GRPOTrainer, SFTTrainer

from .. import distributed
from ..sampling import KeyedGumbelSampler, check_keys, rollout_keys
from .collapse import CollapseWatch
from .common import load_adapter_checkpoint, save_adapter_checkpoint
from .guard import NonFiniteGuard
from .mismatch import MismatchMeter, truncated_is_advantages
from .rollouts import ROW, engine_rollouts, rollout_engine


@dataclass(frozen=True)
class TrainerSettings:
    """What tinyablate adds to a TRL trainer, fixed when it is built (train/__init__.py build_trainer)."""

    guard: Optional[NonFiniteGuard] = None  # every micro-batch's loss goes to it (train/guard.py)
    collapse_watch: Optional[CollapseWatch] = None  # GRPO: told about every training generation (train/collapse.py)
    keyed_seed: Optional[int] = None  # GRPO: keyed rollouts under this seed (tinyablate/sampling.py); None: TRL's
    rollout_is_cap: Optional[float] = None  # GRPO: truncated importance sampling's cap (train/mismatch.py); None: off
    rollout_engine: str = "hf"  # GRPO: "hf" (TRL's generate) or the generation engine ("eager", "graph")


class _Settled:
    """A trainer that takes `settings` (TrainerSettings) at construction, hands each micro-batch's loss to its
    guard, and checkpoints only the trainable tensors (+ optimizer/RNG state: train/common.py)."""

    def __init__(self, *args, settings: TrainerSettings = TrainerSettings(), **kwargs) -> None:
        self._settings = settings
        super().__init__(*args, **kwargs)

    @property
    def settings(self) -> TrainerSettings:
        return self._settings

    @property
    def guard(self) -> Optional[NonFiniteGuard]:
        return self._settings.guard

    @property
    def collapse_watch(self) -> Optional[CollapseWatch]:
        return self._settings.collapse_watch

    # transformers Trainer.training_step (through TRL's)
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._settings.guard is not None:
            self._settings.guard.saw_loss(loss)
        return loss

    # transformers Trainer._save
    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        save_adapter_checkpoint(self.model, self.args, output_dir or self.args.output_dir)

    # transformers Trainer._load_from_checkpoint
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapter_checkpoint(model or self.model, resume_from_checkpoint)


class TinyablateSFTTrainer(_Settled, SFTTrainer):
    """SFTTrainer with adapter-only checkpoints and the non-finite guard."""


class TinyablateGRPOTrainer(_Settled, GRPOTrainer):
    """GRPOTrainer with adapter-only checkpoints, the non-finite guard, keyed rollouts when `settings.keyed_seed`
    is set, and rollouts from tinyablate's generation engine unless `settings.rollout_engine` is "hf" (TRL keeps
    rewards and loss); each training generation's statistics go to the collapse watch when set.

    With the engine's rollouts it logs the training-rollout mismatch every step (train/mismatch.py), log p_train
    from the training forward itself; with `settings.rollout_is_cap` set (algo.rollout_correction=truncated_is)
    each token's advantage is weighted by min(p_train / p_rollout, cap), p_train from one extra no-grad forward
    at generation time."""

    _rollout_keys = None  # the keys of the generation about to run (keyed sampling)
    _train_logps = None  # the training forward's log-probabilities, for compute_loss's mismatch

    def __init__(self, *args, **kwargs) -> None:
        self._mismatch = MismatchMeter()
        super().__init__(*args, **kwargs)

    # TRL GRPOTrainer._generate_and_score_completions
    def _generate_and_score_completions(self, inputs):
        settings = self._settings
        if settings.keyed_seed is not None and self.model.training:
            rows_by_rank = distributed.gather_to_all([x[ROW] for x in inputs])
            self._rollout_keys = rollout_keys(
                settings.keyed_seed, self.state.global_step, rows_by_rank, self.accelerator.process_index
            )
        out = super()._generate_and_score_completions(inputs)
        if settings.collapse_watch is not None and self.model.training:
            settings.collapse_watch.saw_rollouts(self._metrics["train"])  # TRL's statistics of these rollouts
        if settings.rollout_is_cap is not None and self.model.training:
            out["advantages"] = self._truncated_is_advantages(out)
        return out

    def _truncated_is_advantages(self, out) -> torch.Tensor:
        """Per-token advantages A * min(p_train / p_rollout, cap), p_train from a no-grad forward now."""
        sampling = out.get("sampling_per_token_logps")
        if sampling is None:
            raise RuntimeError("algo.rollout_correction=truncated_is needs the engine's sampling log-probabilities")
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        with torch.no_grad():
            train, _, _ = self._get_per_token_logps_and_entropies(
                self.model, ids, mask, out["completion_ids"].size(1), batch_size=self.args.per_device_train_batch_size
            )
        return truncated_is_advantages(
            out["advantages"], train, sampling, out["completion_mask"], self._settings.rollout_is_cap
        )

    # TRL GRPOTrainer._get_per_token_logps_and_entropies
    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if torch.is_grad_enabled():
            self._train_logps = logps.detach()  # the training forward's: compute_loss compares them to the rollout's
        return logps, entropies, aux

    # TRL GRPOTrainer.compute_loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._train_logps = None
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        sampling = inputs.get("sampling_per_token_logps")
        if sampling is not None and self._train_logps is not None and self.model.training:
            self._mismatch.add(self._train_logps, sampling, inputs["completion_mask"].bool())
        return loss

    # TRL GRPOTrainer.log
    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            logs.update(self._mismatch.take(self.accelerator.gather))
        return super().log(logs, *args, **kwargs)

    # TRL GRPOTrainer._generate_single_turn
    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        keys, self._rollout_keys = self._rollout_keys, None
        if keys is not None:
            check_keys(keys, len(prompt_ids))
        if self._settings.rollout_engine != "hf":
            return self._engine_rollouts(prompt_ids, keys)  # (completions, sampling log-probabilities)
        if keys is None:
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)
        with self._keyed_generation(keys):
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)

    def generation_engine(self):
        """The generation engine of this trainer's model (train/rollouts.py), for its rollouts."""
        return rollout_engine(
            self.accelerator.unwrap_model(self.model_wrapped),
            self._tokenizer.pad_token_id,
            self.eos_token_ids,
            self._settings.rollout_engine,
        )

    def _engine_rollouts(self, prompt_ids, keys):
        return engine_rollouts(
            self.generation_engine(),
            prompt_ids,
            keys,
            max_new_tokens=self.max_completion_length,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
        )

    @contextmanager
    def _keyed_generation(self, keys: Sequence[int]) -> Iterator[None]:
        """Within the block, the model generates with KeyedGumbelSampler (tinyablate/sampling.py): greedy over
        keyed scores, TRL's sampling settings switched off."""
        model = self.accelerator.unwrap_model(self.model_wrapped)
        sampler = KeyedGumbelSampler(keys, self.temperature, self.top_p)
        greedy = {
            **self.generation_kwargs,
            "do_sample": False,
            "temperature": None,
            "top_p": None,
            "top_k": None,
            "min_p": None,
        }
        saved = self.generation_config, self.generation_kwargs
        self.generation_config = GenerationConfig(**greedy, disable_compile=True)
        self.generation_kwargs = greedy
        model.generate = partial(type(model).generate, model, logits_processor=LogitsProcessorList([sampler]))
        try:
            yield
        finally:
            del model.generate
            self.generation_config, self.generation_kwargs = saved
