"""Which generator a cell uses for GRPO rollouts (`algo.rollout_engine`) and evaluation (`eval.engine`).

- "auto": "graph" on CUDA, "hf" on CPU (the default).
- "graph": this package's engine with its decode step captured in CUDA graphs (CUDA only).
- "eager": the same engine run step by step without graphs (any device; what the CPU tests cover).
- "hf": transformers' `generate` (TRL's own path for rollouts).

Torch-free, so a config is checked before anything loads.
"""

from __future__ import annotations

ENGINES = ("auto", "graph", "eager", "hf")


def check_engine_setting(field: str, value, gpus: int, device: str = "auto") -> None:
    """Raise ValueError naming `field` if `value` is not an engine, or asks for graphs on a CPU cell."""
    if value not in ENGINES:
        raise ValueError(f"{field}={value!r} is invalid: allowed values are {list(ENGINES)}")
    on_cpu = device == "cpu" or (gpus == 0 and not str(device).startswith("cuda"))
    if value == "graph" and on_cpu:
        raise ValueError(
            f"{field}=graph needs a CUDA GPU (its decode step is replayed from CUDA graphs) but this cell runs on "
            f"the CPU (gpus={gpus}, model.device={device}): use {field}=eager (the same engine without graphs), "
            f"hf or auto"
        )


def resolve_engine(value: str, device_type: str) -> str:
    """The concrete engine ("graph", "eager" or "hf") for a setting on a device type ("cuda", "cpu", ...)."""
    if value == "auto":
        return "graph" if device_type == "cuda" else "hf"
    if value == "graph" and device_type != "cuda":
        raise ValueError(f"rollout/eval engine 'graph' needs a CUDA device, got {device_type!r}")
    return value
