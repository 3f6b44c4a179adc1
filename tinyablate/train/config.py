"""The training schema: GRPO or SFT through TRL, with every setting that matters pinned.

Defaults follow the TinyLoRA paper's GSM8K runs (arXiv 2602.04118) where they are known to this
project (as summarised in the project's cell issue: GRPO, 4 generations per prompt, 64 prompts per
batch, no KL penalty, learning rate 1e-5 for Qwen2.5-7B); everything else is pinned here rather than
left to TRL's defaults, which change between releases. The embedded CPU settings live in conf/algo/grpo_cpu.yaml and sft_cpu.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.settings import ENGINES

ALGOS = ("grpo", "sft")
GRPO_LOSSES = ("grpo", "dr_grpo", "dapo", "bnpo")
ROLLOUT_SAMPLERS = ("torch", "keyed")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")


@dataclass
class AlgoConfig:
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
    # number), so 1 and N GPUs with the same global batch sample the same rollouts (train/sampling.py).
    rollout_sampler: str = "torch"
    # GRPO rollout generator (tinyablate/engine): "auto" (the graph engine on CUDA, HF generate on CPU),
    # "graph" (static KV cache, decode step replayed from CUDA graphs; CUDA only), "eager" (the same
    # engine without graphs, any device) or "hf" (TRL's HF generate). Speed only: not in cell_id.
    rollout_engine: str = "auto"
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

    def validate(self, world_size: int = 1) -> "AlgoConfig":
        """Check every field; `world_size` is the cell's data-parallel ranks (its GPUs, at least 1)."""
        _one_of("name", self.name, ALGOS)
        _one_of("rollout_sampler", self.rollout_sampler, ROLLOUT_SAMPLERS)
        _one_of("rollout_engine", self.rollout_engine, ENGINES)
        _one_of("loss_type", self.loss_type, GRPO_LOSSES)
        _one_of("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        _one_of("scale_rewards", self.scale_rewards, ("group", "batch", "none"))
        for name in ("max_steps", "prompts_per_step", "micro_batch_size", "max_completion_length",
                     "max_length", "save_steps", "logging_steps", "num_iterations"):
            _positive_int(name, getattr(self, name))
        _non_negative_int("warmup_steps", self.warmup_steps)
        for name in ("learning_rate", "adam_epsilon", "temperature"):
            _positive_number(name, getattr(self, name))
        for name in ("weight_decay", "beta", "epsilon", "max_grad_norm"):
            _non_negative_number(name, getattr(self, name))
        if not 0 < self.top_p <= 1:
            raise ValueError(f"algo.top_p={self.top_p!r} is invalid: must be in (0, 1]")
        if self.name == "grpo":
            self._validate_grpo_batch()
        elif self.prompts_per_step % self.micro_batch_size:
            raise ValueError(
                f"algo.prompts_per_step={self.prompts_per_step} is not a multiple of "
                f"algo.micro_batch_size={self.micro_batch_size}: set them so the step splits into whole micro-batches"
            )
        self._validate_ranks(world_size)
        return self

    def _validate_ranks(self, world_size: int) -> None:
        """The global batch of a step must split evenly over the ranks' micro-batches."""
        per_step = self.sequences_per_step
        if world_size <= 1 or per_step % (self.micro_batch_size * world_size) == 0:
            return
        what = "completions (prompts_per_step x num_generations)" if self.name == "grpo" else "examples"
        if per_step % world_size:
            fix = "change algo.prompts_per_step so the GPUs divide it"
        else:
            fix = f"e.g. algo.micro_batch_size={_largest_divisor(per_step // world_size, self.micro_batch_size)}"
        raise ValueError(
            f"a step's {per_step} {what} do not split into algo.micro_batch_size={self.micro_batch_size} "
            f"x {world_size} GPUs: the global batch stays the same for any number of GPUs, so micro_batch_size x "
            f"GPUs must divide it ({fix})"
        )

    def _validate_grpo_batch(self) -> None:
        if not isinstance(self.num_generations, int) or self.num_generations < 2:
            raise ValueError(
                f"algo.num_generations={self.num_generations!r} is invalid: GRPO needs >= 2 completions per prompt "
                "(advantages are relative to the group)"
            )
        completions = self.prompts_per_step * self.num_generations
        if completions % self.micro_batch_size:
            raise ValueError(
                f"GRPO batch of algo.prompts_per_step x algo.num_generations = {self.prompts_per_step} x "
                f"{self.num_generations} = {completions} completions is not divisible by "
                f"algo.micro_batch_size={self.micro_batch_size}: pick a micro-batch size that divides it"
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


def _one_of(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"algo.{name}={value!r} is invalid: allowed values are {list(allowed)}")


def _positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"algo.{name}={value!r} is invalid: must be an integer >= 1")


def _non_negative_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"algo.{name}={value!r} is invalid: must be an integer >= 0")


def _positive_number(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"algo.{name}={value!r} is invalid: must be a number > 0")


def _non_negative_number(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"algo.{name}={value!r} is invalid: must be a number >= 0")
