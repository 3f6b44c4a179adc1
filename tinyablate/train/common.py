"""What GRPO and SFT share: adapter-only checkpoints, resume, the pinned trainer arguments, and the
trainer callbacks (metrics to the cell's one sink, first-step time, rank sync check)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .. import distributed
from ..adapters import load_trainable_state, trainable_state
from ..cell_folder import ADAPTER_STATE
from ..console import duration, step_line
from ..metrics import MetricLogger, rewrite_trainer_logs

# transformers 5.x renamed `gradient_checkpointing` to `activation_checkpointing` (the old name warns).
CHECKPOINTING = (
    "activation_checkpointing"
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
    else "gradient_checkpointing"
)


def save_adapter_checkpoint(model, args, output_dir: str) -> None:
    """A checkpoint's model part: only the trainable tensors (bytes, not the 15 GB base) and the training
    arguments; the trainer writes optimizer and RNG state beside them."""
    os.makedirs(output_dir, exist_ok=True)
    save_file(trainable_state(model), os.path.join(output_dir, ADAPTER_STATE))
    torch.save(args, os.path.join(output_dir, "training_args.bin"))


def load_adapter_checkpoint(model, checkpoint: str) -> None:
    """Load a checkpoint's trainable tensors (save_adapter_checkpoint) into `model`."""
    tensors = load_file(os.path.join(checkpoint, ADAPTER_STATE))
    load_trainable_state(model, tensors, source=f"checkpoint {checkpoint}")


class FirstStepTimer(TrainerCallback):
    """Records the wall-clock time of the first training step in `times["first_step"]`."""

    def __init__(self, times: dict) -> None:
        self.times = times

    def on_step_begin(self, args, state, control, **kwargs):
        self.times.setdefault("first_step", time.time())


class MetricLoggerCallback(TrainerCallback):
    """Forwards a Trainer's logs to a MetricLogger at `state.global_step`.

    Only the main process logs. With `rewrite=True` (default) keys are renamed by
    `rewrite_trainer_logs` ("loss" -> "train/loss", "eval_accuracy" -> "eval/accuracy").
    """

    def __init__(self, logger: MetricLogger, rewrite: bool = True) -> None:
        self.logger = logger
        self.rewrite = rewrite

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            metrics = rewrite_trainer_logs(logs) if self.rewrite else dict(logs)
            self.logger.log(metrics, step=state.global_step)


class ConsoleCallback(TrainerCallback):
    """One compact line per logging step (`console.step_line`: step, reward or loss, s/step, ETA) in place of
    the trainer's progress bar and raw metrics dict; the main process only. Speed counts this run's steps
    (a resumed cell's earlier steps are not in it)."""

    def __init__(self) -> None:
        self.t0, self.step0 = None, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0, self.step0 = time.time(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        if "train_runtime" in logs:
            print(f"trained to step {state.global_step} in {duration(logs['train_runtime'])}", flush=True)
            return
        done = state.global_step - self.step0
        rate = (time.time() - self.t0) / done if done > 0 and self.t0 is not None else None
        print(step_line(state.global_step, state.max_steps, logs, rate), flush=True)


def use_console(trainer) -> None:
    """Replace the trainer's tqdm bar and dict printer by ConsoleCallback."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(ConsoleCallback())


class RankSyncCheck(TrainerCallback):
    """Verifies, after every optimizer step, that the trainable tensors are bit-identical on every rank
    (DDP all-reduces the gradients, so they must be); raises otherwise.

    It compares a per-tensor (sum, sum of squares, first element) fingerprint, a few floats per tensor.
    """

    def __init__(self, model) -> None:
        self.model = model

    def on_step_end(self, args, state, control, **kwargs):
        if distributed.current().distributed:
            distributed.require_same_on_all_ranks(
                trainable_fingerprint(self.model), f"the trainable parameters after step {state.global_step}"
            )


def trainable_fingerprint(model) -> list:
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            flat = p.detach().double().flatten()
            out.append((name, float(flat.sum()), float((flat * flat).sum()), float(flat[0])))
    return out


def ignore_frozen_in_ddp(model) -> None:
    """DDP broadcasts every parameter and buffer from rank 0 when it wraps the model, and buffers
    before every forward; the frozen base (GBs) and the adapters' fixed factors are identical on every
    rank by construction (checked by the cell), so only the trainable tensors take part."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    frozen = [name for name, _ in model.named_parameters() if name not in trainable]
    frozen += [name for name, _ in model.named_buffers()]
    model._ddp_params_and_buffers_to_ignore = frozen


def one_device_per_process(args) -> None:
    """A single-process cell trains on its one device: Trainer would otherwise wrap the model in
    nn.DataParallel over every GPU it can see (e.g. `gpus=1` run by hand on a 2-GPU machine)."""
    _ = args.device  # resolves the device (and sets n_gpu) now, so the override below sticks
    if args.world_size == 1 and args.n_gpu > 1:
        args._n_gpu = 1


def trainer_kwargs(algo, seed: int, output_dir: Path, device: torch.device, world_size: int = 1) -> dict:
    """Arguments shared by GRPOConfig and SFTConfig, all pinned (no reliance on TRL defaults).

    With N ranks each does 1/N of the step's micro-batches: the global batch does not change.
    """
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
        gradient_accumulation_steps=algo.gradient_accumulation_steps(world_size),
        **{CHECKPOINTING: algo.gradient_checkpointing},
        save_strategy="steps",
        save_steps=algo.save_steps,
        save_total_limit=2,
        logging_steps=algo.logging_steps,
        report_to="none",  # W&B goes through tinyablate.metrics's one sink
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (the guard, train/guard.py, stops or skips it)
        seed=seed,
        data_seed=seed,
        bf16=False,  # the base already has its dtype; v keeps its own precision (no autocast)
        fp16=False,
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
        # Data parallel (used when the cell runs as several ranks).
        # (the process group already exists: distributed.process_group; a backend named here would make
        # a single process try to join a group)
        ddp_backend=("nccl" if device.type == "cuda" else "gloo") if world_size > 1 else None,
        ddp_find_unused_parameters=False,  # every trainable tensor is used in every forward
        ddp_broadcast_buffers=False,  # buffers are fixed (SVD factors, P) and equal on every rank
        average_tokens_across_devices=True,  # token-mean losses over the global batch, as on one rank
    )
