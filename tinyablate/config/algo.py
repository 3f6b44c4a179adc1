"""The training schema: GRPO or SFT through TRL, with every setting that matters pinned.

Defaults follow the TinyLoRA paper's GSM8K runs (arXiv 2602.04118) where they are known to this
project (as summarised in the project's cell issue: GRPO, 4 generations per prompt, 64 prompts per
batch, no KL penalty, learning rate 1e-5 for Qwen2.5-7B); everything else is pinned here rather than
left to TRL's defaults, which change between releases. The embedded CPU settings live in conf/algo/grpo_cpu.yaml and sft_cpu.yaml.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from .checks import Checks, Section

ALGOS = ("grpo", "sft")
GRPO_LOSSES = ("grpo", "dr_grpo", "dapo", "bnpo")
ROLLOUT_SAMPLERS = ("torch", "keyed")
# Generators of GRPO rollouts and evaluation (tinyablate/engine): see AlgoConfig.rollout_engine.
ENGINES = ("auto", "graph", "eager", "hf")
# Quantized bases whose layers cannot be captured in a CUDA graph (LLM.int8's outlier split has a
# data-dependent shape): "auto" picks HF generate for them, "graph" is refused (tinyablate/engine/settings.py).
NOT_CAPTURABLE = ("int8",)
# Training's RMSNorms and SiLU x up as compiled kernels (tinyablate/train/glue.py): see AlgoConfig.train_kernels.
TRAIN_KERNELS = ("auto", "compiled", "eager")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
REWARD_SCALINGS = ("group", "batch", "none")
# Corrections of GRPO's rollout-training mismatch (tinyablate/train/mismatch.py): see AlgoConfig.rollout_correction.
ROLLOUT_CORRECTIONS = ("none", "truncated_is")
# What a non-finite loss, gradient or trainable tensor does (tinyablate/train/guard.py): see AlgoConfig.nonfinite.
NONFINITE_MODES = ("fail", "skip")
# What a GRPO cell does once its training has collapsed (tinyablate/train/collapse.py): see AlgoConfig.on_collapse.
COLLAPSE_ACTIONS = ("record", "stop")


@dataclass
class AlgoConfig(Section):
    """How a cell trains its adapter."""

    # grpo (RL from the task's reward) or sft (supervised on the reference solutions).
    name: str = "grpo"
    # Optimizer steps (set per sweep; not taken from the paper).
    max_steps: int = 100
    # AdamW learning rate. Paper: 1e-5 for Qwen2.5-7B; the embedded CPU preset uses 2e-3.
    learning_rate: float = 1e-5
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    # Must be >= 1e-7 when adapter.precision=fp16 (1e-8 rounds to zero in fp16).
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    # Prompts (GRPO) or examples (SFT) per optimizer step. Paper: 64 prompts per batch.
    prompts_per_step: int = 64
    # GRPO: completions sampled per prompt (the group). Paper: 4.
    num_generations: int = 4
    # Sequences per forward/backward pass; gradient accumulation covers the rest of the step.
    micro_batch_size: int = 16
    # GRPO: longest sampled completion; SFT: longest prompt + completion (tokens).
    max_completion_length: int = 512
    max_length: int = 1024
    # GRPO sampling.
    temperature: float = 1.0
    top_p: float = 1.0
    # GRPO rollout randomness. "torch": TRL's sampling from per-rank generators (rollouts depend on
    # the number of ranks). "keyed": each completion's noise is keyed by (seed, step, prompt, sample
    # number), so 1 and N GPUs with the same global batch sample the same rollouts (tinyablate/sampling.py).
    rollout_sampler: str = "torch"
    # GRPO rollout generator (tinyablate/engine): "auto" (the graph engine on CUDA, HF generate on CPU),
    # "graph" (static KV cache, decode step replayed from CUDA graphs; CUDA only), "eager" (the same
    # engine without graphs, any device) or "hf" (TRL's HF generate). Speed only: not in cell_id.
    rollout_engine: str = "auto"
    # Training's elementwise kernels between the matmuls (tinyablate/train/glue.py): "compiled" (every RMSNorm,
    # SiLU x up and rotary embedding fused by torch.compile, forward and backward; HF's forward arithmetic),
    # "eager" (HF's modules as they are) or "auto" (compiled on CUDA, eager on CPU). Speed only: not in cell_id.
    train_kernels: str = "auto"
    # The former name of train_kernels: still read (a warning says to rename it); null when not set.
    train_glue: Optional[str] = None
    # GRPO: how training treats the difference between the rollout generator's sampling distribution and the
    # training forward's (other kernels, batch shapes, bf16 rounding). The difference itself is logged every step
    # with the engine's rollouts (train/rollout_logp_diff_mean and _max: |log p_rollout - log p_train| over the
    # completion tokens). "none": plain on-policy GRPO. "truncated_is": each completion token's advantage is
    # weighted by min(p_train / p_rollout, algo.rollout_is_cap) (truncated importance sampling, as RL trainers
    # that sample with a separate engine do; TRL 1.16 offers it only for vLLM rollouts); it costs one extra
    # forward over the step's completions, and needs the engine's rollouts (algo.rollout_engine not hf).
    rollout_correction: str = "none"
    rollout_is_cap: float = 2.0
    # GRPO KL coefficient. Paper: no KL penalty (beta = 0), so no reference model is kept.
    beta: float = 0.0
    # GRPO loss normalisation (TRL's names). "grpo": per-sequence mean, the original GRPO; TRL's
    # default ("dapo") differs, so it is pinned here.
    loss_type: str = "grpo"
    # GRPO clipping range and policy updates per generation batch.
    epsilon: float = 0.2
    num_iterations: int = 1
    # GRPO advantage scaling: "group" divides by the group's reward std (original GRPO).
    scale_rewards: str = "group"
    # Checkpoint (adapter + optimizer + RNG state) every N steps; a restarted cell resumes from the last.
    save_steps: int = 25
    logging_steps: int = 1
    gradient_checkpointing: bool = False
    # A non-finite (NaN or inf) loss or gradient at an optimizer step (tinyablate/train/guard.py): "fail" stops the
    # cell (status failed, the step and the quantity named, the checkpoints on disk all finite); "skip" drops that
    # step's update and goes on (result.json counts the skipped steps). A trainable tensor that becomes non-finite
    # fails the cell either way.
    nonfinite: str = "fail"
    # GRPO: steps in a row after which a cell counts as collapsed (tinyablate/train/collapse.py): every group's
    # rewards equal (no advantage, so no gradient), or every completion empty or cut at max_completion_length, for
    # this many consecutive steps. result.json records it (metrics.collapse: the step it began); the status table,
    # the console and the analysis name it, and the analysis leaves such a cell out of its means.
    collapse_steps: int = 5
    # GRPO: what a collapse does: "record" (default) trains on to algo.max_steps and records it; "stop" ends
    # training at the step it is named (the cell completes with fewer steps, its result says so).
    on_collapse: str = "record"

    section = "algo"

    def check(self, c: Checks, world_size: int = 1) -> None:
        """Every field; `world_size` is the cell's data-parallel ranks (its GPUs, at least 1)."""
        c.choice("name", self.name, ALGOS)
        c.choice("rollout_sampler", self.rollout_sampler, ROLLOUT_SAMPLERS)
        c.choice("rollout_engine", self.rollout_engine, ENGINES)
        c.choice("train_kernels", self.train_kernels, TRAIN_KERNELS)
        if self.train_glue is not None:
            c.choice("train_glue", self.train_glue, TRAIN_KERNELS)
            if self.train_kernels not in ("auto", self.train_glue):
                c.fail(
                    "train_glue",
                    self.train_glue,
                    f"unset: it is the old name of train_kernels, set to {self.train_kernels!r} too",
                )
        c.choice("loss_type", self.loss_type, GRPO_LOSSES)
        c.choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        c.choice("scale_rewards", self.scale_rewards, REWARD_SCALINGS)
        c.choice("nonfinite", self.nonfinite, NONFINITE_MODES)
        c.choice("on_collapse", self.on_collapse, COLLAPSE_ACTIONS)
        c.choice("rollout_correction", self.rollout_correction, ROLLOUT_CORRECTIONS)
        c.number("rollout_is_cap", self.rollout_is_cap, minimum=1)
        for name in (
            "max_steps",
            "prompts_per_step",
            "micro_batch_size",
            "max_completion_length",
            "max_length",
            "save_steps",
            "logging_steps",
            "num_iterations",
            "collapse_steps",
        ):
            c.integer(name, getattr(self, name), minimum=1)
        c.integer("warmup_steps", self.warmup_steps, minimum=0)
        for name in ("learning_rate", "adam_epsilon", "temperature"):
            c.number(name, getattr(self, name), above=0)
        for name in ("weight_decay", "beta", "epsilon", "max_grad_norm"):
            c.number(name, getattr(self, name), minimum=0)
        for name in ("adam_beta1", "adam_beta2"):
            c.number(name, getattr(self, name), minimum=0, below=1)
        c.number("top_p", self.top_p, above=0, maximum=1)
        c.boolean("gradient_checkpointing", self.gradient_checkpointing)
        if self.name == "grpo":
            c.integer(
                "num_generations",
                self.num_generations,
                minimum=2,
                note=" (GRPO's advantages are relative to the group of completions of a prompt)",
            )
        if not c.problems:  # the batch rules below read the fields checked above
            self._check_batch(c)
            self._check_ranks(c, world_size)

    def _check_batch(self, c: Checks) -> None:
        """A step's sequences split into whole micro-batches."""
        if self.sequences_per_step % self.micro_batch_size == 0:
            return
        if self.name == "grpo":
            c.rule(
                f"GRPO batch of algo.prompts_per_step x algo.num_generations = {self.prompts_per_step} x "
                f"{self.num_generations} = {self.sequences_per_step} completions is not divisible by "
                f"algo.micro_batch_size={self.micro_batch_size}: pick a micro-batch size that divides it"
            )
        else:
            c.rule(
                f"algo.prompts_per_step={self.prompts_per_step} is not a multiple of "
                f"algo.micro_batch_size={self.micro_batch_size}: set them so the step splits into whole "
                "micro-batches"
            )

    def _check_ranks(self, c: Checks, world_size: int) -> None:
        """The global batch of a step must split evenly over the ranks' micro-batches."""
        per_step = self.sequences_per_step
        if world_size <= 1 or per_step % (self.micro_batch_size * world_size) == 0:
            return
        what = "completions (prompts_per_step x num_generations)" if self.name == "grpo" else "examples"
        if per_step % world_size:
            fix = "change algo.prompts_per_step so the GPUs divide it"
        else:
            fix = f"e.g. algo.micro_batch_size={_largest_divisor(per_step // world_size, self.micro_batch_size)}"
        c.rule(
            f"a step's {per_step} {what} do not split into algo.micro_batch_size={self.micro_batch_size} "
            f"x {world_size} GPUs: the global batch stays the same for any number of GPUs, so micro_batch_size x "
            f"GPUs must divide it ({fix})"
        )

    @property
    def sequences_per_step(self) -> int:
        """The global batch of one optimizer step: completions (GRPO) or examples (SFT)."""
        return self.prompts_per_step * (self.num_generations if self.name == "grpo" else 1)

    def gradient_accumulation_steps(self, world_size: int = 1) -> int:
        """Micro-batches per rank per step: the global batch is the same for any number of ranks."""
        return self.sequences_per_step // (self.micro_batch_size * world_size)


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


# The environment switch of training's attention check (tinyablate/train/attention_check.py): "on" (default) or
# "off" (torch's SDPA backends as they are: reproductions and benchmarks only); also 1/0, true/false.
ATTENTION_CHECK_ENV = "TINYABLATE_ATTENTION_CHECK"
_SWITCH = {"on": True, "1": True, "true": True, "off": False, "0": False, "false": False}


def attention_check_on() -> bool:
    """Whether the attention check runs; ValueError (one line naming the variable) for a value it does not know."""
    value = os.environ.get(ATTENTION_CHECK_ENV, "on")
    if value.lower() not in _SWITCH:
        raise ValueError(f"{ATTENTION_CHECK_ENV}={value!r} is invalid: expected 'on' or 'off'")
    return _SWITCH[value.lower()]
