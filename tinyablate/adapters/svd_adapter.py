"""Build TinyLoRA and LoRA-XS on a model: SVD factors, shared vectors, layer replacement."""

from __future__ import annotations

import time
import warnings

import torch
from torch import nn

from ..config.adapter import AdapterConfig
from ..fingerprint import Fingerprints
from ..quantization import compute_dtype, dense_weight
from .layers import SVDAdapterLinear, projection
from .svd import TIE_GAP, Factors, SVDCache
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
    bases: dict[str, Factors] = {}
    start = time.perf_counter()
    fingerprints = Fingerprints()
    for t in targets:  # a quantized base: its dequantized weight (what the model computes with)
        fingerprints.add(dense_weight(model.get_submodule(t.name)))
    names, digests = [t.name for t in targets], fingerprints.digests()
    stored = cache.cached_all(model_id, names, digests, cfg.r)  # one file for all modules: the warm path
    if stored is None:
        stored = [
            cache.cached(model_id, t.name, fp, cfg.r)
            or cache.compute(model_id, t.name, dense_weight(model.get_submodule(t.name)), cfg.r, fp)
            for t, fp in zip(targets, digests)
        ]
        cache.store_all(model_id, names, digests, stored)
    for t, full in zip(targets, stored):
        base = model.get_submodule(t.name)
        f = bases[t.name] = full.top(cfg.r)
        device, dtype = base.weight.device, compute_dtype(base)
        A = (f.U * f.S[None, :]).to(dtype).to(device)  # U Σ (d × r), rounded where the factors are
        B = f.Vh.to(dtype).to(device)
        P = None
        if cfg.kind == "tinylora":
            P = projection(cfg.projection_seed, t.index, cfg.u, cfg.r).reshape(cfg.u, cfg.r * cfg.r)
            P = P.to(dtype=root.vectors[0].dtype).to(device)
        layer = SVDAdapterLinear(base, A, B, P, root.vectors, t.group, cfg.forward)
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
        **basis_report(bases, cfg.r, cfg.svd.method),
    }
    return root, layers, stats


def basis_report(bases: dict[str, Factors], r: int, method: str) -> dict:
    """How exact the frozen bases are (for the result), warning about modules whose top-r is a tie.

    `svd_max_sin_bound`: the largest certified sine of the angle between a module's computed and true
    top-r subspaces, over the modules with a gap at r; `svd_ties`: modules whose relative gap
    (σ_r − σ_{r+1}) / σ_1 is below TIE_GAP, where the top-r subspace is not unique.
    """
    ties = sorted(name for name, f in bases.items() if f.is_tie(r))
    bounds = [f.sin_bound(r) for name, f in bases.items() if name not in ties]
    if ties:
        warnings.warn(
            f"frozen rank r={r}: {len(ties)} of {len(bases)} modules have a relative singular-value gap "
            f"(σ_r − σ_(r+1)) / σ_1 below {TIE_GAP}, so their top-{r} subspace is not unique (a tie) and the "
            f"{method} SVD picked one basis of it: {ties[:5]}{' ...' if len(ties) > 5 else ''}",
            stacklevel=2,
        )
    return {
        "svd_method": method,
        "svd_max_sin_bound": max(bounds, default=0.0),
        "svd_min_rel_gap": min((f.rel_gap(r) for f in bases.values()), default=None),
        "svd_ties": ties,
    }


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
