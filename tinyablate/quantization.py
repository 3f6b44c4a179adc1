"""A quantized frozen base (`model.quantization=nf4|int8`) through bitsandbytes.

    check_supported("nf4", torch.device("cuda"))   # before any weight is read: a clear error otherwise
    quantize_base(model, "nf4")                     # every linear layer but lm_head, in place
    base_bytes(model)                               # what the frozen base holds, quantization included

- nf4 is the QLoRA recipe: 4-bit NormalFloat weights in blocks of 64, double quantization (the
  block scales quantized again), computing in the model's dtype (bf16 on a GPU, fp32 on CPU).
- int8 is LLM.int8(): row-wise absmax int8 weights, outlier features (|x| > 6) in 16 bits.

The embeddings and lm_head stay in the model's dtype (as in QLoRA). `adapter=lora` on an nf4 base is
QLoRA (PEFT's bitsandbytes LoRA layers); TinyLoRA and LoRA-XS take their SVD from the dequantized
weight (`dense_weight`) and add their update x·Bᵀ·Mᵀ·Aᵀ in the compute dtype beside the quantized
base's own output (tinyablate/adapters/layers.py), so ΔW is never merged into quantized weights.

What runs where (bitsandbytes 0.50.2, the version tested): on CPU both nf4 and int8 layers run forward
and backward in fp32, bf16 and fp16 (tests/test_quantization.py), once the CPU-only inference repacking
of 4-bit weights is turned off (it breaks training after an evaluation, see `_quantized`). On CUDA,
tests/test_quantization_gpu.py and benchmarks/qlora_bench.py check the same (gpu marker; run on an H200,
2026-12-02). The generation engine's CUDA graphs capture nf4 layers but not int8 ones
(tinyablate/engine/settings.py). Other devices (mps, ...) and other bitsandbytes versions are refused before
loading, with what to install or set.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from typing import Any

import torch
from torch import nn

from .config.model import QUANTIZATIONS

SUPPORTED_DEVICES = ("cpu", "cuda")
BNB_TESTED = ((0, 50), (0, 51))  # [low, high): the bitsandbytes versions this module is tested with
INSTALL_HINT = "pip install 'tinyablate[quant]'  (bitsandbytes>=0.50,<0.51)"
NF4_BLOCKSIZE = 64
INT8_THRESHOLD = 6.0


class QuantizationNotSupported(RuntimeError):
    """model.quantization cannot run here; the message says what to change."""


def check_supported(quantization: str, device: Any) -> None:
    """Raise QuantizationNotSupported, before any weight is loaded, when `quantization` cannot run on
    `device` (a torch.device or a string) with the installed bitsandbytes."""
    if quantization == "none":
        return
    if quantization not in QUANTIZATIONS:
        raise QuantizationNotSupported(f"model.quantization={quantization!r} is invalid: one of {list(QUANTIZATIONS)}")
    device_type = getattr(device, "type", str(device).split(":")[0])
    if device_type not in SUPPORTED_DEVICES:
        raise QuantizationNotSupported(
            f"model.quantization={quantization} runs on {' and '.join(SUPPORTED_DEVICES)} only (bitsandbytes), not on "
            f"{device_type}; set model.device=cpu or use a CUDA GPU, or model.quantization=none"
        )
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        raise QuantizationNotSupported(
            f"model.quantization={quantization} needs bitsandbytes, which is not installed: {INSTALL_HINT}"
        ) from None
    parsed = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if not BNB_TESTED[0] <= parsed < BNB_TESTED[1]:
        raise QuantizationNotSupported(
            f"model.quantization={quantization}: bitsandbytes {version} is installed, but only "
            f"{'.'.join(map(str, BNB_TESTED[0]))}.x is tested here (what runs on CPU changed between releases): "
            f"{INSTALL_HINT}"
        )


def quantize_base(model, quantization: str) -> int:
    """Replace every nn.Linear except lm_head by its bitsandbytes counterpart, quantized on the
    module's device; returns how many were replaced. bitsandbytes is imported only here (an optional
    dependency: `pip install 'tinyablate[quant]'`)."""
    if quantization == "none":
        return 0
    check_supported(quantization, next(model.parameters()).device)
    output = model.get_output_embeddings()
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and module is not output and not is_quantized_linear(module)
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantized(getattr(parent, child), quantization))
    model.tinyablate_quantization = quantization
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return len(names)


@contextlib.contextmanager
def peft_flags(model):
    """Mark a quantized model as transformers does (`is_loaded_in_4bit`/`8bit`) while PEFT wraps it, so
    PEFT picks its bitsandbytes LoRA layers. The marks are removed after: TRL's trainers cast every
    trainable tensor of a model so marked to bf16, which would override adapter.precision."""
    quantization = getattr(model, "tinyablate_quantization", "none")
    model.is_loaded_in_4bit, model.is_loaded_in_8bit = quantization == "nf4", quantization == "int8"
    try:
        yield
    finally:
        del model.is_loaded_in_4bit, model.is_loaded_in_8bit


def _quantized(linear, quantization: str):
    import bitsandbytes as bnb

    device, dtype = linear.weight.device, linear.weight.dtype
    has_bias = linear.bias is not None
    if quantization == "nf4":
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True, blocksize=NF4_BLOCKSIZE
        )
        # On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks the weight for inference at the first
        # eval-mode no-grad forward, and the repacked layer then fails in training (an in-place bias add
        # in matmul_4bit's CPU path): evaluation comes before training in a cell, so keep one layout.
        layer.support_avx512bf16_for_cpu = False
    else:
        layer = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
            device="meta",
        )
        layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = linear.bias
    layer = layer.to(device)  # quantizes the weight where it lives
    if quantization == "int8" and layer.weight.dtype != torch.int8:
        # bitsandbytes quantizes Int8Params only when they move off the CPU: a weight already on the GPU
        # stayed in 16 bits (seen on an H200 with 0.50.2, 2026-12-02), so quantize it where it is.
        layer.weight._quantize(device)
    layer.tinyablate_dtype = dtype  # the compute dtype: what the unquantized layer computed in
    return layer


def is_quantized_linear(module) -> bool:
    """Whether `module` is a bitsandbytes 4-bit or 8-bit linear layer."""
    name = type(module).__name__
    return name in ("Linear4bit", "Linear8bitLt") and type(module).__module__.startswith("bitsandbytes")


def base_quantization(model) -> str:
    """model.quantization of a built model ("none" unless quantize_base ran), through a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "tinyablate_quantization", "none")


