"""Elementwise kernels shared by the generation engine (tinyablate/engine) and training (train/glue.py).

The work between a Qwen2/Llama model's matmuls: HF's RMSNorm and the SiLU MLP's silu(gate) x up as plain
tensor functions (op for op HF's, so compiled they compute HF's numbers), the checks that a module computes
them, and `compiled`: torch.compile with the process's one memo of compiled functions, each caller on its own
code object (so the engine's decode step, its prefill and training keep separate recompile budgets; the
keyed sampler's noise, tinyablate/sampling.py, compiles there too). Inductor's
`emulate_precision_casts` rounds where HF's eager code rounds (bf16 norm output before the weight, the
residual sum), so the compiled kernels compute HF's numbers (tests/test_engine.py, tests/test_train_glue.py).

The engine imports from here, training imports from here; neither imports the other.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# Model types whose RMSNorm and MLP are the functions below (and whose decoder the engine runs).
ARCHITECTURES = ("qwen2", "llama")


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
    return (
        type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and hasattr(module, "weight")
    )


def is_silu_mlp(module) -> bool:
    """An HF gated MLP that computes down_proj(silu_mul(gate_proj(x), up_proj(x)))."""
    return getattr(getattr(module, "config", None), "hidden_act", None) == "silu" and all(
        hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj")
    )


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


# The process's compiled functions, the only memo of them: (fn, tag, dynamic, fullgraph, hf_rounding) -> code.
_COMPILED: dict = {}


def compiled(fn, *tag, dynamic: bool = False, fullgraph: Optional[bool] = None, hf_rounding: bool = True):
    """`fn` compiled into fused kernels (no CUDA graphs of its own: the engine captures), one per
    (fn, tag, options) in a process. Every compiled function of the project comes from here.

    tag: the parts (strings, ints) of the caller's name for its code: with a tag, `fn` compiles on its own code
    object (own_code, named fn__part1_part2...), so each caller keeps its own recompile budget; callers that
    pass the same tag share the compiled code (the engines of one model shape and batch shape: the cells a
    process runs one after another, a bundle or hydra.launcher.cells_per_job, compile it once). Without a tag
    `fn` itself is compiled. The tag is joined into a name only when compiling, so a lookup costs a dict get.
    dynamic: dynamic shapes (the prefill, training; may fall back to eager past the recompile budget); fixed
    shapes compile whole (fullgraph defaults to `not dynamic`: the decode step). hf_rounding: inductor's
    `emulate_precision_casts`, which rounds where HF's eager code rounds, so the kernels compute HF's numbers.
    """
    key = (fn, tag, dynamic, fullgraph, hf_rounding)
    code = _COMPILED.get(key)
    if code is None:
        code = _COMPILED[key] = torch.compile(
            own_code(fn, "_".join(map(str, tag))) if tag else fn,
            fullgraph=not dynamic if fullgraph is None else fullgraph,
            dynamic=dynamic,
            options={"emulate_precision_casts": True} if hf_rounding else None,
        )
    return code


def run_eager(fn, *tag, dynamic: bool = False, fullgraph: Optional[bool] = None, hf_rounding: bool = True) -> None:
    """From now on `compiled` with these arguments returns `fn` itself (its compile failed: train/glue.py)."""
    _COMPILED[(fn, tag, dynamic, fullgraph, hf_rounding)] = fn


def head_dim(config) -> int:
    """The attention head size of a transformers config (its head_dim, else hidden size / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def model_tag(config, dtype: torch.dtype) -> str:
    """A name for a model's shape and dtype (what compiled code depends on besides the batch shape)."""
    dims = (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        head_dim(config),
        config.intermediate_size,
        config.vocab_size,
    )
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
    """This torch's inductor can round where HF's eager code rounds (`emulate_precision_casts`): compiling is
    allowed only then."""
    import torch._inductor.config as inductor

    return hasattr(inductor, "emulate_precision_casts")
