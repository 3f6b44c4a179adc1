"""Build TinyLoRA and LoRA-XS on a model: SVD factors, shared vectors, layer replacement."""

from __future__ import annotations

import time

import torch
from torch import nn

from .config import AdapterConfig
from .layers import SVDAdapterLinear, projection
from .svd import SVDCache
from .targets import Target

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class AdapterVectors(nn.Module):
    """The only trainable tensors of a TinyLoRA / LoRA-XS model: one vector per tie group."""

    def __init__(self, n_groups: int, size: int, dtype: torch.dtype, device):
        super().__init__()
        # Zero init: the adapted model starts identical to the base model.
        self.vectors = nn.ParameterList(
            [nn.Parameter(torch.zeros(size, dtype=dtype, device=device)) for _ in range(n_groups)]
        )


def build_svd_adapter(model: nn.Module, cfg: AdapterConfig, targets: list[Target], model_id: str):
    """Replace every target with an SVDAdapterLinear; returns (root, layers, init stats)."""
    cache = SVDCache(cfg.svd)
    first = model.get_submodule(targets[0].name).weight
    n_groups = max(t.group for t in targets) + 1
    root = AdapterVectors(n_groups, cfg.params_per_group, PRECISION_DTYPES[cfg.precision], first.device)
    layers: dict[str, SVDAdapterLinear] = {}
    start = time.perf_counter()
    for t in targets:
        base = model.get_submodule(t.name)
        f = cache.factors(model_id, t.name, base.weight, cfg.r)
        A = f.U * f.S[None, :]  # U Σ  (d × r)
        P = None
        if cfg.kind == "tinylora":
            P = projection(cfg.projection_seed, t.index, cfg.u, cfg.r).reshape(cfg.u, cfg.r * cfg.r)
            P = P.to(device=base.weight.device, dtype=root.vectors[0].dtype)
        layer = SVDAdapterLinear(base, A, f.Vh, P, root.vectors, t.group, cfg.forward)
        _replace(model, t.name, layer)
        layers[t.name] = layer
    if first.is_cuda:
        torch.cuda.synchronize(first.device)
    seconds = time.perf_counter() - start
    stats = {
        "init_s": seconds,
        "init_ms_per_module": 1000 * seconds / len(targets),
        "svd_cache_hits": cache.hits,
        "svd_cache_misses": cache.misses,
    }
    return root, layers, stats


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
