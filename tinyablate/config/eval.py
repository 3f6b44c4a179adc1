"""How evaluation runs: batched greedy pass@1 (strict and flexible), optional sampled pass@k, per-choice
log-likelihood for multiple-choice tasks, and the tasks a cell is evaluated on besides its own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

from .algo import ENGINES
from .checks import Checks, Section
from .task import TASK_NAMES


@dataclass
class EvalConfig(Section):
    """How evaluation generates."""

    # Prompts per generate() call (left-padded); sequences per forward for multiple-choice tasks.
    batch_size: int = 32
    # Longest completion; longer ones are cut (and usually score as wrong).
    max_new_tokens: int = 256
    # Evaluate before training too (the base accuracy; read from the cache when present).
    base: bool = True
    # Cache the base accuracy on disk, keyed by model, task and these settings.
    cache_base: bool = True
    # Sampled pass@k on top of greedy pass@1: 0 disables; k samples per problem at `temperature`.
    pass_k: int = 0
    temperature: float = 1.0
    # Generator (tinyablate/engine): "auto" (the graph engine on CUDA, HF generate on CPU), "graph",
    # "eager" or "hf"; see algo.rollout_engine. Speed only: not in cell_id nor the base-accuracy key.
    engine: str = "auto"
    # Prompts per engine call (its KV cache holds this many rows); batch_size is HF generate's.
    engine_batch_size: int = 256
    # Tasks the cell is evaluated on, by name (arithmetic, gsm8k, mmlu_cs, hellaswag), besides the
    # training task, which is always evaluated ([] = the training task alone). Each gets its base
    # accuracy (cached) and its metrics in result.json's metrics.tasks. A listed task other than the
    # training task takes its conf/task/<name>.yaml settings (config.task.default_task_config)
    # updated by `task_settings`.
    tasks: List[str] = field(default_factory=list)
    # Per evaluation task: TaskConfig fields over its defaults, e.g. {"mmlu_cs": {"data_dir":
    # "/data/mmlu", "num_fewshot": 5}}. For the training task they must equal its task.* values;
    # conf/task/<name>.yaml reads data_dir from here, so one entry serves a multi-task sweep.
    task_settings: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    section = "eval"

    def check(self, c: Checks) -> None:
        c.integer("batch_size", self.batch_size, minimum=1)
        c.integer("max_new_tokens", self.max_new_tokens, minimum=1)
        c.choice("engine", self.engine, ENGINES)
        c.integer("engine_batch_size", self.engine_batch_size, minimum=1)
        c.boolean("base", self.base)
        c.boolean("cache_base", self.cache_base)
        c.integer("pass_k", self.pass_k, minimum=0, note=" (0 = off)")
        c.number("temperature", self.temperature, above=0)
        tasks = list(self.tasks) if isinstance(self.tasks, (list, tuple)) else self.tasks
        if not isinstance(tasks, list) or any(t not in TASK_NAMES for t in tasks) or len(set(tasks)) != len(tasks):
            c.fail("tasks", tasks, f"distinct names among {list(TASK_NAMES)} ([] = the training task alone)")
        elif not isinstance(self.task_settings, dict):
            c.fail("task_settings", self.task_settings, "a mapping of task name to TaskConfig fields")
        else:
            stray = sorted(set(self.task_settings) - set(tasks))
            if stray:
                c.rule(
                    f"eval.task_settings has settings for {stray}, which eval.tasks={tasks!r} does not list: "
                    "add them to eval.tasks or drop their settings"
                )
