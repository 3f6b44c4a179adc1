"""`apply_adapter`: put any adapter kind on a model and get one handle with one interface.

    adapter = apply_adapter(model, AdapterConfig(kind="tinylora", r=2, u=13, tie="all"), model_id)
    adapter.model            # the model to train and evaluate (a PeftModel for kind=lora)
    adapter.trainable_params # unique trainable parameters; adapter.trainable_bytes by precision
    adapter.merge(); adapter.unmerge()      # unmerge restores the base weights bit for bit
    adapter.export_peft(dir)               # PEFT LoRA format, loads with PeftModel.from_pretrained
    adapter.save_native(dir)               # just v, seeds and the SVD identity
    load_native(fresh_model, dir)          # the saved adapter on a fresh base model (SVD identity checked)

peft is imported only by LoRA cells and exports (lora.py, export.py): the dry run counts parameters
through this package, and importing peft costs seconds.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..config.adapter import AdapterConfig, adapter_from_dict
from . import export
from .lora import build_lora, merge_lora, unmerge_lora
from .svd_adapter import build_svd_adapter
from .targets import Target, expected_trainable_params, resolve_targets

ROOT_NAME = "tinyablate_adapter"


class Adapter:
    """The adapter on one model; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        cfg: AdapterConfig,
        targets: list[Target],
        model_id: str,
        layers: dict | None = None,
        stats: dict | None = None,
    ):
        self.model = model
        self.cfg = cfg
        self.targets = targets
        self.model_id = model_id
        self.layers = layers or {}
        self.stats = stats or {}

    # -- accounting -------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        seen, out = set(), []
        for p in self.model.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    @property
    def trainable_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.trainable_parameters())

    @property
    def n_groups(self) -> int:
        return len({t.group for t in self.targets}) if self.cfg.kind in ("tinylora", "lora_xs") else len(self.targets)

    def summary(self) -> dict:
        cfg = self.cfg
        return {
            "kind": cfg.kind,
            "r": cfg.r if cfg.kind != "none" else 0,
            "u": cfg.params_per_group if cfg.kind in ("tinylora", "lora_xs") else None,
            "tie": cfg.tie,
            "sharing": cfg.sharing,
            "precision": cfg.precision,
            "n_modules": len(self.targets),
            "n_groups": self.n_groups if cfg.kind != "none" else 0,
            "trainable_params": self.trainable_params,
            "trainable_bytes": self.trainable_bytes,
            "expected_trainable_params": expected_trainable_params(self.targets, cfg),
            **{k: v for k, v in self.stats.items()},
        }

    # -- merge / enable -----------------------------------------------------------------------
    def merge(self) -> None:
        """Fold ΔW into the weights (for export or a plain inference model); refused on a quantized base."""
        quantization = getattr(self.model, "tinyablate_quantization", "none")
        if quantization != "none":
            raise NotImplementedError(
                f"merging into a {quantization} base would re-quantize the weights: export the "
                "adapter (export_peft) and merge it into the unquantized base instead"
            )
        if self.cfg.kind == "lora":
            merge_lora(self.model)
        for layer in self.layers.values():
            layer.merge()

    def unmerge(self) -> None:
        """Restore the base weights exactly as they were before merge()."""
        if self.cfg.kind == "lora":
            unmerge_lora(self.model)
        for layer in self.layers.values():
            layer.unmerge()

    @contextlib.contextmanager
    def disabled(self):
        """Run the base model: e.g. the 0-parameter point or a reference policy."""
        if self.cfg.kind == "lora":
            with self.model.disable_adapter():
                yield
            return
        for layer in self.layers.values():
            layer.enabled = False
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.enabled = True

    # -- saving -------------------------------------------------------------------------------
    def vectors(self) -> list:
        """The trainable vectors v (TinyLoRA) or matrices R (LoRA-XS), in group order."""
        return list(getattr(self.model, ROOT_NAME).vectors)

    def export_peft(self, out_dir) -> None:
        export.export_peft(self, out_dir)

    def save_native(self, out_dir) -> None:
        export.save_native(self, out_dir)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of `model` by parameter name, on the CPU (what checkpoints keep)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state") -> None:
    """Copy `state` into `model`'s trainable parameters in place (which also refreshes merged caches)."""
    named = dict(model.named_parameters())
    missing = sorted(n for n, p in named.items() if p.requires_grad and n not in state)
    if missing:
        raise ValueError(f"{source} lacks adapter tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for name, value in state.items():
            named[name].copy_(value.to(named[name].device, named[name].dtype))


def apply_adapter(model: nn.Module, cfg: AdapterConfig, model_id: str) -> Adapter:
    """Validate `cfg` against `model` (before touching any weight), then apply the adapter.

    `model_id` names the weights (e.g. "hub:Qwen/Qwen2.5-7B-Instruct"); it keys the SVD cache.
    """
    cfg.validate()
    targets = resolve_targets(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.kind == "none":
        return Adapter(model, cfg, targets, model_id)
    if cfg.kind == "lora":
        return Adapter(build_lora(model, cfg, targets), cfg, targets, model_id)
    root, layers, stats = build_svd_adapter(model, cfg, targets, model_id)
    model.add_module(ROOT_NAME, root)
    return Adapter(model, cfg, targets, model_id, layers, stats)


def load_native(model: nn.Module, in_dir, model_id: str | None = None, atol: float = 2e-2) -> Adapter:
    """Apply the adapter saved by `save_native` to `model` (a fresh base model) and load its vectors.

    Fails if the SVD factors computed now differ from the ones it was trained on (export.py)."""
    src = Path(in_dir)
    meta = json.loads((src / export.NATIVE_META).read_text())
    if meta.get("format") != export.NATIVE_FORMAT:
        raise ValueError(f"{src} is not a {export.NATIVE_FORMAT} adapter (format={meta.get('format')!r})")
    adapter = apply_adapter(model, adapter_from_dict(meta["config"]), model_id or meta["model_id"])
    export.check_svd_identity(adapter, meta["svd_probe"], atol)
    tensors = load_file(str(src / export.NATIVE_VECTORS))
    with torch.no_grad():
        for i, v in enumerate(adapter.vectors()):
            v.copy_(tensors[f"v.{i}"].to(v.device, v.dtype))
    return adapter
