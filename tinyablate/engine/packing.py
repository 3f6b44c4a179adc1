"""Packed projections: linear layers that read the same input (q/k/v, gate/up) as one matmul.

A decode step at a few hundred rows spends most of its time in matmuls, and small ones run far from
the GPU's peak (Qwen2.5-7B's k_proj and v_proj have 512 output features each). Stacking the weights of
the layers that read one input by rows turns three matmuls into one, and two into one for the MLP.

Each member's *effective* weight is what the stack holds:
- a merged TinyLoRA / LoRA-XS layer (SVDAdapterLinear, adapter.forward=fused, enabled, ΔW not folded
  into W, not quantized) keeps
  its merged weight W + A M B in its rows of the stack (`keep_merged_weight_in`): the merge after an
  optimizer step writes there in place, and the layer's own forward reads the same rows, so the
  stack costs no memory and can never be stale;
- a plain frozen nn.Linear is copied into its rows, again whenever its weight is replaced or edited
  in place (its tensor version changes);
- anything else (a PEFT LoRA layer, a quantized base, an adapter in unmerged mode or disabled) is not
  packed: `pack_group` returns None and the engine calls the layers one by one.

`pack_layers` packs every decoder layer's groups (q/k/v, o, gate/up, down) into its `LayerPacks`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.layers import SVDAdapterLinear


def _packable(module) -> bool:
    if type(module) is nn.Linear:
        return not module.weight.requires_grad
    return isinstance(module, SVDAdapterLinear) and module.merges and not module.quantized


class PackedLinear:
    """y = x [W_1; W_2; ...]ᵀ + [b_1; b_2; ...], split back into each member's output.

    A single plain layer is not copied: its own weight and bias are used as they are.
    """

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = list(modules)
        first = self.modules[0].weight
        self.sizes = [m.out_features for m in self.modules]
        self.alias = len(self.modules) == 1 and not isinstance(self.modules[0], SVDAdapterLinear)
        if self.alias:
            self.weight, self.bias = first, self.modules[0].bias
            return
        self.weight = torch.empty(sum(self.sizes), first.shape[1], dtype=first.dtype, device=first.device)
        has_bias = any(m.bias is not None for m in self.modules)
        self.bias = torch.zeros(sum(self.sizes), dtype=first.dtype, device=first.device) if has_bias else None
        self._copied: list = [None] * len(self.modules)  # (data_ptr, version) of what each row block holds
        self._bias_copied: list = [None] * len(self.modules)
        bounds = [sum(self.sizes[:i]) for i in range(len(self.sizes) + 1)]
        self._rows = [self.weight[a:b] for a, b in zip(bounds, bounds[1:])]  # each member's block, as views
        self._bias_rows = [None if self.bias is None else self.bias[a:b] for a, b in zip(bounds, bounds[1:])]

    def refresh(self) -> None:
        """Make every row block hold its member's current effective weight (and bias)."""
        if self.alias:  # the layer's own tensors (a replaced weight is picked up here)
            self.weight, self.bias = self.modules[0].weight, self.modules[0].bias
            return
        with torch.no_grad():
            for i, module in enumerate(self.modules):
                if isinstance(module, SVDAdapterLinear):
                    module.keep_merged_weight_in(self._rows[i])
                else:
                    self._copied[i] = _copy_if_changed(self._rows[i], module.weight, self._copied[i])
                if self.bias is not None and module.bias is not None:
                    self._bias_copied[i] = _copy_if_changed(self._bias_rows[i], module.bias, self._bias_copied[i])

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1))

    def signature(self) -> tuple:
        return (self.weight.data_ptr(), 0 if self.bias is None else self.bias.data_ptr())


def _copy_if_changed(dst: torch.Tensor, src: torch.Tensor, copied) -> tuple:
    key = (src.data_ptr(), src._version)
    if key != copied:
        dst.copy_(src)
    return key


def pack_group(modules: Sequence[nn.Module], current: Optional[PackedLinear]) -> Optional[PackedLinear]:
    """A refreshed PackedLinear over `modules` (reusing `current` when it packs the same ones), or None."""
    if not all(_packable(m) for m in modules):
        return None
    shapes = {(m.weight.shape[1], m.weight.dtype, m.weight.device) for m in modules}
    if len(shapes) != 1:
        return None
    pack = current if current is not None and current.modules == list(modules) else PackedLinear(modules)
    pack.refresh()
    return pack


class LayerPacks(NamedTuple):
    """A decoder layer's packed projections; None where its layers cannot be packed."""

    qkv: Optional[PackedLinear]
    o: Optional[PackedLinear]
    gate_up: Optional[PackedLinear]
    down: Optional[PackedLinear]


NO_PACKS = LayerPacks(None, None, None, None)


def pack_layers(decoder, current: list, mlp_ok: bool) -> list:
    """Each decoder layer's packed weights (None where the layers cannot be packed), refreshed; `current`: the
    packs so far (reused where they pack the same layers); mlp_ok: the MLP computes silu(gate) x up (else its
    projections stay unpacked)."""
    packs = []
    for layer, old in zip(decoder.layers, current):
        attn, mlp = layer.self_attn, layer.mlp
        packs.append(
            LayerPacks(
                qkv=pack_group([attn.q_proj, attn.k_proj, attn.v_proj], old.qkv),
                o=pack_group([attn.o_proj], old.o),
                gate_up=pack_group([mlp.gate_proj, mlp.up_proj], old.gate_up) if mlp_ok else None,
                down=pack_group([mlp.down_proj], old.down) if mlp_ok else None,
            )
        )
    return packs
