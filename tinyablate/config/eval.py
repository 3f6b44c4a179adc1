"""How evaluation generates: batched greedy pass@1 (strict and flexible), optional sampled pass@k."""

from __future__ import annotations

from dataclasses import dataclass

from .algo import ENGINES
from .checks import Checks, Section


@dataclass
class EvalConfig(Section):
    """How evaluation generates."""

    # Prompts per generate() call (left-padded).
    batch_size: int = 32
    # Longest completion; longer ones are cut (and usually score as wrong).
    max_new_tokens: int = 256
    # Evaluate before training too (the base accuracy; read from the cache when present).
    base: bool = True
    # Cache the base accuracy on disk, keyed by model, task and these settings.
    cache_base: bool = True
    # Sampled pass@k on top of greedy pass@1: 0 disables; k samples per problem at `temperature`.
    pass_k: int = 0
    temperature: float = 1.0
    # Generator (tinyablate/engine): "auto" (the graph engine on CUDA, HF generate on CPU), "graph",
    # "eager" or "hf"; see algo.rollout_engine. Speed only: not in cell_id nor the base-accuracy key.
    engine: str = "auto"
    # Prompts per engine call (its KV cache holds this many rows); batch_size is HF generate's.
    engine_batch_size: int = 256

    section = "eval"

    def check(self, c: Checks) -> None:
        c.integer("batch_size", self.batch_size, minimum=1)
        c.integer("max_new_tokens", self.max_new_tokens, minimum=1)
        c.choice("engine", self.engine, ENGINES)
        c.integer("engine_batch_size", self.engine_batch_size, minimum=1)
        c.boolean("base", self.base)
        c.boolean("cache_base", self.cache_base)
        c.integer("pass_k", self.pass_k, minimum=0, note=" (0 = off)")
        c.number("temperature", self.temperature, above=0)
