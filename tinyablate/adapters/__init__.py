"""Adapters: TinyLoRA, LoRA-XS, LoRA (PEFT) and none, behind one handle (`apply_adapter`)."""

from .adapter import ROOT_NAME, Adapter, apply_adapter, load_native, load_trainable_state, trainable_state
from .export import export_peft, save_native
from .targets import Target, expected_trainable_params, resolve_targets

__all__ = [
    "ROOT_NAME",
    "Adapter",
    "Target",
    "apply_adapter",
    "expected_trainable_params",
    "export_peft",
    "load_native",
    "load_trainable_state",
    "resolve_targets",
    "save_native",
    "trainable_state",
]
