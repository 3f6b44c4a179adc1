"""GRPO through TRL's GRPOTrainer, training the adapter already on the model (no peft_config)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from datasets import Dataset
from trl import GRPOConfig

from ..engine import resolve_engine
from ..quantization import base_quantization
from .common import one_device_per_process, trainer_kwargs
from .rollouts import ROW, reserve_rollout_cache
from .trl_seam import TinyablateGRPOTrainer, TrainerSettings


def build_grpo_trainer(
    model, tokenizer, task, spec, output_dir: Path, device, callbacks=(), world_size: int = 1, settings=None
):
    """A GRPOTrainer (train/trl_seam.py) over the task's training prompts, rewarded by the task's own scorer.
    `settings`: the trainer's TrainerSettings (guard, collapse watch); the rollout ones are set here from
    spec.algo."""
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
    settings = dataclasses.replace(
        settings or TrainerSettings(),
        keyed_seed=spec.seed if algo.rollout_sampler == "keyed" else None,
        rollout_is_cap=algo.rollout_is_cap if algo.rollout_correction == "truncated_is" else None,
        rollout_engine=resolve_engine(algo.rollout_engine, torch.device(device).type, base_quantization(model)),
    )
    trainer = TinyablateGRPOTrainer(
        model=model,
        reward_funcs=[task.reward_fn()],  # the task's own scorer (the one evaluation uses)
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
        settings=settings,
    )
    if settings.rollout_engine != "hf":
        reserve_rollout_cache(trainer.generation_engine(), tokenizer, rows, algo, world_size)
    return trainer
