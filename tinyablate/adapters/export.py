"""Saving adapters: PEFT's LoRA format (for anyone) and a compact native format (for us).

PEFT export folds TinyLoRA / LoRA-XS exactly into rank-r LoRA: ΔW = (A M) B, so lora_B = A M (d × r),
lora_A = B (r × k) and lora_alpha = r (scaling 1). `PeftModel.from_pretrained(base, dir)` then
computes the same function as the adapted model.

The native format keeps only what cannot be regenerated: the vectors v, the config (seeds, ranks,
targets) and the SVD identity (model id and, per module, the top singular values and a slice of U)
so that loading onto a differently computed SVD fails loudly instead of silently changing the model.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

NATIVE_FORMAT = "tinyablate-native/1"
NATIVE_META, NATIVE_VECTORS = "adapter_native.json", "vectors.safetensors"
_PROBE_ROWS = 8


def export_peft(adapter, out_dir) -> None:
    """Write adapter_config.json + adapter_model.safetensors in PEFT's LoRA format."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kind = adapter.cfg.kind
    if kind == "none":
        raise ValueError("adapter.kind='none' has no weights to export")
    if kind == "lora":
        adapter.model.save_pretrained(str(out))
        return
    from peft import LoraConfig  # only here and in lora.py: importing peft costs seconds

    tensors = {}
    for name, layer in adapter.layers.items():
        with torch.no_grad():
            M = layer.core().float()
            tensors[f"base_model.model.{name}.lora_A.weight"] = layer.B.float().contiguous().cpu()
            tensors[f"base_model.model.{name}.lora_B.weight"] = (layer.A.float() @ M).contiguous().cpu()
    r = adapter.cfg.r
    base_name = getattr(getattr(adapter.model, "config", None), "_name_or_path", None) or adapter.model_id
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=sorted(adapter.layers),
        base_model_name_or_path=base_name,
    )
    config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def save_native(adapter, out_dir) -> None:
    """Write adapter_native.json + vectors.safetensors (read back by adapter.load_native)."""
    if adapter.cfg.kind not in ("tinylora", "lora_xs"):
        raise ValueError(
            f"the native format holds tinylora and lora_xs only, not {adapter.cfg.kind!r}; use export_peft"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vectors = {f"v.{i}": v.detach().contiguous().cpu() for i, v in enumerate(adapter.vectors())}
    save_file(vectors, str(out / NATIVE_VECTORS))
    meta = {
        "format": NATIVE_FORMAT,
        "model_id": adapter.model_id,
        "config": asdict(adapter.cfg),
        "targets": [[t.name, t.group] for t in adapter.targets],
        "svd_probe": {name: _probe(layer) for name, layer in adapter.layers.items()},
    }
    (out / NATIVE_META).write_text(json.dumps(meta, indent=1))


def _probe(layer) -> dict:
    A = layer.A.float()
    s = A.norm(dim=0)  # ‖U_i σ_i‖ = σ_i
    return {"sigma": s.tolist(), "u_head": (A[:_PROBE_ROWS] / s).tolist()}


def check_svd_identity(adapter, probes: dict, atol: float) -> None:
    for name, layer in adapter.layers.items():
        want = probes.get(name)
        if want is None:
            raise ValueError(f"saved adapter has no SVD probe for module {name}")
        got = _probe(layer)
        sigma_ok = torch.allclose(torch.tensor(got["sigma"]), torch.tensor(want["sigma"]), rtol=atol, atol=1e-6)
        u_ok = torch.allclose(torch.tensor(got["u_head"]), torch.tensor(want["u_head"]), atol=atol)
        if not (sigma_ok and u_ok):
            raise ValueError(
                f"SVD factors of {name} differ from the ones the adapter was trained on (different "
                "base weights, or SVD settings): loading v onto them would change the model"
            )
