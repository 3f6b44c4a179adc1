"""Training's elementwise glue as compiled kernels: every RMSNorm, every MLP's SiLU x up and the rotary
embedding, forward and backward.

A TinyLoRA step's forward and backward are the frozen model's matmuls plus the elementwise work between
them. Eager, HF's RMSNorm is seven kernels that each read and write the activations in float32 (and the
backward as many again), SiLU x up three over the MLP's widest tensors and the rotary embedding
six over the queries and keys: a large share of a GRPO step (measured: benchmarks/RESULTS.md, "GRPO
step"). Compiled by torch.compile (dynamic shapes: one compile for every sequence length), each becomes one fused kernel
forward and one or two backward, with the same arithmetic: inductor's `emulate_precision_casts` rounds
where HF's code rounds, so the forward equals HF's bit for bit in bf16 (tests/test_train_glue.py).

`algo.train_kernels` chooses it: "auto" (the default: compiled on CUDA, eager on CPU), "compiled" or
"eager". A function whose compile fails warns once and runs eager from then on. The model
is changed only inside `compiled_glue(model)`; leaving it restores HF's own forwards. Qwen2 and Llama
models only (their RMSNorm is tinyablate/kernels.py's rms_norm, the kernels the generation engine compiles
too); others stay eager.
"""

from __future__ import annotations

import sys
import types
import warnings
from contextlib import contextmanager

import torch

from .. import kernels
from ..config.algo import TRAIN_KERNELS
from ..kernels import ARCHITECTURES, is_hf_rms_norm, is_silu_mlp, plain_function, rms_norm, silu_mul

__all__ = ["compiled_glue", "train_kernels"]


def train_kernels(algo, device_type: str) -> str:
    """ "compiled" or "eager": what `algo` (an AlgoConfig) sets as algo.train_kernels (or its old name train_glue,
    with a warning) means on a device type."""
    value = algo.train_kernels
    if algo.train_glue is not None:
        warnings.warn(
            "algo.train_glue is the old name of algo.train_kernels: rename it in your config or overrides",
            FutureWarning,
            stacklevel=2,
        )
        value = algo.train_glue
    if value not in TRAIN_KERNELS:
        raise ValueError(f"algo.train_kernels={value!r}: one of {list(TRAIN_KERNELS)}")
    if value == "auto":
        return "compiled" if device_type == "cuda" else "eager"
    return value


def _compiled(fn):
    """`fn` compiled once per process for dynamic shapes, on its own code object (tinyablate/kernels.py
    `compiled`: the engine's compiled glue keeps its recompile budget); `fn` itself once its compile failed."""
    return kernels.compiled(fn, "train", dynamic=True)


def _run(fn, *args):
    """fn(*args) through its compiled version; if compiling it fails, warn once and stay eager for fn."""
    compiled = _compiled(fn)
    if compiled is fn:
        return fn(*args)
    try:
        return compiled(*args)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - a compiler failure costs speed, never the cell
        warnings.warn(
            f"tinyablate.train.glue: compiling {fn.__name__} failed ({type(err).__name__}: {err}); "
            "it runs eager from now on",
            stacklevel=2,
        )
        kernels.run_eager(fn, "train", dynamic=True)
        return fn(*args)


def _norm_forward(self, x):
    return _run(rms_norm, x, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(_run(silu_mul, self.gate_proj(x), self.up_proj(x)))


def _rotary(rope):
    """The model's apply_rotary_pos_emb, run through _run."""
    rope = plain_function(rope)

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if args or kwargs:  # unsqueeze_dim given: HF's own function as it is
            return rope(q, k, cos, sin, *args, **kwargs)
        return _run(rope, q, k, cos, sin)

    return apply_rotary_pos_emb


def _glue_modules(lm) -> list:
    """(module, compiled forward) for each HF RMSNorm and SiLU MLP of a Qwen2/Llama causal LM."""
    if getattr(lm.config, "model_type", None) not in ARCHITECTURES:
        return []  # other RMSNorm formulas (e.g. Gemma's 1 + weight) are not rms_norm's
    found = []
    for module in lm.modules():
        if is_hf_rms_norm(module):
            found.append((module, _norm_forward))
        elif is_silu_mlp(module):
            found.append((module, _mlp_forward))
    return found


def _rotary_homes(lm) -> list:
    """The modeling modules (modeling_qwen2, modeling_llama) whose attention layers the model holds: each
    looks up its `apply_rotary_pos_emb` there at every call."""
    homes = {sys.modules[type(m).__module__] for m in lm.modules() if type(m).__name__.endswith("Attention")}
    return [h for h in homes if callable(getattr(h, "apply_rotary_pos_emb", None))]


@contextmanager
def compiled_glue(model, enabled: bool = True):
    """Inside: the model's RMSNorms, SiLU MLPs and rotary embedding run compiled (see the module docstring);
    yields how many modules were patched. The rotary function is swapped in its modeling module, so other
    models of that architecture in the process use it too while inside."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    patched = _glue_modules(lm) if enabled else []
    homes = _rotary_homes(lm) if patched else []
    originals = [h.apply_rotary_pos_emb for h in homes]
    for module, forward in patched:
        module.forward = types.MethodType(forward, module)
    for home, rope in zip(homes, originals):
        home.apply_rotary_pos_emb = _rotary(rope)
    try:
        yield len(patched)
    finally:
        for module, _ in patched:
            module.__dict__.pop("forward", None)
        for home, rope in zip(homes, originals):
            home.apply_rotary_pos_emb = rope
