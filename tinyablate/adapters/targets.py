"""Which linear modules an adapter touches, in which order, and which of them share a vector.

Depth order is the model's module order: layer by layer, and inside a layer the order in which the
model registers its projections (q, k, v, o, gate, up, down for Qwen2 and Llama). Resolution reads
only module names and shapes, so every check here runs before any weight is read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..config.adapter import AdapterConfig, count_groups

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class Target:
    """One adapted linear module."""

    index: int  # position in depth order among the adapted modules (seeds its projection P)
    name: str  # full module name, e.g. model.layers.3.self_attn.q_proj
    type: str  # last name component, e.g. q_proj
    layer: int  # transformer layer index
    out_features: int
    in_features: int
    group: int = -1  # index of the shared trainable vector


def layer_index(name: str) -> int | None:
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def resolve_targets(model: nn.Module, cfg: AdapterConfig) -> list[Target]:
    """The adapted modules in depth order with their tie group; raises ValueError on bad axes."""
    wanted = set(cfg.target_modules)
    layers = None if cfg.layers is None else set(cfg.layers)
    found, seen_types, seen_layers = [], set(), set()
    for name, module in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind not in wanted or not isinstance(module, nn.Linear):
            continue
        layer = layer_index(name)
        if layer is None:
            continue
        seen_types.add(kind)
        seen_layers.add(layer)
        if layers is not None and layer not in layers:
            continue
        found.append(Target(len(found), name, kind, layer, module.out_features, module.in_features))
    _check_matches(cfg, found, seen_types, seen_layers, model)
    return _assign_groups(found, cfg)


def _check_matches(cfg, found, seen_types, seen_layers, model) -> None:
    missing = sorted(set(cfg.target_modules) - seen_types)
    if missing:
        available = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and layer_index(n) is not None
            }
        )
        raise ValueError(
            f"adapter.target_modules: {missing} match no linear module inside a transformer layer; "
            f"this model has {available}"
        )
    if cfg.layers is not None:
        bad = sorted(set(cfg.layers) - seen_layers)
        if bad:
            raise ValueError(
                f"adapter.layers: {bad} are not layers of this model; valid indices are "
                f"0..{max(seen_layers) if seen_layers else -1}"
            )
    if not found:
        raise ValueError("adapter.target_modules/adapter.layers select no module to adapt")
    if cfg.kind in ("tinylora", "lora_xs", "lora"):
        for t in found:
            limit = min(t.out_features, t.in_features)
            if cfg.r > limit:
                raise ValueError(
                    f"adapter.r={cfg.r} is invalid for {t.name} ({t.out_features}x{t.in_features}): "
                    f"must be between 1 and min(d, k)={limit}"
                )


def _assign_groups(targets: list[Target], cfg: AdapterConfig) -> list[Target]:
    tie = cfg.tie_value()
    if tie is None:
        return [_with_group(t, 0) for t in targets]
    if cfg.sharing == "tiled":
        return [_with_group(t, t.index // tie) for t in targets]
    # structured: modules of one type in consecutive adapted layers share; groups numbered in order of
    # first appearance so group ids stay contiguous.
    position_in_type: dict[str, int] = {}
    ids: dict[tuple[str, int], int] = {}
    out = []
    for t in targets:
        pos = position_in_type.get(t.type, 0)
        position_in_type[t.type] = pos + 1
        key = (t.type, pos // tie)
        ids.setdefault(key, len(ids))
        out.append(_with_group(t, ids[key]))
    return out


def _with_group(t: Target, group: int) -> Target:
    return Target(t.index, t.name, t.type, t.layer, t.out_features, t.in_features, group)


def expected_trainable_params(targets: list[Target], cfg: AdapterConfig) -> int:
    """The analytic parameter count, from module counts alone (tests compare it with the real one)."""
    if cfg.kind == "none":
        return 0
    if cfg.kind == "lora":
        return sum(cfg.r * (t.in_features + t.out_features) for t in targets)
    per_type: dict[str, int] = {}
    for t in targets:
        per_type[t.type] = per_type.get(t.type, 0) + 1
    return cfg.params_per_group * count_groups(per_type, cfg.tie_value(), cfg.sharing)
