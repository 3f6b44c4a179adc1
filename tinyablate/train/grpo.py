"""GRPO through TRL's GRPOTrainer, training the adapter already on the model (no peft_config)."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from .. import distributed
from ..engine import resolve_engine
from ..quantization import base_quantization
from .common import AdapterCheckpointMixin, one_device_per_process, trainer_kwargs
from .rollouts import engine_rollouts, reserve_rollout_cache
from ..sampling import keyed_generation, rollout_keys

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
    trainer.rollout_engine = resolve_engine(algo.rollout_engine, torch.device(device).type, base_quantization(model))
    if trainer.rollout_engine != "hf":
        reserve_rollout_cache(trainer, tokenizer, rows, algo, world_size)
    return trainer


class TinyablateGRPOTrainer(AdapterCheckpointMixin, GRPOTrainer):
    """GRPOTrainer with adapter-only checkpoints, keyed rollouts when `keyed_seed` is set, and rollouts
    from tinyablate's generation engine unless `rollout_engine` is "hf" (TRL keeps rewards and loss)."""

    keyed_seed = None
    rollout_engine = "hf"
    _rollout_keys = None

    def _generate_and_score_completions(self, inputs):
        if self.keyed_seed is not None and self.model.training:
            rows_by_rank = distributed.gather_to_all([x[ROW] for x in inputs])
            self._rollout_keys = rollout_keys(self.keyed_seed, self.state.global_step, rows_by_rank,
                                              self.accelerator.process_index)
        return super()._generate_and_score_completions(inputs)

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        keys, self._rollout_keys = self._rollout_keys, None
        if self.rollout_engine != "hf":
            return engine_rollouts(self, prompt_ids, keys), None
        if keys is None:
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)
        if len(keys) != len(prompt_ids):
            raise RuntimeError(f"keyed sampling: {len(keys)} keys for {len(prompt_ids)} prompts")
        with keyed_generation(self, keys):
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)
