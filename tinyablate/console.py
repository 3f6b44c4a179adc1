"""What a cell prints: a banner at the start, one compact line per logging step, the paths at the end.

The full record of every step stays in metrics.jsonl (tinyablate/metrics.py); the console carries what a
person watching needs: which cell, where it writes, how it is doing, and how long it has left.
`quiet_known_warnings()` silences the library deprecation warnings this project cannot act on (each listed
with where it comes from). Standard library only: `train.common.ConsoleCallback` feeds `step_line`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

from .cell_folder import COLLAPSE_REASONS
from .config import CellSpec

# (message regex, category, where it comes from): warnings raised inside libraries, about calls this project
# does not make. Each is silenced by message, so any other warning still shows.
KNOWN_WARNINGS = (
    # TRL (trl/models/utils.py) reads model.is_gradient_checkpointing, deprecated in transformers 5.x
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, "trl"),
)


def quiet_known_warnings() -> None:
    for message, category, _ in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def banner(spec: CellSpec, cell_id: str, folder: Path, world_size: int, params: Optional[int] = None) -> str:
    """The lines that open a cell: what runs, with what, where it writes."""
    a, algo, t = spec.adapter, spec.algo, spec.task
    if a.kind == "none":
        adapter = "none (the base model)"
    elif a.kind == "lora":
        adapter = f"lora r={a.r}"
    else:
        adapter = (
            f"{a.kind} r={a.r}"
            + (f" u={a.u}" if a.kind == "tinylora" else "")
            + f" tie={a.tie} sharing={a.sharing} precision={a.precision}"
        )
    if params is not None:
        adapter += f": {params:,} trainable parameters"
    batch = (
        f"{algo.prompts_per_step} prompts x {algo.num_generations} completions of <= {algo.max_completion_length} "
        "tokens"
        if algo.name == "grpo"
        else f"{algo.prompts_per_step} examples"
    )
    where = f"{spec.gpus} GPU{'s' * (spec.gpus > 1)}" if spec.gpus else "CPU"
    wandb = "disabled" if spec.logger.mode == "disabled" else f"{spec.logger.mode} (project {spec.logger.project})"
    ranks = f" ({world_size} ranks)" if world_size > 1 else ""
    rows = [
        ("cell", cell_id),
        ("model", f"{spec.model.name} on {where}{ranks}"),
        ("adapter", adapter),
        ("algo", f"{algo.name}, {algo.max_steps if spec.train else 0} steps of {batch}, lr {algo.learning_rate:g}"),
        ("task", f"{t.name}, scorer {t.scorer}, seed {spec.seed}"),
        ("output", str(Path(folder).resolve())),
        ("W&B", wandb),
    ]
    rule = "=" * 78
    return "\n".join([rule, *(f"{k:<8} {v}" for k, v in rows), rule])


def step_line(step: int, max_steps: int, logs: dict, s_per_step: Optional[float]) -> str:
    """One logging step: progress, reward (GRPO) or loss (SFT), accuracy where the trainer logs one, speed and
    time left. Everything else the trainer logs is in metrics.jsonl."""
    parts = [f"step {step}/{max_steps}"]
    if "reward" in logs:
        parts.append(f"reward {logs['reward']:.3f}" + (f" ± {logs['reward_std']:.3f}" if "reward_std" in logs else ""))
        if "completions/mean_length" in logs:
            parts.append(f"length {logs['completions/mean_length']:.0f}")
    elif "loss" in logs:
        parts.append(f"loss {logs['loss']:.4g}")
    if "mean_token_accuracy" in logs:
        parts.append(f"token accuracy {logs['mean_token_accuracy']:.3f}")
    if s_per_step is not None:
        parts.append(f"{s_per_step:.2f} s/step")
        parts.append(f"ETA {duration(s_per_step * max(max_steps - step, 0))}")
    return "  ".join(parts)


def collapse_line(record: dict, steps: int) -> str:
    """The line a GRPO cell prints when its training is named collapsed (train/collapse.py)."""
    then = "training stops here (algo.on_collapse=stop)" if record["stopped"] else "training runs on"
    return (
        f"collapsed at step {record['detected_step']}: {steps} steps in a row gave GRPO nothing to learn from (since "
        f"step {record['step']}; now {COLLAPSE_REASONS[record['reason']]}); {then}; result.json records it and the "
        "analysis leaves the cell out of its means"
    )


def recovery_line(record: dict) -> str:
    """The line a GRPO cell prints when a healthy step follows a collapse."""
    return (
        f"recovered at step {record['recovered_step']} from the collapse that began at step {record['step']}: "
        "the cell counts in the analysis' means again unless it collapses anew"
    )


def collapse_note(collapse: Optional[dict]) -> str:
    """A completed result's collapse in a few words (the status table, a cell's last lines); "" when none."""
    if not collapse:
        return ""
    why = COLLAPSE_REASONS.get(collapse["reason"], collapse["reason"])
    if collapse.get("recovered_step") is not None:
        return f"collapsed at steps {collapse['step']}-{collapse['recovered_step'] - 1} ({why}), then recovered"
    stopped = f", training stopped at step {collapse['detected_step']}" if collapse.get("stopped") else ""
    return f"collapsed since step {collapse['step']} ({why}){stopped}"


def duration(seconds: float) -> str:
    """1:02:03, 4:05 or 6 s."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def end_lines(result: dict, result_path: Path, page: Optional[Path], page_note: str = "") -> str:
    """The end of a cell: accuracy against the base, and the absolute paths of what it wrote."""
    metrics = result["metrics"]
    base = "n/a" if metrics["base_accuracy"] is None else f"{metrics['base_accuracy']:.3f}"
    lines = [
        f"cell {result['cell_id']}: accuracy {metrics['accuracy']:.3f} (base {base}, "
        f"n={metrics['n_eval']}, {result['adapter']['trainable_params']:,} trainable parameters)",
        f"result:        {Path(result_path).resolve()}",
    ]
    if metrics.get("collapse"):
        lines.insert(1, collapse_note(metrics["collapse"]))
    lines.append(f"analysis page: {Path(page).resolve()}" if page is not None else f"analysis page: {page_note}")
    return "\n".join(lines)
