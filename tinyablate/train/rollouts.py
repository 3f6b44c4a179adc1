"""GRPO rollouts: the dataset column that keys them, and rollouts from tinyablate's generation engine
(tinyablate/engine) behind TRL's generation seam.

TRL's GRPOTrainer calls `_generate_single_turn(prompt_ids, ...)` for a rank's completions and expects
each one as token ids up to and including the first EOS; with `algo.rollout_engine` other than "hf" the
project's trainer (train/trl_seam.py) answers it with `engine_rollouts`, so TRL still computes rewards,
advantages and loss.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from ..engine import Sampling, engine_for, kv_cache_bytes

ROW = "row"  # GRPO dataset column: the prompt's index, part of each rollout's key under keyed sampling

# Memory kept free for training beside the rollout KV cache, as a share of the GPU's memory.
TRAINING_HEADROOM = 0.25


def rollout_engine(model, pad_token_id: int, eos_token_ids: Sequence[int], kind: str):
    """The generation engine of `model` (kept on it: engine/core.py engine_for) for `algo.rollout_engine` = kind
    ("eager" or "graph")."""
    return engine_for(model, pad_token_id, eos_token_ids, use_graphs=kind == "graph", log=_log)


def _log(message: str) -> None:
    logging.getLogger("tinyablate").info(message)


def engine_rollouts(
    engine,
    prompt_ids: Sequence[Sequence[int]],
    keys: Optional[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: Optional[float],
    top_k: Optional[int],
    min_p: Optional[float],
    repetition_penalty: float,
) -> tuple:
    """The rank's completions (token ids, cut after the first EOS), sampled as TRL's settings say (keyed when
    `keys` are given), and each token's sampling log-probability (TRL keeps them as `sampling_per_token_logps`:
    train/mismatch.py)."""
    if min_p or repetition_penalty != 1.0:
        raise ValueError("the generation engine applies temperature, top_p and top_k only: use algo.rollout_engine=hf")
    sampling = Sampling(temperature=temperature, top_p=top_p or 1.0, top_k=top_k or 0, keyed=keys is not None)
    return engine.generate(prompt_ids, max_new_tokens, sampling, keys, logprobs=True)


def reserve_rollout_cache(engine, tokenizer, rows: list, algo, world_size: int) -> None:
    """Allocate the rollout KV cache of `engine` (rollout_engine) before training, or fail naming the settings
    to lower."""
    longest = max(len(_prompt_ids(tokenizer, row["prompt"])) for row in rows)
    batch = algo.prompts_per_step * algo.num_generations // max(world_size, 1)
    length = longest + algo.max_completion_length
    engine.refresh_weights()  # the packed weights first (engine/packing.py), so the free memory counts them
    need = kv_cache_bytes(engine.lm.config, batch, length, engine.dtype)
    if engine.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(engine.device)
        check_cache_fits(need, free + engine.cache_bytes, total, batch, length, world_size)
    engine.reserve(batch, length)


def check_cache_fits(need: int, free: int, total: int, batch: int, length: int, world_size: int) -> None:
    keep = TRAINING_HEADROOM * total
    if need <= free - keep:
        return
    gib = 2**30
    raise ValueError(
        f"the rollout KV cache for {batch} completions per GPU (algo.prompts_per_step x algo.num_generations / "
        f"gpus={world_size}) of up to {length} tokens (longest prompt + algo.max_completion_length) needs "
        f"{need / gib:.1f} GiB, but only {free / gib:.1f} GiB are free and {keep / gib:.1f} GiB are kept for "
        f"training: lower algo.prompts_per_step, algo.num_generations or algo.max_completion_length, use more "
        f"gpus, or set algo.rollout_engine=hf"
    )


def _prompt_ids(tokenizer, messages) -> list:
    """A GRPO row's prompt as tokens: chat messages through the template, plain text (multiple-choice
    tasks, tasks/choice.py) as it is, as TRL tokenizes each."""
    if isinstance(messages, str):
        return list(tokenizer(messages)["input_ids"])
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
