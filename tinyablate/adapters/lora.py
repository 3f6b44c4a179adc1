"""The LoRA baseline through PEFT, with the same targets, precision and exact unmerge as ours."""

from __future__ import annotations

from torch import nn

from ..config.adapter import AdapterConfig
from ..quantization import peft_flags
from .svd_adapter import PRECISION_DTYPES
from .targets import Target


def build_lora(model: nn.Module, cfg: AdapterConfig, targets: list[Target]):
    """Wrap `model` in a PeftModel whose LoRA modules are exactly `targets`."""
    from peft import LoraConfig, get_peft_model

    lora_cfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=[t.name for t in targets],  # full names: exactly the resolved targets
        bias="none",
        init_lora_weights=True,  # B = 0: the adapted model starts identical to the base
    )
    with peft_flags(model):  # a quantized base (QLoRA): PEFT's bitsandbytes LoRA layers
        peft_model = get_peft_model(model, lora_cfg, autocast_adapter_dtype=False)
    dtype = PRECISION_DTYPES[cfg.precision]
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(dtype)
            p.requires_grad_(True)
    return peft_model


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def merge_lora(model: nn.Module) -> None:
    for layer in _lora_layers(model):
        if getattr(layer, "_tinyablate_pristine", None) is not None:
            continue
        base = layer.get_base_layer()
        layer._tinyablate_pristine = base.weight.data.clone()  # PEFT merges in place
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in _lora_layers(model):
        pristine = getattr(layer, "_tinyablate_pristine", None)
        if pristine is None:
            continue
        layer.get_base_layer().weight.data = pristine
        layer.merged_adapters.clear()
        layer._tinyablate_pristine = None
