"""SFT through TRL's SFTTrainer on the reference solutions, loss on the completion only."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset
from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled
from trl import SFTConfig

from .common import one_device_per_process, trainer_kwargs
from .trl_seam import TinyablateSFTTrainer, TrainerSettings


def build_sft_trainer(
    model, tokenizer, task, spec, output_dir: Path, device, callbacks=(), world_size: int = 1, settings=None
):
    """An SFTTrainer (train/trl_seam.py) over prompt-completion conversations built from the task's training
    problems; `settings`: the trainer's TrainerSettings (its guard)."""
    algo = spec.algo
    args = SFTConfig(
        **trainer_kwargs(algo, spec.seed, output_dir, device, world_size),
        max_length=algo.max_length,
        completion_only_loss=True,  # the prompt's tokens carry no loss
        packing=False,
    )
    one_device_per_process(args)
    dataset = Dataset.from_list(task.sft_rows(task.train_problems()))
    bars = is_progress_bar_enabled()
    disable_progress_bar()  # SFTTrainer's four dataset passes (tokenize, labels, truncate, drop) take < 1 s
    try:
        return TinyablateSFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=list(callbacks),
            settings=settings or TrainerSettings(),
        )
    finally:
        if bars:
            enable_progress_bar()
