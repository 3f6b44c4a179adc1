"""Which generator a cell uses for GRPO rollouts (`algo.rollout_engine`) and evaluation (`eval.engine`).

- "auto": "graph" on CUDA, "hf" on CPU (the default); "hf" also on an int8 base (model.quantization=int8),
  whose LLM.int8() matmul splits out outlier columns of data-dependent size and so cannot be captured
  in a CUDA graph (measured: benchmarks/RESULTS.md; nf4 bases are captured and replayed exactly).
- "graph": this package's engine with its decode step captured in CUDA graphs (CUDA only).
- "eager": the same engine run step by step without graphs (any device; what the CPU tests cover).
- "hf": transformers' `generate` (TRL's own path for rollouts).

The settings themselves are checked with the cell's config (tinyablate/config: the values in
`algo.py`, the rule that "graph" needs a CUDA cell in `spec.py`), before anything loads.
"""

from __future__ import annotations

from ..config.algo import ENGINES, NOT_CAPTURABLE  # declared with the settings that use them (torch-free)

__all__ = ["ENGINES", "resolve_engine"]


def resolve_engine(value: str, device_type: str, quantization: str = "none") -> str:
    """The concrete engine ("graph", "eager" or "hf") for a setting on a device type ("cuda", "cpu", ...)
    and a base's model.quantization."""
    if value == "auto":
        return "graph" if device_type == "cuda" and quantization not in NOT_CAPTURABLE else "hf"
    if value == "graph" and device_type != "cuda":
        raise ValueError(f"rollout/eval engine 'graph' needs a CUDA device, got {device_type!r}")
    if value == "graph" and quantization in NOT_CAPTURABLE:
        raise ValueError(
            f"rollout/eval engine 'graph' cannot capture a model.quantization={quantization} base: "
            "use eager, hf or auto"
        )
    return value
