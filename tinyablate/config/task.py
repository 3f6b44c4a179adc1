"""Configuration of the task room: which task, where its data lives, how prompts look.

Every field is a str/int/bool/Optional/list of those (Hydra's ConfigStore types it); `load_task`
validates before building.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from .checks import Checks, Section

TASK_NAMES = ("arithmetic", "gsm8k")
SCORERS = ("strict", "flexible")
ARITHMETIC_OPERATIONS = ("+", "-", "*")
# Number of generated arithmetic training problems when `train_size` is None.
ARITHMETIC_DEFAULT_TRAIN_SIZE = 2000
DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class TaskConfig(Section):
    # Which task to load: "arithmetic" (synthetic, generated in code) or "gsm8k".
    name: str = "arithmetic"
    # gsm8k only: a folder holding the official train.jsonl and test.jsonl; None loads the
    # dataset `hub_id`/`hub_config` from the Hugging Face Hub through `datasets.load_dataset`.
    data_dir: Optional[str] = None
    # gsm8k only: Hub dataset id used when data_dir is None.
    hub_id: str = "openai/gsm8k"
    # gsm8k only: Hub dataset config used when data_dir is None.
    hub_config: str = "main"
    # Optional system message put before the user message; None means no system message.
    system_prompt: Optional[str] = None
    # Text appended (after a newline) to every question in the user message; "" appends nothing.
    instruction: str = DEFAULT_INSTRUCTION
    # Which match defines `accuracy` and the GRPO reward: "strict" (the last \boxed{}, else ####)
    # or "flexible" (the last number). Both are always reported.
    scorer: str = "strict"
    # Training problems: gsm8k takes the first N of the train split (None = all 7473);
    # arithmetic generates N problems (None = ARITHMETIC_DEFAULT_TRAIN_SIZE = 2000).
    train_size: Optional[int] = None
    # Evaluation problems: the first N of the test split (None = the whole test split;
    # for arithmetic the test split is the `eval_size` generated problems).
    eval_limit: Optional[int] = None
    # Seed of the arithmetic problem generator (same seed -> same problems).
    seed: int = 0
    # arithmetic: number of operands in each expression, at least 2 ("3 + 4" has 2).
    n_operands: int = 2
    # arithmetic: smallest operand value (inclusive; negatives are written as "(-4)").
    min_value: int = 0
    # arithmetic: largest operand value (inclusive). The default keeps 2-operand addition of
    # numbers 0..99, which has 10,000 distinct questions: room for disjoint train and eval sets.
    max_value: int = 99
    # arithmetic: operations drawn uniformly between operands, a non-empty subset of + - *
    # (usual precedence: * before + and -).
    operations: List[str] = field(default_factory=lambda: ["+"])
    # arithmetic: number of generated test problems (disjoint from the training problems).
    eval_size: int = 200

    section = "task"

    def check(self, c: Checks) -> None:
        c.choice("name", self.name, TASK_NAMES)
        c.choice("scorer", self.scorer, SCORERS)
        c.string("data_dir", self.data_dir, optional=True, empty_ok=True)
        c.string("hub_id", self.hub_id)
        c.string("hub_config", self.hub_config)
        c.string("system_prompt", self.system_prompt, optional=True, empty_ok=True)
        c.string("instruction", self.instruction, empty_ok=True, note=" ('' for no instruction)")
        c.integer("train_size", self.train_size, minimum=1, optional=True)
        c.integer("eval_limit", self.eval_limit, minimum=1, optional=True)
        c.integer("seed", self.seed)
        c.integer("n_operands", self.n_operands, minimum=2)
        c.integer("min_value", self.min_value)
        c.integer("max_value", self.max_value)
        c.integer("eval_size", self.eval_size, minimum=1)
        self._check_operations(c)
        if c.problems:  # the rules below read these fields
            return
        if self.max_value < self.min_value:
            c.fail("max_value", self.max_value, f"an integer >= task.min_value ({self.min_value})")
        elif self.name == "arithmetic":
            self._check_enough_arithmetic_questions(c)

    def _check_operations(self, c: Checks) -> None:
        ops = self.operations
        if isinstance(ops, (list, tuple)) and ops and all(op in ARITHMETIC_OPERATIONS for op in ops) \
                and len(set(ops)) == len(ops):
            return
        c.fail("operations", list(ops) if isinstance(ops, tuple) else ops,
                      "a non-empty list of distinct operations among '+', '-', '*'")

    def arithmetic_question_count(self) -> int:
        """How many distinct arithmetic questions the difficulty knobs allow."""
        n_values = self.max_value - self.min_value + 1
        return n_values**self.n_operands * len(self.operations) ** (self.n_operands - 1)

    def arithmetic_train_size(self) -> int:
        """The number of arithmetic training problems to generate."""
        return ARITHMETIC_DEFAULT_TRAIN_SIZE if self.train_size is None else self.train_size

    def _check_enough_arithmetic_questions(self, c: Checks) -> None:
        available = self.arithmetic_question_count()
        needed = self.arithmetic_train_size() + self.eval_size
        if needed > available:
            c.fail("train_size", self.train_size,
                   f"train_size (None = {ARITHMETIC_DEFAULT_TRAIN_SIZE}) + task.eval_size ({self.eval_size}) "
                   f"<= {available}, the number of distinct questions with n_operands={self.n_operands}, "
                   f"values {self.min_value}..{self.max_value} and operations {list(self.operations)}; "
                   "lower the sizes or widen the value range")