def compute_dtype(module):
    """The dtype a (possibly quantized) linear layer computes in."""
    return getattr(module, "tinyablate_dtype", None) or module.weight.dtype


def dense_weight(module):
    """The weight of a linear layer as a dense tensor in its compute dtype (dequantized when quantized)."""
    if not is_quantized_linear(module):
        return module.weight
    import bitsandbytes.functional as F

    weight = module.weight
    if type(module).__name__ == "Linear4bit":
        dense = F.dequantize_4bit(weight.data, weight.quant_state)
    else:
        dense = F.int8_vectorwise_dequant(weight.data, weight.SCB)
    return dense.to(compute_dtype(module))


def base_bytes(model) -> int:
    """Bytes of the frozen base: frozen parameters and buffers as stored (packed 4/8-bit weights) plus
    the quantization statistics (block scales, nested scales, int8 row scales)."""
    total, seen = 0, set()
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) in seen or p.requires_grad:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
        total += _stats_bytes(p)
    return total


def _stats_bytes(p) -> int:
    state = getattr(p, "quant_state", None)
    if state is not None:
        out = _tensor_bytes(state.absmax) + _tensor_bytes(getattr(state, "code", None))
        nested = getattr(state, "state2", None)
        if nested is not None:
            out += _tensor_bytes(nested.absmax) + _tensor_bytes(getattr(nested, "code", None))
        return out
    return _tensor_bytes(getattr(p, "SCB", None))


def _tensor_bytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()
