"""A cell's stable identity: `cell_id` hashes the values that define its result.

Paths, logging and batch sizes that only change speed are left out (`NOT_IDENTITY`), so re-running a
sweep finds the same cells, and a completed cell is never run twice. Every other field of CellSpec is
in the hash: adding a field changes every cell_id (and so re-runs every completed cell) unless it is
listed below, either in NOT_IDENTITY (it never changes a result) or in OMIT_AT_DEFAULT (it is new:
old cells keep their ids at its default). tests/test_spec.py pins one literal id.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields, is_dataclass
from typing import Any

from .spec import CellSpec

# Settings that change speed or bookkeeping but not the result: left out of cell_id
# (a section name mapped to None drops the whole section).
NOT_IDENTITY = {
    "logger": None,
    "sweep": None,
    "output_dir": None,
    "eval": {"batch_size", "base", "cache_base", "engine", "engine_batch_size"},
    "model": {"device", "cache_dir", "attn_implementation"},
    "adapter": {"forward"},
    "adapter.svd": {"cache_dir", "cache_rank"},
    "algo": {
        "micro_batch_size",
        "save_steps",
        "logging_steps",
        "gradient_checkpointing",
        "rollout_engine",
        "train_kernels",
        "train_glue",
    },
}

# Settings added after cell ids were first published: left out of the id at their default, so the
# cells that existed before keep their ids (and are found completed) while other values get new ones.
OMIT_AT_DEFAULT = {
    ("algo", "rollout_sampler"): "torch",
    ("model", "quantization"): "none",
    ("task", "num_fewshot"): 0,
    ("eval", "tasks"): [],
    ("eval", "task_settings"): {},
    ("algo", "nonfinite"): "fail",
    ("algo", "rollout_correction"): "none",
    ("algo", "rollout_is_cap"): 2.0,
    # (not NOT_IDENTITY: K decides what result.json records as a collapse, and so what the analysis averages;
    # on_collapse=stop decides where training ends)
    ("algo", "collapse_steps"): 5,
    ("algo", "on_collapse"): "record",
}

# Adapter fields a kind ignores: two cells differing only there are the same cell.
IGNORED_BY_KIND = {
    "none": None,  # keep only the kind
    "lora": {"u", "tie", "sharing", "projection_seed", "svd"},
    "lora_xs": {"u", "projection_seed", "lora_alpha", "lora_dropout"},
    "tinylora": {"lora_alpha", "lora_dropout"},
}


def identity_dict(spec: CellSpec) -> dict:
    """The values that define a cell's result."""
    out = {}
    for f in fields(spec):
        if f.name in NOT_IDENTITY and NOT_IDENTITY[f.name] is None:
            continue
        out[f.name] = _strip(getattr(spec, f.name), f.name)
    if list(spec.eval.tasks) == [spec.task.name]:
        out["eval"]["tasks"] = []  # the training task alone: the default
    for (group, name), default in OMIT_AT_DEFAULT.items():
        if out.get(group, {}).get(name, default) == default:
            out[group].pop(name, None)
    ignored = ignored_fields(spec)
    out["adapter"] = {k: v for k, v in out["adapter"].items() if f"adapter.{k}" not in ignored}
    if "tie" in out["adapter"]:
        tie = spec.adapter.tie_value()
        out["adapter"]["tie"] = "all" if tie is None else tie  # 7 and "7" are one cell
    return out


def ignored_fields(spec: CellSpec) -> dict:
    """The adapter fields ("adapter.<name>") that cannot change this cell's result, each with why: fields its
    kind ignores, and `sharing` when one vector serves one module or all of them (tiled = structured)."""
    a = spec.adapter
    ignored = IGNORED_BY_KIND[a.kind]
    names = [f.name for f in fields(a) if f.name != "kind"] if ignored is None else sorted(ignored)
    why = {f"adapter.{n}": f"adapter={a.kind} ignores it" for n in names}
    if "sharing" not in (ignored or names) and a.tie_value() in (None, 1):
        tie = "all" if a.tie_value() is None else 1
        shared = "one vector for every module" if tie == "all" else "one vector per module"
        why["adapter.sharing"] = f"tie={tie}: {shared}, so tiled = structured"
    return why


def _strip(value: Any, path: str) -> Any:
    if not is_dataclass(value):
        return value
    drop = NOT_IDENTITY.get(path, set())
    return {f.name: _strip(getattr(value, f.name), f"{path}.{f.name}") for f in fields(value) if f.name not in drop}


def cell_id(spec: CellSpec) -> str:
    """A stable 12-hex-digit hash of `identity_dict(spec)`, prefixed by a readable label."""
    blob = json.dumps(identity_dict(spec), sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return f"{cell_label(spec)}-{digest}"


def cell_label(spec: CellSpec) -> str:
    """model-task-algo-adapter-seed, readable in a folder listing (the hash makes the id unique)."""
    a = spec.adapter
    if a.kind == "none":
        ad = "none"
    elif a.kind == "lora":
        ad = f"lora-r{a.r}"
    elif a.kind == "lora_xs":
        ad = f"loraxs-r{a.r}-t{a.tie}"
    else:
        tie = a.tie_value()
        structured = a.sharing == "structured" and tie not in (None, 1)  # sharing only matters there
        ad = f"tiny-r{a.r}-u{a.u}-t{'all' if tie is None else tie}{'s' if structured else ''}-{a.precision}"
    quant = "" if spec.model.quantization == "none" else f"-{spec.model.quantization}"
    return f"{spec.model.name}{quant}-{spec.task.name}-{spec.algo.name}-{ad}-s{spec.seed}".replace("_", "")
