"""The adapted linear layer of TinyLoRA and LoRA-XS:  y = x (W + A M B)ᵀ + b.

A = U Σ (d × r) and B = Vᵀ (r × k) are the frozen top-r SVD factors of W; M (r × r) is the only thing
that depends on trainable parameters: M = Σ_i v_i P_i (TinyLoRA) or M = R (LoRA-XS).

Two forward paths compute the same function:
- unmerged (the reference): x Wᵀ + ((x Bᵀ) Mᵀ) Aᵀ through autograd.
- merged (the setting adapter.forward=fused): y = x W_effᵀ with W_eff = W + A M B kept in a cache that
  is rebuilt only when v changes (once per optimizer step). Its custom backward gives x the gradient W_eff
  would give it and M the rank-r gradient (g A)ᵀ (x Bᵀ), so neither pass touches a d × k weight gradient.
  Generation and training then run at the frozen model's speed, plus two skinny matmuls and one merge per
  step.

The layer keeps W (`self.weight`) pristine and keeps the parameter names of nn.Linear, so the
model's state dict is unchanged apart from the adapter's own vectors.

On a quantized base (model.quantization, tinyablate/quantization.py) W is a bitsandbytes 4- or 8-bit
weight: A and B come from the dequantized W, the layer computes the quantized base's own output plus
((x Bᵀ) Mᵀ) Aᵀ in the compute dtype (the unmerged path), and merging ΔW into W is refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quantization import compute_dtype, is_quantized_linear
from .triton_merge import merge_into


class _MergedLowRankLinear(torch.autograd.Function):
    """y = x W_effᵀ + b, where W_eff = W + A M B was merged for the current M."""

    @staticmethod
    def forward(ctx, x, M, w_eff, A, B, bias):
        x_b = x @ B.t()  # tokens × r: all the backward needs from x
        ctx.save_for_backward(x_b, w_eff, A)
        ctx.m_dtype = M.dtype
        return F.linear(x, w_eff, bias)

    @staticmethod
    def backward(ctx, grad_y):
        x_b, w_eff, A = ctx.saved_tensors
        grad_x = grad_y @ w_eff if ctx.needs_input_grad[0] else None
        grad_m = None
        if ctx.needs_input_grad[1]:
            g_a = (grad_y @ A).reshape(-1, A.shape[1]).float()
            grad_m = (g_a.t() @ x_b.reshape(-1, x_b.shape[-1]).float()).to(ctx.m_dtype)
        return grad_x, grad_m, None, None, None, None


class SVDAdapterLinear(nn.Linear):
    """A drop-in replacement for an nn.Linear adapted with a frozen-SVD core M.

    `vectors` is the adapter root's ParameterList; this layer reads its group's entry, so a vector
    shared by many layers is registered (and optimised) once. `P` is this module's fixed projection
    (u × r·r, in v's dtype) or None for the identity basis (LoRA-XS: M = v viewed as r × r).
    """

    def __init__(self, base: nn.Linear, A, B, P, vectors: nn.ParameterList, group: int, forward_mode: str):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # pristine frozen W, same parameter object and name
        self.bias = base.bias
        # A quantized base computes its own output (unregistered: its weight is registered above)
        self._quantized_base = (base,) if is_quantized_linear(base) else None
        dtype = compute_dtype(base)
        self.register_buffer("A", A.to(dtype).contiguous(), persistent=False)
        self.register_buffer("B", B.to(dtype).contiguous(), persistent=False)
        self.register_buffer("P", P, persistent=False)
        self._vectors = (vectors,)  # a tuple, so the shared list is not registered here again
        self.group = group
        self._v = (vectors[group],)  # direct reference: the hot path skips ParameterList lookups
        self._forward_mode = forward_mode
        self._enabled = True
        self._w_eff = None
        self._w_eff_version = None
        self._pristine = None  # the base weight while ΔW is merged into self.weight

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        self.drop_cache()  # the hot path in forward() must never see a stale merged weight

    @property
    def forward_mode(self) -> str:
        return self._forward_mode

    @forward_mode.setter
    def forward_mode(self, value: str) -> None:
        self._forward_mode = value
        self.drop_cache()

    @property
    def is_merged(self) -> bool:
        """ΔW is merged into `weight` itself (merge()): the layer computes a plain linear until unmerge()."""
        return self._pristine is not None

    @property
    def merges(self) -> bool:
        """The forward reads the merged weight W + A M B: adapter.forward=fused, enabled, ΔW not folded into W."""
        return self._enabled and self._pristine is None and self._forward_mode == "fused"

    def state_signature(self) -> tuple:
        """What a computation captured with this layer (the engine's CUDA graphs) depends on besides its
        parameters' addresses: enabled, ΔW not folded into W, the forward mode, and the merged weight's address
        (0 unless it merges). Read it after `remerge`: a first merge allocates the merged weight."""
        w_eff = self._w_eff
        return (
            self._enabled,
            self._pristine is None,
            self._forward_mode,
            w_eff.data_ptr() if self.merges and w_eff is not None else 0,
        )

    @property
    def quantized(self) -> bool:
        """The frozen base is a quantized layer (it computes its own output; nothing is merged)."""
        return self._quantized_base is not None

    def merged_weight(self) -> torch.Tensor:
        """W + A M B for the current v: cached, recomputed in place when v has changed (its version counter)."""
        return self._merged_weight()

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    @property
    def v(self) -> nn.Parameter:
        return self._v[0]

    def core(self) -> torch.Tensor:
        """M (r × r) with autograd to v."""
        v, r = self.v, self.rank
        return v.view(r, r) if self.P is None else (v @ self.P).view(r, r)

    def delta_weight(self, dtype=torch.float32) -> torch.Tensor:
        """ΔW = A M B as a dense d × k tensor (float32 by default)."""
        with torch.no_grad():
            M = self.core().to(dtype)
            return (self.A.to(dtype) @ M) @ self.B.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._quantized_base is not None:
            y = self._quantized_base[0](x)
            if not self.enabled:
                return y
            M = self.core().to(self.A.dtype)
            return y + (((x.to(self.A.dtype) @ self.B.t()) @ M.t()) @ self.A.t()).to(y.dtype)
        # Hot path of generation: a fresh merged weight and no autograd -> one plain linear.
        w_eff = self._w_eff
        if w_eff is not None and not torch.is_grad_enabled() and self._v[0]._version == self._w_eff_version:
            return F.linear(x, w_eff, self.bias)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self._pristine is not None:
            return F.linear(x, self.weight, self.bias)  # disabled, or ΔW already merged into weight
        if self.forward_mode == "unmerged":
            M = self.core().to(x.dtype)
            return F.linear(x, self.weight, self.bias) + ((x @ self.B.t()) @ M.t()) @ self.A.t()
        w_eff = self._merged_weight()
        if torch.is_grad_enabled() and self.v.requires_grad:
            return _MergedLowRankLinear.apply(x, self.core(), w_eff, self.A, self.B, self.bias)
        return F.linear(x, w_eff, self.bias)

    def _merged_weight(self) -> torch.Tensor:
        version = self._v[0]._version
        if self._w_eff is None or version != self._w_eff_version:
            with torch.no_grad():
                if self._w_eff is None:
                    self._w_eff = torch.empty_like(self.weight)
                # W + (A M) B in one pass over W, accumulated in fp32 and rounded once.
                merge_into(self._w_eff, self.weight, self.A.float() @ self.core().float(), self.B)
            self._w_eff_version = version
        return self._w_eff

    def keep_merged_weight_in(self, storage: torch.Tensor) -> torch.Tensor:
        """Keep the merged weight W + A M B in `storage` (a d × k tensor of W's dtype that the caller owns,
        e.g. rows of the generation engine's packed q/k/v weight) from now on; returns it, merged for v.

        Merges later rewrite `storage` in place; a dropped cache (drop_cache) lets go of it.
        """
        if storage.shape != self.weight.shape or storage.dtype != self.weight.dtype:
            raise ValueError(
                f"merged-weight storage {tuple(storage.shape)} {storage.dtype} does not fit "
                f"{tuple(self.weight.shape)} {self.weight.dtype}"
            )
        if self._w_eff is None or self._w_eff.data_ptr() != storage.data_ptr():
            self._w_eff = storage
            self._w_eff_version = None  # merge into the new storage
        return self._merged_weight()

    def drop_cache(self) -> None:
        self._w_eff = None
        self._w_eff_version = None

    def _apply(self, fn, *args, **kwargs):
        self.drop_cache()  # a device or dtype move invalidates the merged copy
        return super()._apply(fn, *args, **kwargs)

    def merge(self) -> None:
        """Write W + ΔW into `weight` (as a new tensor) and keep the pristine W for `unmerge`."""
        if self._quantized_base is not None:
            raise NotImplementedError(
                "merging ΔW into a quantized base weight would re-quantize it (and lose ΔW): "
                "export the adapter (PEFT format) and merge it into the unquantized base instead"
            )
        if self._pristine is not None:
            return
        with torch.no_grad():
            merged = (self.weight.float() + self.delta_weight(torch.float32)).to(self.weight.dtype)
        self._pristine = self.weight.data
        self.weight.data = merged
        self.drop_cache()

    def unmerge(self) -> None:
        """Restore the pristine base weight bit for bit (no subtract drift)."""
        if self._pristine is None:
            return
        self.weight.data = self._pristine
        self._pristine = None

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.rank}, group={self.group}, "
            f"forward={self.forward_mode}"
        )


def remerge(modules) -> None:
    """Bring the merged weight of every SVDAdapterLinear among `modules` that merges up to its current v (in
    place: into its cached buffer, or the storage it keeps it in; nothing where v has not changed)."""
    for module in modules:
        if isinstance(module, SVDAdapterLinear) and module.merges:
            module.merged_weight()


def projection(seed: int, module_index: int, u: int, r: int) -> torch.Tensor:
    """The fixed random tensor P (u × r × r) of one module, from the seed and the module's index.

    Entries are N(0, 1/r), as in PEFT's TinyLoRA (the paper does not state the distribution).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + module_index)
    return torch.randn(u, r, r, generator=gen) / r**0.5
