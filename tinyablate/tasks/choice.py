"""Multiple-choice tasks: a context, a few continuations, the gold one; and their one scorer.

A `ChoiceProblem`'s model answer is the choice it picks. Evaluation (tinyablate/evaluation/choice.py)
picks by per-choice log-likelihood of the continuation given the context, as the standard evaluation
harness does: `acc` takes the highest sum of log-probabilities, `acc_norm` the highest sum divided by
the choice's length in characters. GRPO samples a completion and picks the choice that the
completion spells out (`choice_in_text`). Both then go through the same `score_choice`, so the
reward and the evaluation agree on what is right: the picked index equals the gold index.

Prompts are plain text (no chat template), few-shot examples first:

    <description><example 1 context> <example 1 gold choice>\\n\\n ... <context>
    continuation i = " " + choice i
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..config.task import TaskConfig
from .base import Task
from .scoring import completion_text

TARGET_DELIMITER = " "  # between a context and its continuation (the harness's target_delimiter)
FEWSHOT_DELIMITER = "\n\n"  # between solved examples


@dataclass(frozen=True)
class ChoiceProblem:
    """One multiple-choice question."""

    id: str  # unique within the task, e.g. "mmlu_cs-test-machine_learning-3"
    question: str  # the context the continuations follow, without few-shot examples
    choices: tuple  # the choice texts (a continuation is TARGET_DELIMITER + choice)
    gold: int  # index of the right choice
    group: str = ""  # few-shot examples come from the same group (the MMLU subject)

    @property
    def answer(self) -> str:
        """The gold index as text (what records and the GRPO dataset carry)."""
        return str(self.gold)

    @property
    def solution(self) -> str:
        """The gold continuation: what SFT trains on, and what evaluation scores."""
        return TARGET_DELIMITER + self.choices[self.gold]


@dataclass(frozen=True)
class ChoiceScore:
    """The choice a model picked (None: a completion naming no choice) and whether it is gold."""

    correct: bool
    choice: Optional[int]


def score_choice(choice: Optional[int], problem: ChoiceProblem) -> ChoiceScore:
    """The one scorer of multiple-choice tasks: the picked choice is right iff it is the gold one."""
    return ChoiceScore(correct=choice is not None and choice == problem.gold, choice=choice)


def choice_in_text(text: str, choices) -> Optional[int]:
    """The choice a generated completion spells out: the longest choice the text starts with (after
    leading whitespace) that ends at a word boundary; None if it starts with none.

    "B. because ..." picks "B" among A-D; "Answer: B" picks nothing (it starts with no choice).
    """
    text = text.lstrip()
    best, best_len = None, -1
    for index, choice in enumerate(choices):
        choice = choice.strip()
        if not choice or not text.startswith(choice):
            continue
        following = text[len(choice) : len(choice) + 1]
        if following.isalnum() and choice[-1:].isalnum():
            continue  # "A" must not match "Answer"
        if len(choice) > best_len:
            best, best_len = index, len(choice)
    return best


class ChoiceTask(Task):
    """Base of multiple-choice tasks: subclasses fill `_train`, `_eval` and `_fewshot_pool`."""

    multiple_choice = True

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        self._train: Optional[list] = None  # None: this source has no training split
        self._eval: list = []
        self._fewshot_pool: Optional[list] = None  # None: few-shot examples come from _eval
        self._no_train_reason = ""

    # -- problems ------------------------------------------------------------------------------
    def train_problems(self) -> list:
        if self._train is None:
            raise ValueError(f"task {self.cfg.name!r} cannot train here: {self._no_train_reason}")
        if self.cfg.train_size is not None and self.cfg.train_size > len(self._train):
            raise ValueError(
                f"task.train_size={self.cfg.train_size} is invalid: expected None or at most "
                f"{len(self._train)}, the size of {self.cfg.name}'s training split."
            )
        return self._train[: self.cfg.train_size]

    def eval_problems(self) -> list:
        return self._eval[: self.cfg.eval_limit]

    def description(self, problem: ChoiceProblem) -> str:
        """Text before the few-shot examples (MMLU: which subject); "" by default."""
        return ""

    # -- prompts -------------------------------------------------------------------------------
    def context(self, problem: ChoiceProblem) -> str:
        """The plain-text prompt: description, `num_fewshot` solved examples, then the question."""
        shots = [f"{shot.question}{shot.solution}" for shot in self.fewshot_examples(problem)]
        return self.description(problem) + "".join(shot + FEWSHOT_DELIMITER for shot in shots) + problem.question

    def continuations(self, problem: ChoiceProblem) -> list:
        return [TARGET_DELIMITER + choice for choice in problem.choices]

    def fewshot_examples(self, problem: ChoiceProblem) -> list:
        """`num_fewshot` examples of the problem's group from the few-shot split (dev or train), drawn
        with a per-problem seed (so every cell and every rank sees the same ones); without a few-shot
        split, from the problem's own split (training or evaluation); never the problem itself."""
        k = self.cfg.num_fewshot
        if k == 0:
            return []
        pool = self._fewshot_pool
        if pool is None:  # no few-shot split: the problem's own split (test questions never enter training prompts)
            train_ids = {p.id for p in self._train or []}
            pool = self._train if problem.id in train_ids else self._eval
        candidates = [p for p in pool if p.group == problem.group and p.id != problem.id]
        if len(candidates) < k:
            raise ValueError(
                f"task.num_fewshot={k} is invalid for {self.cfg.name}: group {problem.group!r} "
                f"has only {len(candidates)} other examples to draw from; lower task.num_fewshot"
            )
        return random.Random(f"{self.cfg.seed}-fewshot-{problem.id}").sample(candidates, k)

    # -- scoring -------------------------------------------------------------------------------
    def score(self, completion: str, problem: ChoiceProblem) -> ChoiceScore:
        """Score a generated completion: the choice it spells out against the gold one."""
        return score_choice(choice_in_text(completion, problem.choices), problem)

    def reward_fn(self) -> Callable[..., list]:
        """The TRL reward: 1.0 when the completion spells out the gold choice (`score`)."""
        by_id = {p.id: p for p in (self._train or [])}

        def reward(completions: list, id: list, **kwargs) -> list:
            scores = (self.score(completion_text(c), by_id[i]) for c, i in zip(completions, id, strict=True))
            return [1.0 if s.correct else 0.0 for s in scores]

        reward.__name__ = reward.__qualname__ = f"{self.cfg.name}_choice_accuracy"
        return reward

    # -- training rows -------------------------------------------------------------------------
    def prompt_rows(self, problems: list) -> list:
        """GRPO rows: the plain-text context as `prompt` (no chat template), the gold, the id."""
        return [{"prompt": self.context(p), "answer": p.answer, "id": p.id} for p in problems]

    def sft_rows(self, problems: list) -> list:
        """SFT rows: the context and the gold continuation, the text whose likelihood is evaluated (TRL's
        SFTTrainer appends the EOS token to the completion, so the model also learns to stop there)."""
        return [{"prompt": self.context(p), "completion": p.solution} for p in problems]


def local_data_dir(cfg: TaskConfig, how_to_provide: str):
    """`task.data_dir` as a Path (None: load from the Hub); an error saying how to provide it if it is
    not a folder."""
    if cfg.data_dir is None:
        return None
    data_dir = Path(cfg.data_dir).expanduser()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"task.data_dir={str(data_dir)!r} is not a folder. {how_to_provide}")
    return data_dir


def data_error(path, line: int, message: str) -> ValueError:
    """A bad-input error naming the file and line."""
    return ValueError(f"{path}:{line}: {message}")
