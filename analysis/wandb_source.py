"""Results of a sweep read back from W&B (online), for when the cell folders are elsewhere.

    from analysis.wandb_source import results_from_wandb
    results = results_from_wandb("my-entity/tinyablate", "paper_gsm8k")   # result.json-shaped dicts

Each cell's W&B run (tinyablate.cell) holds the whole cell config, `cell_id`, `trainable_params`,
`model_family`, `model_size` in its config and the final metrics (a collapse as `collapse/<field>`) in its
summary; this rebuilds the fields of result.json that the analysis reads. Runs without a final
`eval/accuracy` (running, failed) are left out. Needs network access and WANDB_API_KEY; nothing here is
written to disk.
"""

from __future__ import annotations

from typing import Any, Optional

SPEC_KEYS = ("model", "adapter", "task", "algo", "eval", "logger", "seed", "sweep", "output_dir", "train", "gpus")


def results_from_wandb(path: str, group: str, api: Optional[Any] = None) -> list:
    """Completed-result dicts for every cell run of W&B group `group` in `path` (entity/project)."""
    if api is None:
        import wandb  # only for W&B-sourced results: importing it costs ~0.5 s

        api = wandb.Api()
    out = []
    for run in api.runs(path, filters={"group": group}):
        if run.job_type not in ("grpo", "sft"):
            continue  # e.g. the analysis summary run
        result = _result(dict(run.config), dict(run.summary), group)
        if result is not None:
            out.append(result)
    return out


def _last(value):
    return value.get("last") if isinstance(value, dict) else value


def _result(config: dict, summary: dict, group: str) -> Optional[dict]:
    accuracy = _last(summary.get("eval/accuracy"))
    if accuracy is None or "cell_id" not in config:
        return None
    adapter, task, algo = config.get("adapter", {}), config.get("task", {}), config.get("algo", {})
    return {
        "schema_version": 1,
        "cell_id": config["cell_id"],
        "status": "completed",
        "sweep": group,
        "config": {k: config[k] for k in SPEC_KEYS if k in config},
        "model": {
            "name": config["model"]["name"],
            "family": config.get("model_family"),
            "size": config.get("model_size"),
        },
        "adapter": {
            "kind": adapter.get("kind"),
            "r": adapter.get("r"),
            "u": adapter.get("u"),
            "tie": adapter.get("tie"),
            "sharing": adapter.get("sharing"),
            "precision": adapter.get("precision"),
            "trainable_params": config.get("trainable_params", summary.get("trainable_params")),
            "trainable_bytes": config.get("trainable_bytes", summary.get("trainable_bytes")),
        },
        "algo": {
            "name": algo.get("name"),
            "learning_rate": algo.get("learning_rate"),
            "steps": summary.get("train_steps"),
        },
        "task": {"name": task.get("name"), "scorer": task.get("scorer")},
        "metrics": {
            "accuracy": accuracy,
            "accuracy_flexible": _last(summary.get("eval/accuracy_flexible")),
            "accuracy_strict": _last(summary.get("eval/accuracy_strict")),
            "base_accuracy": _last(summary.get("eval/base_accuracy")),
            "n_eval": summary.get("eval/n_eval"),
            "train_steps": summary.get("train_steps"),
            "collapse": _collapse(summary),
        },
        "timing": {"gpu_hours": summary.get("gpu_hours", 0.0), "wall_s": summary.get("wall_s", 0.0)},
    }


def _collapse(summary: dict) -> Optional[dict]:
    """metrics.collapse from the run's `collapse/<field>` summary values (tinyablate.cell), None without them."""
    fields = {k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith("collapse/")}
    return fields or None
