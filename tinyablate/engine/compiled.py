"""What the engine compiles: the elementwise glue between its matmuls, and whole decoder layers.

- `_Glue`: a model's norms, residual adds, rotary embedding and SiLU x up as functions (HF's math:
  tinyablate/kernels.py), each compiled on its own where it can be (the prefill: dynamic shapes; the decode
  step: one version per number of rows), else HF's modules called as they are.
- With every projection of every layer packed (engine/packing.py) and HF's RMSNorm and SiLU MLP, a
  decoder layer at one new token is

    pre:   x += delta; h = rms_norm(x); q, k, v = h [Wq; Wk; Wv]ᵀ + b; rotary(q, k); k, v -> cache slot
    attention over the cache (engine/attention.py, or SDPA)
    post:  x += o_proj(attention); h = rms_norm(x); gate, up = h [Wg; Wu]ᵀ; delta = down_proj(silu(gate) up)

  `pre` and `post` are plain tensor functions of the layer's weights (passed in, so all layers share one
  compiled graph per batch bucket) that torch.compile turns into a few fused kernels around cuBLAS's
  matmuls. A CUDA-graph replay pays a few microseconds for every kernel it launches, and the uncompiled
  step launches dozens of them per layer; this cuts their number several-fold (profile: benchmarks/RESULTS.md).
- `EngineCompiled`: one engine's lookup of these functions compiled for its model and batch shapes.

Inductor's `emulate_precision_casts` rounds where HF's eager code rounds, so the fused kernels compute HF's
numbers (tests/test_engine.py, tests/test_engine_gpu.py).
"""

from __future__ import annotations

import torch.nn.functional as F

from .. import kernels
from ..kernels import rms_norm, silu_mul


def pre_attention(
    x,
    delta,
    norm_w,
    eps: float,
    qkv_w,
    qkv_b,
    rope,
    cos,
    sin,
    k_cache,
    v_cache,
    slot,
    heads: int,
    kv_heads: int,
    head_dim: int,
):
    """Residual add and norm, packed q/k/v, rotary, the new key/value into the cache at `slot`.

    x, delta: (rows, 1, hidden) (delta None at the first layer); rope: the model's own
    apply_rotary_pos_emb; cos, sin: (rows, 1, head_dim); k_cache, v_cache: (rows, kv heads, length,
    head_dim). Returns x and q as (rows, kv heads, groups, head_dim).
    """
    if delta is not None:
        x = x + delta
    h = rms_norm(x, norm_w, eps)
    rows = x.shape[0]
    q, k, v = F.linear(h, qkv_w, qkv_b).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    q = q.view(rows, 1, heads, head_dim).transpose(1, 2)
    k = k.view(rows, 1, kv_heads, head_dim).transpose(1, 2)
    v = v.view(rows, 1, kv_heads, head_dim).transpose(1, 2)
    q, k = rope(q, k, cos, sin)
    k_cache.index_copy_(2, slot, k)
    v_cache.index_copy_(2, slot, v)
    return x, q.reshape(rows, kv_heads, heads // kv_heads, head_dim)


def post_attention(x, attn, o_w, o_b, norm_w, eps: float, gate_up_w, gate_up_b, down_w, down_b):
    """o_proj and the residual add, norm, packed gate/up, SiLU x up, down_proj: returns (x, delta).

    attn: (rows, kv heads, groups, head_dim), the attention output of the query heads in order.
    """
    rows = x.shape[0]
    x = x + F.linear(attn.reshape(rows, 1, -1), o_w, o_b)
    h = rms_norm(x, norm_w, eps)
    gate, up = F.linear(h, gate_up_w, gate_up_b).chunk(2, dim=-1)
    return x, F.linear(silu_mul(gate, up), down_w, down_b)


def final_norm(x, delta, norm_w, eps: float):
    return rms_norm(x + delta, norm_w, eps)


class EngineCompiled:
    """One engine's compiled functions: `fn` compiled for the model's shape (`tag`, kernels.model_tag) and a
    batch shape (static shapes: each shape its own code), from the process's memo (kernels.compiled: a dict
    get per lookup; an eager decode step asks every step)."""

    def __init__(self, tag: str):
        self.tag = tag

    def __call__(self, fn, *batch_shape):
        return kernels.compiled(fn, "engine", self.tag, *batch_shape)


def _add_rms_norm(x, delta, weight, eps: float):
    x = x + delta
    return x, rms_norm(x, weight, eps)


class _Glue:
    """Norms, residual adds, rotary embedding and the MLP's SiLU x up of one model, as functions.

    With HF's RMSNorm and SiLU MLPs (`standard`) they are the functions above (compiled when `compiled`); any
    other module falls back to calling the module itself.
    """

    def __init__(self, decoder, rope, compiled: bool, dynamic: bool = False):
        layer = decoder.layers[0]
        norms = [decoder.norm] + [
            m for lay in decoder.layers for m in (lay.input_layernorm, lay.post_attention_layernorm)
        ]
        # standard: the norms and the MLP are HF's RMSNorm and SiLU MLP (tinyablate/kernels.py's functions)
        self.standard = all(kernels.is_hf_rms_norm(n) for n in norms) and kernels.is_silu_mlp(layer.mlp)
        # Compiled only where inductor can round where HF's eager code rounds (emulate_precision_casts: without
        # it bf16 norm outputs differ from HF's by an ulp, measured: benchmarks/RESULTS.md). One compiled version
        # per model shape (the prefill's, with dynamic shapes) or per model shape and rows (the decode step's,
        # fixed shapes), shared by every engine of the process (kernels.compiled).
        model = kernels.model_tag(decoder.config, decoder.embed_tokens.weight.dtype)
        tag = f"{'prefill' if dynamic else 'decode'}_{model}"
        if not (compiled and self.standard and kernels.available()):
            wrap = lambda f: f  # noqa: E731
        elif dynamic:
            wrap = lambda f: kernels.compiled(f, tag, dynamic=True)  # noqa: E731
        else:
            wrap = lambda f: _per_rows(f, tag)  # noqa: E731
        self._rms, self._add_rms, self._silu_mul, self._rope = (
            f if f is None else wrap(f) for f in (rms_norm, _add_rms_norm, silu_mul, rope)
        )

    def norm(self, module, x):
        return self._rms(x, module.weight, module.variance_epsilon) if self.standard else module(x)

    def add_norm(self, module, x, delta):
        if self.standard:
            return self._add_rms(x, delta, module.weight, module.variance_epsilon)
        x = x + delta
        return x, module(x)

    def rope(self, q, k, cos, sin):
        return self._rope(q, k, cos, sin)

    def mlp(self, mlp, h, gate_up=None):
        if self.standard:
            gate, up = gate_up(h) if gate_up is not None else (mlp.gate_proj(h), mlp.up_proj(h))
            return mlp.down_proj(self._silu_mul(gate, up))
        return mlp(h)


def _per_rows(fn, tag: str):
    """`fn` compiled for fixed shapes, one version per number of rows (its first argument's first dimension).

    `by_rows` compiles nothing: it holds kernels.compiled's code objects by rows, so a call of the decode step's
    glue (every layer of every eager step) costs one dict get and no call into kernels."""
    by_rows: dict = {}

    def call(x, *args):
        compiled = by_rows.get(x.shape[0])
        if compiled is None:
            compiled = by_rows[x.shape[0]] = kernels.compiled(fn, tag, x.shape[0])
        return compiled(x, *args)

    return call
