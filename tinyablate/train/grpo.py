"""GRPO through TRL's GRPOTrainer, training the adapter already on the model (no peft_config)."""

from __future__ import annotations

from pathlib import Path

from ..tasks.scoring import reward_fn
from .common import AdapterCheckpointMixin, trainer_kwargs


def build_grpo_trainer(model, tokenizer, task, spec, output_dir: Path, device, callbacks=()):
    """A GRPOTrainer over the task's training prompts, rewarded by the task's own scorer."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    class TinyablateGRPOTrainer(AdapterCheckpointMixin, GRPOTrainer):
        pass

    algo = spec.algo
    args = GRPOConfig(
        **trainer_kwargs(algo, spec.seed, output_dir, device),
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
    dataset = Dataset.from_list(task.prompt_rows(task.train_problems()))
    return TinyablateGRPOTrainer(
        model=model,
        reward_funcs=[reward_fn(spec.task.scorer)],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
