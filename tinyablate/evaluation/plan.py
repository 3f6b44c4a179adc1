"""A cell's evaluation plan: which evaluations it runs, when they can be skipped, where their records go, and
what they came to (`Evaluation`, result.json's metrics.tasks).

    from tinyablate.evaluation.plan import base_accuracy, evaluate_final, task_metrics
    base = base_accuracy(spec, built, task)            # the base model (adapter disabled), cached on disk
    final = evaluate_final(spec, built, folder, base, trained=True, task=task)
    tasks = task_metrics(built, bases, finals)         # name -> cell_folder.TaskMetrics

cell.py runs it on the training task and every eval.tasks one (built: tinyablate.build.BuiltCell); the
evaluation itself is evaluate_task (task.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from .. import distributed
from ..cell_folder import CellFolder, TaskMetrics, eval_samples_file
from ..config import CellSpec
from ..models import resolve_cache_dir
from ..tasks import Task
from .records import base_cache_key, base_cache_path, read_base_cache, write_base_cache, write_samples
from .task import evaluate_task

if TYPE_CHECKING:
    from ..build import BuiltCell


@dataclass
class Evaluation:
    """One evaluation of the model on one task: its measures (`accuracy` by the task's scorer, `n_eval`, the
    scorer's others: strict/flexible or acc/acc_norm/chance), and for the base whether they came from the cache
    and how long it took (None: the final evaluation, or a base that eval.base=false skipped)."""

    metrics: dict
    cached: Optional[bool] = None
    eval_s: Optional[float] = None

    @property
    def accuracy(self) -> Optional[float]:
        return self.metrics.get("accuracy")

    def logged(self) -> dict:
        """What the metrics log shows of it: its numeric measures, and eval_s when it was timed."""
        values = {**self.metrics, **({} if self.eval_s is None else {"eval_s": self.eval_s})}
        return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def base_accuracy(spec: CellSpec, built: BuiltCell, task: Optional[Task] = None) -> Evaluation:
    """The base model's accuracy on `task` (default: the training task), adapter disabled, from the
    on-disk cache when possible."""
    task = task or built.task
    if not spec.eval.base:
        return Evaluation({"accuracy": None, "n_eval": 0}, cached=False)
    dtype = str(next(built.model.parameters()).dtype)
    path = base_cache_path(resolve_cache_dir(spec.model), base_cache_key(built.model_id, task.cfg, spec.eval, dtype))
    cached = read_base_cache(path) if spec.eval.cache_base and built.ranks.is_main else None
    cached = distributed.broadcast_from_main(cached)  # every rank takes the same branch
    if cached is not None:
        return Evaluation(cached, cached=True, eval_s=0.0)
    t0 = time.time()
    with built.adapter.disabled():
        metrics, _ = evaluate_task(built.model, built.tokenizer, task, spec.eval, desc=f"eval base {task.cfg.name}")
    if spec.eval.cache_base and built.ranks.is_main:
        write_base_cache(path, metrics)
    return Evaluation(metrics, cached=False, eval_s=time.time() - t0)


def evaluate_final(
    spec: CellSpec, built: BuiltCell, folder: CellFolder, base: Evaluation, trained: bool, task: Optional[Task] = None
) -> Evaluation:
    """Accuracy of the adapted model on `task` (default: the training task); per-problem records go to
    eval_samples.jsonl (the training task) or eval_samples.<task>.jsonl, staged until the result is ready."""
    task = task or built.task
    if not trained and base.accuracy is not None and built.adapter.trainable_params == 0:
        return Evaluation(dict(base.metrics))
    desc = f"eval trained {task.cfg.name}"
    metrics, records = evaluate_task(built.model, built.tokenizer, task, spec.eval, desc=desc)
    if built.ranks.is_main:
        write_samples(folder.staged(eval_samples_file(None if task is built.task else task.cfg.name)), records)
    return Evaluation(metrics)


TASK_TABLE_COLUMNS = ["task", "scorer", "accuracy", "base_accuracy", "delta", "n_eval"]


def task_metrics(built: BuiltCell, bases: dict, finals: dict) -> dict:
    """result.json's metrics.tasks: per evaluation task, `accuracy` (its scorer), the base's, the change,
    and every measure of both (strict/flexible or acc/acc_norm/chance). `bases`, `finals`: name -> Evaluation."""
    out = {}
    for name, task in built.eval_tasks.items():
        final, base = finals[name], bases[name]
        accuracy, base_accuracy = final.metrics["accuracy"], base.accuracy
        out[name] = TaskMetrics(
            accuracy=accuracy,
            scorer=task.cfg.scorer,
            base_accuracy=base_accuracy,
            delta=None if base_accuracy is None else accuracy - base_accuracy,
            n_eval=final.metrics["n_eval"],
            trained_on=task is built.task,
            base_cached=base.cached,
            final=final.metrics,
            base=dict(base.metrics),
        )
    return out


def task_table_rows(tasks: dict) -> list:
    """One row per evaluation task, TASK_TABLE_COLUMNS (the W&B table of a cell)."""
    return [[name, m.scorer, m.accuracy, m.base_accuracy, m.delta, m.n_eval] for name, m in tasks.items()]
