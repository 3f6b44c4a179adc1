"""GRPO through TRL's GRPOTrainer, training the adapter already on the model (no peft_config)."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from .. import distributed
from ..engine import resolve_engine
from ..quantization import base_quantization
from ..sampling import keyed_generation, rollout_keys
from .common import AdapterCheckpointMixin, one_device_per_process, trainer_kwargs
from .guard import GuardedStepMixin
from .rollouts import engine_rollouts, reserve_rollout_cache

ROW = "row"  # dataset column: the prompt's index, part of each rollout's key under keyed sampling


def build_grpo_trainer(model, tokenizer, task, spec, output_dir: Path, device, callbacks=(), world_size: int = 1):
    """A GRPOTrainer over the task's training prompts, rewarded by the task's own scorer."""
    algo = spec.algo
    args = GRPOConfig(
        **trainer_kwargs(algo, spec.seed, output_dir, device, world_size),
        num_generations=algo.num_generations,
        max_completion_length=algo.max_completion_length,
        temperature=algo.temperature,
        top_p=algo.top_p,
        top_k=0,
        beta=algo.beta,
        loss_type=algo.loss_type,
        epsilon=algo.epsilon,
        num_iterations=algo.num_iterations,
        scale_rewards=algo.scale_rewards,
        mask_truncated_completions=False,
        shuffle_dataset=True,
        disable_dropout=True,
        log_completions=False,
    )
    one_device_per_process(args)
    rows = task.prompt_rows(task.train_problems())
    dataset = Dataset.from_list([{**row, ROW: i} for i, row in enumerate(rows)])
    trainer = TinyablateGRPOTrainer(
        model=model,
        reward_funcs=[task.reward_fn()],  # the task's own scorer (the one evaluation uses)
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    trainer.keyed_seed = spec.seed if algo.rollout_sampler == "keyed" else None
    trainer.rollout_is_cap = algo.rollout_is_cap if algo.rollout_correction == "truncated_is" else None
    trainer.rollout_engine = resolve_engine(algo.rollout_engine, torch.device(device).type, base_quantization(model))
    if trainer.rollout_engine != "hf":
        reserve_rollout_cache(trainer, tokenizer, rows, algo, world_size)
    return trainer


class TinyablateGRPOTrainer(GuardedStepMixin, AdapterCheckpointMixin, GRPOTrainer):
    """GRPOTrainer with adapter-only checkpoints, keyed rollouts when `keyed_seed` is set, and rollouts
    from tinyablate's generation engine unless `rollout_engine` is "hf" (TRL keeps rewards and loss); each training
    generation's statistics go to `collapse_watch` when set.

    With the engine's rollouts it logs the training-rollout mismatch every step: |log p_rollout - log p_train|
    over completion tokens (`rollout_logp_diff_mean`, `_max`), log p_train from the training forward itself;
    with `rollout_is_cap` set (algo.rollout_correction=truncated_is) each token's advantage is weighted by
    min(p_train / p_rollout, cap), p_train from one extra no-grad forward at generation time."""

    keyed_seed = None
    collapse_watch = None  # a CollapseWatch (train/collapse.py), told about every training generation
    rollout_engine = "hf"
    rollout_is_cap = None
    _rollout_keys = None
    _train_logps = None
    _mismatch = None  # [sum, count, max] of |log p_rollout - log p_train| since the last log (device tensors)

    def _generate_and_score_completions(self, inputs):
        if self.keyed_seed is not None and self.model.training:
            rows_by_rank = distributed.gather_to_all([x[ROW] for x in inputs])
            self._rollout_keys = rollout_keys(
                self.keyed_seed, self.state.global_step, rows_by_rank, self.accelerator.process_index
            )
        out = super()._generate_and_score_completions(inputs)
        if self.collapse_watch is not None and self.model.training:
            self.collapse_watch.saw_rollouts(self._metrics["train"])  # TRL's statistics of these rollouts
        if self.rollout_is_cap is not None and self.model.training:
            out["advantages"] = self._truncated_is_advantages(out)
        return out

    def _truncated_is_advantages(self, out) -> torch.Tensor:
        """Per-token advantages A * min(p_train / p_rollout, cap) (truncated importance sampling)."""
        sampling = out.get("sampling_per_token_logps")
        if sampling is None:
            raise RuntimeError("algo.rollout_correction=truncated_is needs the engine's sampling log-probabilities")
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        with torch.no_grad():
            train, _, _ = self._get_per_token_logps_and_entropies(
                self.model, ids, mask, out["completion_ids"].size(1), batch_size=self.args.per_device_train_batch_size
            )
        weight = torch.exp(train - sampling).clamp(max=self.rollout_is_cap) * out["completion_mask"]
        advantages = out["advantages"]
        return (advantages[:, None] if advantages.dim() == 1 else advantages) * weight

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if torch.is_grad_enabled():
            self._train_logps = logps.detach()  # the training forward's: compute_loss compares them to the rollout's
        return logps, entropies, aux

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._train_logps = None
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        sampling = inputs.get("sampling_per_token_logps")
        if sampling is not None and self._train_logps is not None and self.model.training:
            self._record_mismatch(self._train_logps, sampling, inputs["completion_mask"].bool())
        return loss

    def _record_mismatch(self, train, sampling, mask) -> None:
        diff = (train - sampling).abs()[mask]
        stats = torch.stack(
            [diff.sum(), diff.new_tensor(diff.numel()), diff.max() if diff.numel() else diff.new_zeros(())]
        )
        if self._mismatch is None:
            self._mismatch = stats
        else:
            self._mismatch = torch.stack(
                [self._mismatch[0] + stats[0], self._mismatch[1] + stats[1], torch.maximum(self._mismatch[2], stats[2])]
            )

    def log(self, logs, *args, **kwargs):
        if self._mismatch is not None and "loss" in logs:
            total, count, peak = self.accelerator.gather(self._mismatch[None]).view(-1, 3).double().unbind(-1)
            logs["rollout_logp_diff_mean"] = float(total.sum() / count.sum().clamp(min=1))
            logs["rollout_logp_diff_max"] = float(peak.max())
            self._mismatch = None
        return super().log(logs, *args, **kwargs)

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        keys, self._rollout_keys = self._rollout_keys, None
        if self.rollout_engine != "hf":
            return engine_rollouts(self, prompt_ids, keys)  # (completions, sampling log-probabilities)
        if keys is None:
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)
        if len(keys) != len(prompt_ids):
            raise RuntimeError(f"keyed sampling: {len(keys)} keys for {len(prompt_ids)} prompts")
        with keyed_generation(self, keys):
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)
