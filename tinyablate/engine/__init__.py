"""The generation engine: static KV cache, batched prefill, a decode step replayed from CUDA graphs.

    engine = GenerationEngine(model, pad_token_id=tok.pad_token_id, eos_token_ids=[tok.eos_token_id],
                              use_graphs=True)            # one per cell (per rank), reused
    completions = engine.generate(prompt_ids, max_new_tokens=256, sampling=Sampling(temperature=1.0))

Used by GRPO rollouts (train/grpo.py, `algo.rollout_engine`) and evaluation (eval.py, `eval.engine`).
Which engine a setting means on a device: `settings.py` (the settings are declared and checked in
tinyablate/config); the engine itself: `core.py`.
"""

from .core import GenerationEngine, Sampling, engine_for
from .settings import ENGINES, resolve_engine

__all__ = ["ENGINES", "resolve_engine", "GenerationEngine", "Sampling", "engine_for"]
