"""What evaluation leaves on disk: the base-accuracy cache and the per-problem samples files.

    key = base_cache_key(model_id, task.cfg, spec.eval, dtype)      # what decides the base model's accuracy
    path = base_cache_path(cache_root, key)                          # <cache_root>/base_accuracy/<key>.json
    read_base_cache(path) / write_base_cache(path, metrics)
    write_samples(cell_dir / eval_samples_file(...), records)        # one JSON line per problem

The base model's accuracy (the 0-parameter point of every curve) is cached per (model, task, eval
settings), so every cell of a sweep reports it without generating again; the key is a hash over those
settings and leaves out the ones that change only speed. plan.py orchestrates both (base_accuracy,
evaluate_final); cell_folder.py names the samples files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from ..config import EvalConfig
from ..files import read_json, write_json_atomic


def base_cache_key(model_id: str, task_cfg, eval_cfg: EvalConfig, dtype: str) -> str:
    """One task's base accuracy: the task's settings (not its training size) and how it is evaluated
    (not which other tasks are). Settings added later are left out at their default (same keys)."""
    task = {k: v for k, v in asdict(task_cfg).items() if k not in ("train_size",)}
    if task.get("num_fewshot") == 0:
        del task["num_fewshot"]
    speed_only = ("batch_size", "base", "cache_base", "engine", "engine_batch_size")
    settings = {k: v for k, v in asdict(eval_cfg).items() if k not in speed_only + ("tasks", "task_settings")}
    blob = json.dumps([model_id, task, settings, dtype], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def base_cache_path(cache_root: Path, key: str) -> Path:
    return cache_root / "base_accuracy" / f"{key}.json"


def read_base_cache(path: Path) -> Optional[dict]:
    cached = read_json(path)
    return cached if isinstance(cached, dict) else None


def write_base_cache(path: Path, metrics: dict) -> None:
    write_json_atomic(path, metrics)


def write_samples(path: Path, records: list) -> None:
    """The records of one evaluation, one JSON line each, in the problems' order."""
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
