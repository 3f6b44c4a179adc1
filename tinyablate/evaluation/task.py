"""One task's evaluation, whatever its kind: the metrics a cell reports and the per-problem records.

    metrics, records = evaluate_task(model, tokenizer, task, spec.eval, desc="eval trained gsm8k")

Generation tasks: greedy pass@1 (generation.py), with `accuracy_strict` and `accuracy_flexible` both kept;
multiple-choice tasks: per-choice log-likelihood (choice.py), with `acc` and `acc_norm` both kept. Either
way `accuracy` is the task's scorer (`task.scorer`). plan.py calls this for the base model and the trained one.
"""

from __future__ import annotations

from ..config import EvalConfig
from .choice import evaluate_choices
from .generation import evaluate


def evaluate_task(model, tokenizer, task, cfg: EvalConfig, desc: str = "eval") -> tuple:
    """(metrics, records) of the model as it is now on `task`'s evaluation problems: greedy pass@1 for
    generation tasks, per-choice log-likelihood for multiple-choice ones; `accuracy` is the task's scorer."""
    if task.multiple_choice:
        result = evaluate_choices(model, tokenizer, task, task.eval_problems(), cfg, desc=desc)
        return result.metrics(task.cfg.scorer), result.records
    result = evaluate(model, tokenizer, task, task.eval_problems(), cfg, desc=desc)
    return _scored(result.metrics(), task.cfg.scorer), result.records


def _scored(metrics: dict, scorer: str) -> dict:
    """`accuracy` is the task's scorer; strict and flexible are both kept under their names."""
    strict = metrics["accuracy"]
    return {
        **metrics,
        "accuracy_strict": strict,
        "accuracy": strict if scorer == "strict" else metrics["accuracy_flexible"],
    }
