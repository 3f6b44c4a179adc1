"""The task room: problems, chat prompts and the one scorer used for RL reward and evaluation.

from tinyablate.config import TaskConfig
from tinyablate.tasks import load_task, reward_fn
task = load_task(TaskConfig(name="gsm8k", data_dir="/path/to/gsm8k"))
rows = task.prompt_rows(task.train_problems())   # {"prompt", "answer", "id"} for GRPO
rewards = task.reward_fn()                       # TRL reward function: the task's own scorer
mc = load_task(TaskConfig(name="mmlu_cs", scorer="acc", data_dir="/path/to/mmlu_csvs"))
mc.context(p), mc.continuations(p)               # multiple choice: scored by log-likelihood
"""

from ..config.task import TaskConfig
from .arithmetic import ArithmeticTask
from .base import Problem, Task
from .choice import ChoiceProblem, ChoiceScore, ChoiceTask, choice_in_text, score_choice
from .gsm8k import GSM8KTask
from .hellaswag import HellaSwagTask
from .mmlu import MMLUTask
from .scoring import (
    Score,
    completion_text,
    extract_flexible,
    extract_strict,
    normalize_number,
    reward_fn,
    score,
)

_TASK_CLASSES = {"arithmetic": ArithmeticTask, "gsm8k": GSM8KTask, "mmlu_cs": MMLUTask, "hellaswag": HellaSwagTask}


def load_task(cfg: TaskConfig) -> Task:
    """Validate the config and build the task it names."""
    cfg.validate()
    return _TASK_CLASSES[cfg.name](cfg)


__all__ = [
    "ArithmeticTask",
    "ChoiceProblem",
    "ChoiceScore",
    "ChoiceTask",
    "HellaSwagTask",
    "MMLUTask",
    "choice_in_text",
    "score_choice",
    "GSM8KTask",
    "Problem",
    "Score",
    "Task",
    "completion_text",
    "extract_flexible",
    "extract_strict",
    "load_task",
    "normalize_number",
    "reward_fn",
    "score",
]
