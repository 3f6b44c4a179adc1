"""What GRPO and SFT share: adapter-only checkpoints, resume, and the pinned trainer arguments."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..adapters import load_trainable_state, trainable_state

ADAPTER_STATE = "adapter_state.safetensors"
TRAINER_STATE = "trainer_state.json"  # written last by Trainer._save_checkpoint: marks a complete checkpoint


class AdapterCheckpointMixin:
    """Checkpoints hold only the trainable tensors (bytes, not the 15 GB base) + optimizer/RNG state."""

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        save_file(trainable_state(self.model), os.path.join(output_dir, ADAPTER_STATE))
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        tensors = load_file(os.path.join(resume_from_checkpoint, ADAPTER_STATE))
        load_trainable_state(model or self.model, tensors, source=f"checkpoint {resume_from_checkpoint}")


def first_step_timer(times: dict):
    """A TrainerCallback that records the wall-clock time of the first training step in `times`."""
    import time

    from transformers import TrainerCallback

    class FirstStepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            times.setdefault("first_step", time.time())

    return FirstStepTimer()


def last_complete_checkpoint(checkpoint_dir: Path) -> Optional[Path]:
    """The newest checkpoint-N folder that was written completely, or None."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return None
    found = []
    for child in checkpoint_dir.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", child.name)
        if match and (child / TRAINER_STATE).exists() and (child / ADAPTER_STATE).exists():
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def trainer_kwargs(algo, seed: int, output_dir: Path, device: torch.device) -> dict:
    """Arguments shared by GRPOConfig and SFTConfig, all pinned (no reliance on TRL defaults)."""
    return dict(
        output_dir=str(output_dir),
        max_steps=algo.max_steps,
        learning_rate=algo.learning_rate,
        lr_scheduler_type=algo.lr_scheduler,
        warmup_steps=algo.warmup_steps,
        weight_decay=algo.weight_decay,
        adam_beta1=algo.adam_beta1,
        adam_beta2=algo.adam_beta2,
        adam_epsilon=algo.adam_epsilon,
        max_grad_norm=algo.max_grad_norm,
        optim="adamw_torch",
        per_device_train_batch_size=algo.micro_batch_size,
        gradient_accumulation_steps=algo.gradient_accumulation_steps,
        gradient_checkpointing=algo.gradient_checkpointing,
        save_strategy="steps",
        save_steps=algo.save_steps,
        save_total_limit=2,
        logging_steps=algo.logging_steps,
        report_to="none",  # W&B goes through tinyablate.logging's one sink
        seed=seed,
        data_seed=seed,
        bf16=False,  # the base already has its dtype; v keeps its own precision (no autocast)
        fp16=False,
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
    )
