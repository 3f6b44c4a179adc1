"""Evaluation: how well the model, as it is now, does on a task's evaluation problems.

    from tinyablate.evaluation import evaluate_task
    metrics, records = evaluate_task(model, tokenizer, task, spec.eval, desc="eval base gsm8k")

- `task.py`: `evaluate_task`, the one entry a cell uses: by the task's kind, then `accuracy` by its scorer.
- `generation.py`: greedy pass@1 (strict and flexible) and sampled pass@k, through the engine or HF
  (`evaluate`, `generate`, `prompts_for`, `EvalResult`).
- `choice.py`: multiple choice by per-choice log-likelihood (`evaluate_choices`, `continuation_logliks`,
  `encode_pair`, `ChoiceEvalResult`).
- `shards.py`: the step both share: each rank scores its share of the problems, every rank gets all records.
- `records.py`: what evaluation leaves on disk: the base-accuracy cache and the per-problem samples files.
- `plan.py`: a cell's evaluation plan, which cell.py runs (base accuracy from the cache or evaluated with the
  adapter disabled, the final evaluation, the samples files, result.json's metrics.tasks), its typed
  `Evaluation` (imported from the module, not from here).

Its scorers are the tasks' own (tinyablate/tasks/).
"""

from .choice import ChoiceEvalResult, continuation_logliks, encode_pair, evaluate_choices
from .generation import EvalResult, evaluate, generate, prompts_for
from .records import base_cache_key, base_cache_path, read_base_cache, write_base_cache, write_samples
from .shards import score_across_ranks
from .task import evaluate_task

__all__ = [
    "ChoiceEvalResult",
    "EvalResult",
    "base_cache_key",
    "base_cache_path",
    "continuation_logliks",
    "encode_pair",
    "evaluate",
    "evaluate_choices",
    "evaluate_task",
    "generate",
    "prompts_for",
    "read_base_cache",
    "score_across_ranks",
    "write_base_cache",
    "write_samples",
]
