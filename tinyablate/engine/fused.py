"""The decode step's decoder layers as two compiled functions each, around the attention.

With every projection of every layer packed (engine/packing.py) and HF's RMSNorm and SiLU MLP, a
decoder layer at one new token is

    pre:   x += delta; h = rms_norm(x); q, k, v = h [Wq; Wk; Wv]ᵀ + b; rotary(q, k); k, v -> cache slot
    attention over the cache (engine/attention.py, or SDPA)
    post:  x += o_proj(attention); h = rms_norm(x); gate, up = h [Wg; Wu]ᵀ; delta = down_proj(silu(gate) up)

`pre` and `post` are plain tensor functions of the layer's weights (passed in, so all layers share one
compiled graph per batch bucket) that torch.compile turns into a few fused kernels around cuBLAS's
matmuls. A CUDA-graph replay pays a few microseconds for every kernel it launches, and the uncompiled
step launches ~1,100 of them for a 28-layer model (profile in benchmarks/RESULTS.md); this cuts that to a
few hundred. Inductor's `emulate_precision_casts` rounds where HF's eager code rounds (bf16 norm output
before the weight, the residual sum), so the fused kernels compute HF's numbers
(tests/test_engine.py, tests/test_engine_gpu.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps: float):
    """HF's Qwen2RMSNorm / LlamaRMSNorm, op for op."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def silu_mul(gate, up):
    """The SiLU MLP's activation: silu(gate) x up."""
    return F.silu(gate) * up


def is_hf_rms_norm(module) -> bool:
    """An HF RMSNorm that computes rms_norm above (Qwen2RMSNorm, LlamaRMSNorm: `weight`, `variance_epsilon`)."""
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and hasattr(module, "weight"))


def is_silu_mlp(module) -> bool:
    """An HF gated MLP that computes down_proj(silu_mul(gate_proj(x), up_proj(x)))."""
    return (getattr(getattr(module, "config", None), "hidden_act", None) == "silu"
            and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")))


def pre_attention(x, delta, norm_w, eps: float, qkv_w, qkv_b, rope, cos, sin, k_cache, v_cache, slot,
                  heads: int, kv_heads: int, head_dim: int):
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


def plain_function(fn):
    """The plain function behind HF's modeling functions: with the `kernels` package installed (a dependency of
    transformers >= 5.2x) `modeling_qwen2.apply_rotary_pos_emb` is a `kernels` Func module that dispatches to
    a Hub kernel when one is active and else calls the function it wraps; compiled code takes that function."""
    if isinstance(fn, torch.nn.Module):
        forward = type(fn).forward
        cells = dict(zip(forward.__code__.co_freevars, forward.__closure__ or ()))
        if "func" in cells and callable(cells["func"].cell_contents):
            return cells["func"].cell_contents
    return fn


def exponential_race(logits, noise, temperature: float):
    """argmax of softmax(logits / T) / noise, noise ~ Exp(1): an exact categorical draw (one fused kernel),
    and the drawn token's log-probability under softmax(logits / T).

    Computed as argmax(logits / T - log noise) (log is monotone and log softmax = logits / T - a per-row
    constant, i.e. the Gumbel-max form): the logits (any float dtype, read as float32) are read once for the
    draw and once for the log-sum-exp.
    """
    scores = logits.float() / temperature
    token = (scores - noise.log()).argmax(-1)
    return token, token_logprob(scores, token)


def token_logprob(scores, token):
    """log softmax(scores)[row, token[row]] in float32, without materialising the log-softmax."""
    return scores.gather(-1, token[:, None])[:, 0] - scores.logsumexp(-1)


_COMPILED: dict = {}


def compiled(fn, tag: str, dynamic: bool = False):
    """`fn` compiled into fused kernels (no CUDA graphs of its own: the engine captures), on its own code
    object for `tag` (see own_code), one per (fn, tag, dynamic) in a process: engines that pass the same tag (one
    model shape, one batch shape: `model_tag`) share the compiled code, so the cells that a process runs one
    after another (a bundle, hydra.launcher.cells_per_job) compile it once. Fixed shapes compile whole
    (fullgraph: the decode step); dynamic shapes (the prefill, training) may fall back to eager past the
    recompile budget. `emulate_precision_casts` rounds where HF's eager code rounds, so the kernels compute
    HF's numbers."""
    key = (fn, tag, dynamic)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(own_code(fn, tag), fullgraph=not dynamic, dynamic=dynamic,
                                       options={"emulate_precision_casts": True})
    return _COMPILED[key]


def model_tag(config, dtype: torch.dtype) -> str:
    """A name for a model's shape and dtype (what compiled code depends on besides the batch shape)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dims = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            head_dim, config.intermediate_size, config.vocab_size)
    return f"{config.model_type}_{'_'.join(map(str, dims))}_{str(dtype).removeprefix('torch.')}"


def own_code(fn, tag: str):
    """`fn` with a copy of its code object, so torch.compile keeps its compiled versions apart.

    Dynamo keeps a function's compiled graphs on its code object and allows each code object a few of them
    (torch._dynamo.config.recompile_limit, 8): the decode step (fixed shapes), the prefill and training
    (dynamic shapes) and every engine of a process would otherwise share, and exhaust, one budget.
    """
    import types

    code = fn.__code__.replace(co_name=f"{fn.__name__}__{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def available() -> bool:
    import torch._inductor.config as inductor

    return hasattr(inductor, "emulate_precision_casts")
