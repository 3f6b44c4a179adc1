"""The generation engine: static KV cache, batched prefill, a decode step replayed from CUDA graphs.

    engine = GenerationEngine(model, pad_token_id=tok.pad_token_id, eos_token_ids=[tok.eos_token_id],
                              use_graphs=True)            # one per cell (per rank), reused
    completions = engine.generate(prompt_ids, max_new_tokens=256, sampling=Sampling(temperature=1.0))

Used by GRPO rollouts (train/grpo.py, `algo.rollout_engine`) and evaluation (eval.py, `eval.engine`).
Settings and their validation: `settings.py`; the engine itself: `core.py`.
"""

from .settings import ENGINES, check_engine_setting, resolve_engine

__all__ = ["ENGINES", "check_engine_setting", "resolve_engine", "GenerationEngine", "Sampling", "engine_for"]


def __getattr__(name):  # torch is imported only when the engine is used, not when a config is validated
    if name in ("GenerationEngine", "Sampling", "engine_for"):
        from . import core

        return getattr(core, name)
    raise AttributeError(name)
