"""The generation engine: static KV cache, batched prefill, a decode step replayed from CUDA graphs.

    engine = GenerationEngine(model, pad_token_id=tok.pad_token_id, eos_token_ids=[tok.eos_token_id],
                              use_graphs=True)            # one per cell (per rank), reused
    completions = engine.generate(prompt_ids, max_new_tokens=256, sampling=Sampling(temperature=1.0))

Used by GRPO rollouts (train/rollouts.py, `algo.rollout_engine`) and evaluation (evaluation/, `eval.engine`).
Which engine a setting means on a device: `settings.py` (the settings are declared and checked in
tinyablate/config). The engine itself, room by room:

- `core.py`: GenerationEngine (generate, reserve, release, refresh_weights; the decode loop), EngineOptions
  (experiment knobs), engine_for (one engine per model).
- `cache.py`: the KV cache, the decode state of a batch bucket, prompt padding and deduplication.
- `layers.py`: the decoder layers over the cache (prefill, decode step, decode attention backends).
- `sampler.py`: Sampling (how) and the sampler (greedy, temperature / top-k / top-p, keyed).
- `graphs.py`: CUDA-graph capture and replay of the decode step; the weight signature that drops stale graphs.
- `packing.py`: packed q/k/v and gate/up projections; `compiled.py`: what the engine compiles (the glue
  between matmuls, whole decoder layers); `attention.py`: the Triton decode attention.
The elementwise kernels shared with training (RMSNorm, SiLU x up, torch.compile memo): tinyablate/kernels.py.
"""

from .cache import kv_cache_bytes
from .core import EngineOptions, GenerationEngine, engine_for
from .sampler import Sampling
from .settings import ENGINES, resolve_engine

__all__ = ["ENGINES", "resolve_engine", "EngineOptions", "GenerationEngine", "Sampling", "engine_for", "kv_cache_bytes"]
