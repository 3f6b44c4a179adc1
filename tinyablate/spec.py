"""The typed spec of one sweep cell, its validation, and its stable identity.

A `CellSpec` is everything that defines a cell: model, adapter, task, algorithm, evaluation, seed.
`validate_spec` is the one place that checks a cell (each concern's own `validate()` plus the
checks that span concerns) so a whole grid can be checked before anything is loaded or submitted.
`cell_id` hashes the values that define the result, not paths, logging or batch sizes that only
change speed, so re-running a sweep finds the same cells.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Optional

from .adapters.config import AdapterConfig, SVDConfig
from .engine.settings import check_engine_setting
from .eval import EvalConfig
from .logging import LoggerConfig
from .models import ModelConfig
from .tasks.config import TaskConfig
from .train.config import AlgoConfig



@dataclass
class CellSpec:
    """One cell of a sweep."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # Seed of training (sampling, data order); the model's and P's seeds are their own settings.
    seed: int = 0
    # Sweep name: the W&B group and the folder under output_dir.
    sweep: str = "default"
    # Root of sweep folders: a cell writes to <output_dir>/<sweep>/<cell_id>/.
    output_dir: str = "runs"
    # Skip training (evaluate the adapter as initialised); used for the 0-parameter point.
    train: bool = True
    # GPUs this cell uses (0 = CPU). With model.device=auto it decides the device (and so the dtype:
    # bf16 on GPU, fp32 on CPU), so it is part of the cell's identity. Launchers request this many;
    # N > 1 runs N data-parallel ranks on one node (tinyablate/distributed.py), same global batch.
    gpus: int = 0


# Settings that change speed or bookkeeping but not the result: left out of cell_id.
_NOT_IDENTITY = {
    "logger": None, "sweep": None, "output_dir": None,
    "eval": {"batch_size", "base", "cache_base", "engine", "engine_batch_size"},
    "model": {"device", "cache_dir", "attn_implementation"},
    "adapter": {"forward"}, "adapter.svd": {"cache_dir"},
    "algo": {"micro_batch_size", "save_steps", "logging_steps", "gradient_checkpointing", "rollout_engine"},
}


# Settings added after cell ids were first published: left out of the id at their default, so the
# cells that existed before keep their ids (and are found completed) while other values get new ones.
_OMIT_AT_DEFAULT = {("algo", "rollout_sampler"): "torch"}


# Adapter fields a kind ignores: two cells differing only there are the same cell.
_IGNORED_BY_KIND = {
    "none": None,  # keep only the kind
    "lora": {"u", "tie", "sharing", "projection_seed", "svd"},
    "lora_xs": {"u", "projection_seed", "lora_alpha", "lora_dropout"},
    "tinylora": {"lora_alpha", "lora_dropout"},
}


def identity_dict(spec: CellSpec) -> dict:
    """The values that define a cell's result."""
    out = {}
    for f in fields(spec):
        if f.name in _NOT_IDENTITY and _NOT_IDENTITY[f.name] is None:
            continue
        out[f.name] = _strip(getattr(spec, f.name), f.name)
    for (group, name), default in _OMIT_AT_DEFAULT.items():
        if out.get(group, {}).get(name, default) == default:
            out[group].pop(name, None)
    ignored = _IGNORED_BY_KIND[spec.adapter.kind]
    out["adapter"] = {"kind": "none"} if ignored is None else {
        k: v for k, v in out["adapter"].items() if k not in ignored}
    if "tie" in out["adapter"]:
        tie = spec.adapter.tie_value()
        out["adapter"]["tie"] = "all" if tie is None else tie  # 7 and "7" are one cell
        if tie in (None, 1):
            out["adapter"].pop("sharing", None)  # one vector per module or for all: tiled = structured
    return out


def _strip(value: Any, path: str) -> Any:
    if not is_dataclass(value):
        return value
    drop = _NOT_IDENTITY.get(path, set())
    return {f.name: _strip(getattr(value, f.name), f"{path}.{f.name}")
            for f in fields(value) if f.name not in drop}


def cell_id(spec: CellSpec) -> str:
    """A stable 12-hex-digit hash of `identity_dict(spec)`, prefixed by a readable label."""
    blob = json.dumps(identity_dict(spec), sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return f"{cell_label(spec)}-{digest}"


def cell_label(spec: CellSpec) -> str:
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
    return f"{spec.model.name}-{spec.task.name}-{spec.algo.name}-{ad}-s{spec.seed}".replace("_", "")


def validate_spec(spec: CellSpec, world_size: Optional[int] = None) -> CellSpec:
    """Check one cell; raises ValueError naming the field, its value and what is allowed.

    `world_size`: the ranks it will run as (default: one per GPU, or 1 on CPU).
    """
    if not isinstance(spec.gpus, int) or isinstance(spec.gpus, bool) or spec.gpus < 0:
        raise ValueError(f"gpus={spec.gpus!r} is invalid: an integer >= 0 (0 = CPU; N > 1 runs N data-parallel "
                         "ranks on one node)")
    spec.model.validate()
    spec.adapter.validate()
    spec.task.validate()
    spec.algo.validate(world_size or max(spec.gpus, 1))
    spec.eval.validate()
    for field, engine in (("algo.rollout_engine", spec.algo.rollout_engine), ("eval.engine", spec.eval.engine)):
        check_engine_setting(field, engine, spec.gpus, spec.model.device)
    spec.logger.validate()
    if not isinstance(spec.seed, int) or isinstance(spec.seed, bool):
        raise ValueError(f"seed={spec.seed!r} is invalid: must be an integer")
    if spec.gpus > 1 and spec.model.device not in ("auto", "cuda"):
        raise ValueError(f"model.device={spec.model.device!r} with gpus={spec.gpus}: each rank uses its own GPU, "
                         "so set model.device=auto (or cuda)")
    if not spec.sweep or "/" in spec.sweep:
        raise ValueError(f"sweep={spec.sweep!r} is invalid: a non-empty name without '/'")
    if spec.algo.name == "grpo" and spec.algo.beta > 0:
        raise ValueError(
            f"algo.beta={spec.algo.beta} is not supported: a KL penalty needs a reference model, which TRL would "
            "load from the Hub by name; use algo.beta=0 (as the TinyLoRA paper does)"
        )
    if spec.adapter.precision == "fp16" and spec.algo.adam_epsilon < 1e-7:
        raise ValueError(
            f"algo.adam_epsilon={spec.algo.adam_epsilon} is invalid with adapter.precision=fp16: it rounds to 0 "
            "in fp16 and Adam divides by it; set algo.adam_epsilon >= 1e-7"
        )
    return spec


def spec_from_dict(raw: dict) -> CellSpec:
    """Build a CellSpec from a plain (resolved) dict such as result.json's `config`."""
    raw = dict(raw)
    adapter = dict(raw.get("adapter", {}))
    if "svd" in adapter:
        adapter["svd"] = SVDConfig(**adapter["svd"])
    return CellSpec(
        model=ModelConfig(**raw.get("model", {})),
        adapter=AdapterConfig(**adapter),
        task=TaskConfig(**raw.get("task", {})),
        algo=AlgoConfig(**raw.get("algo", {})),
        eval=EvalConfig(**raw.get("eval", {})),
        logger=LoggerConfig(**raw.get("logger", {})),
        **{k: v for k, v in raw.items() if k not in ("model", "adapter", "task", "algo", "eval", "logger")},
    )


def spec_to_dict(spec: CellSpec) -> dict:
    return asdict(spec)
