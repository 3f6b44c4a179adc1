"""Model shapes without weights: count and validate an adapter for a grid before anything loads.

`skeleton(name)` builds the decoder's linear modules on the meta device (no memory, no download)
with the official configs' sizes, so `adapters.resolve_targets` and the analytic parameter count
run on exactly the code path that a real cell uses.
"""

from __future__ import annotations

from functools import lru_cache

from torch import nn

from .adapters.targets import expected_trainable_params, resolve_targets
from .config.model import SHAPES, Shape  # the table is torch-free (cost models and dry runs read it)


class _Layer(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        self.self_attn = nn.Module()
        for name, (out_f, in_f) in {
            "q_proj": (q, s.hidden),
            "k_proj": (kv, s.hidden),
            "v_proj": (kv, s.hidden),
            "o_proj": (s.hidden, q),
        }.items():
            setattr(self.self_attn, name, nn.Linear(in_f, out_f, bias=False, device="meta"))
        self.mlp = nn.Module()
        for name, (out_f, in_f) in {
            "gate_proj": (s.intermediate, s.hidden),
            "up_proj": (s.intermediate, s.hidden),
            "down_proj": (s.hidden, s.intermediate),
        }.items():
            setattr(self.mlp, name, nn.Linear(in_f, out_f, bias=False, device="meta"))


@lru_cache(maxsize=None)
def skeleton(name: str) -> nn.Module:
    """The model's adaptable linear modules on the meta device, named as in transformers."""
    if name not in SHAPES:
        raise ValueError(f"model.name={name!r} has no known shape; known: {sorted(SHAPES)}")
    s = SHAPES[name]
    root = nn.Module()
    root.model = nn.Module()
    root.model.layers = nn.ModuleList([_Layer(s) for _ in range(s.layers)])
    return root


def adapter_size(model_name: str, adapter_cfg) -> tuple[int, int]:
    """(trainable parameters, trainable bytes) of `adapter_cfg` on `model_name`; validates both."""
    targets = resolve_targets(skeleton(model_name), adapter_cfg)
    params = expected_trainable_params(targets, adapter_cfg)
    return params, params * adapter_cfg.bytes_per_param
