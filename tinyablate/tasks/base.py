"""What every task provides: problems, chat prompts for them, and scoring of completions.

A `Task` turns a `TaskConfig` into train/eval `Problem`s. Trainers and evaluators only use this
interface, so adding a task means subclassing `Task` and implementing the two problem lists.
"""

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from ..config.task import TaskConfig
from .scoring import Score, reward_fn, score


@dataclass(frozen=True)
class Problem:
    """One question with its gold answer and a reference solution for SFT."""

    id: str  # unique within the task, e.g. "gsm8k-test-17"
    question: str  # the question text shown to the model (without the instruction)
    answer: str  # gold answer, already normalized by scoring.normalize_number
    solution: str  # reference completion ending in \boxed{answer}; scores strict and flexible


class Task(ABC):
    """Base class of tasks: subclasses implement `train_problems` and `eval_problems`."""

    multiple_choice = False  # True: evaluated by per-choice log-likelihood (tasks/choice.py)

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg

    @abstractmethod
    def train_problems(self) -> list[Problem]:
        """Problems to train on (disjoint from the evaluation problems)."""

    @abstractmethod
    def eval_problems(self) -> list[Problem]:
        """Problems to evaluate on, at most `cfg.eval_limit` of them."""

    def messages(self, problem: Problem) -> list[dict]:
        """Chat prompt: the optional system prompt, then the question followed by the instruction."""
        user_text = problem.question
        if self.cfg.instruction:
            user_text = f"{problem.question}\n{self.cfg.instruction}"
        system = [] if self.cfg.system_prompt is None else [{"role": "system", "content": self.cfg.system_prompt}]
        return system + [{"role": "user", "content": user_text}]

    def score(self, completion: str, problem: Problem) -> Score:
        """Score a completion's text against the problem's gold answer."""
        return score(completion, problem.answer)

    def reward_fn(self):
        """The TRL reward function: the task's scorer (`task.scorer`) on each completion."""
        return reward_fn(self.cfg.scorer)

    def prompt_rows(self, problems: list[Problem]) -> list[dict]:
        """Rows for GRPO datasets: a conversational `prompt`, the `answer` the reward reads, the `id`."""
        return [{"prompt": self.messages(p), "answer": p.answer, "id": p.id} for p in problems]

    def sft_rows(self, problems: list[Problem]) -> list[dict]:
        """Rows for SFT datasets in TRL's prompt-completion form, the completion being the solution."""
        return [
            {"prompt": self.messages(p), "completion": [{"role": "assistant", "content": p.solution}]} for p in problems
        ]


def jsonl_rows(path: Path) -> Iterator[tuple]:
    """(line number, parsed value) of every non-blank line of a jsonl file; a line that is not JSON raises
    a ValueError naming the file and line."""
    with Path(path).open(encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except ValueError as err:  # JSONDecodeError counts lines within `line`: name the file's line
                raise ValueError(
                    f"{path}:{line_number}: not valid JSON ({getattr(err, 'msg', err)}, "
                    f"column {getattr(err, 'colno', '?')})"
                ) from None


def hub_splits(task: str, hub_id: str, configs: Sequence[Optional[str]], splits: dict, how_to_provide: str) -> dict:
    """{config: {split: the Hub split's rows}} of the Hub dataset `hub_id` (datasets.load_dataset), for each of
    its `configs`; `splits`: this project's split name -> the Hub's. The loading of every task without
    task.data_dir: any failure (offline, unknown id, config or split) is one RuntimeError naming the task
    and where it looked, and saying `how_to_provide` the data instead."""
    try:
        import datasets

        loaded = {}
        for config in configs:
            dataset = datasets.load_dataset(hub_id, config)
            loaded[config] = {split: dataset[hub_split] for split, hub_split in splits.items()}
        return loaded
    except Exception as error:  # offline, unknown id, missing config or split: all mean "no data"
        where = f"{hub_id}, config {configs[0]}" if len(configs) == 1 else hub_id
        raise RuntimeError(
            f"Could not load {task} from the Hub ({where}) because task.data_dir is None: "
            f"{type(error).__name__}: {error}. {how_to_provide}"
        ) from error
