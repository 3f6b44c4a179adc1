"""Configuration of the task room: which task, where its data lives, how prompts look.

`TaskConfig` is a plain dataclass (the lead registers it in Hydra's ConfigStore), so every field
is a str/int/bool/Optional/list of those. Call `validate()` before use; `load_task` does it.
"""

from dataclasses import dataclass, field
from typing import List, Optional

TASK_NAMES = ("arithmetic", "gsm8k")
SCORERS = ("strict", "flexible")
ARITHMETIC_OPERATIONS = ("+", "-", "*")
# Number of generated arithmetic training problems when `train_size` is None.
ARITHMETIC_DEFAULT_TRAIN_SIZE = 2000
DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class TaskConfig:
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

    def validate(self) -> None:
        """Raise ValueError naming the first bad field, its value and what is allowed."""
        _check_choice("name", self.name, TASK_NAMES)
        _check_choice("scorer", self.scorer, SCORERS)
        _check_optional_str("data_dir", self.data_dir)
        _check_non_empty_str("hub_id", self.hub_id)
        _check_non_empty_str("hub_config", self.hub_config)
        _check_optional_str("system_prompt", self.system_prompt)
        if not isinstance(self.instruction, str):
            _fail("instruction", self.instruction, "a string ('' for no instruction)")
        _check_optional_positive_int("train_size", self.train_size)
        _check_optional_positive_int("eval_limit", self.eval_limit)
        _check_int("seed", self.seed)
        self._validate_arithmetic()

    def _validate_arithmetic(self) -> None:
        _check_int("n_operands", self.n_operands)
        if self.n_operands < 2:
            _fail("n_operands", self.n_operands, "an integer >= 2")
        _check_int("min_value", self.min_value)
        _check_int("max_value", self.max_value)
        if self.max_value < self.min_value:
            _fail("max_value", self.max_value, f"an integer >= task.min_value ({self.min_value})")
        _check_operations(self.operations)
        _check_int("eval_size", self.eval_size)
        if self.eval_size < 1:
            _fail("eval_size", self.eval_size, "an integer >= 1")
        if self.name == "arithmetic":
            self._check_enough_arithmetic_questions()

    def arithmetic_question_count(self) -> int:
        """How many distinct arithmetic questions the difficulty knobs allow."""
        n_values = self.max_value - self.min_value + 1
        return n_values**self.n_operands * len(self.operations) ** (self.n_operands - 1)

    def arithmetic_train_size(self) -> int:
        """The number of arithmetic training problems to generate."""
        return ARITHMETIC_DEFAULT_TRAIN_SIZE if self.train_size is None else self.train_size

    def _check_enough_arithmetic_questions(self) -> None:
        available = self.arithmetic_question_count()
        needed = self.arithmetic_train_size() + self.eval_size
        if needed > available:
            _fail(
                "train_size",
                self.train_size,
                f"train_size (None = {ARITHMETIC_DEFAULT_TRAIN_SIZE}) + task.eval_size ({self.eval_size}) "
                f"<= {available}, the number of distinct questions with n_operands={self.n_operands}, "
                f"values {self.min_value}..{self.max_value} and operations {list(self.operations)}; "
                "lower the sizes or widen the value range",
            )


def _fail(name: str, value: object, allowed: str) -> None:
    raise ValueError(f"task.{name}={value!r} is invalid: expected {allowed}.")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object) -> None:
    if not _is_int(value):
        _fail(name, value, "an integer")


def _check_optional_positive_int(name: str, value: object) -> None:
    if value is not None and (not _is_int(value) or value < 1):
        _fail(name, value, "None or an integer >= 1")


def _check_choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        _fail(name, value, "one of " + ", ".join(repr(choice) for choice in allowed))


def _check_optional_str(name: str, value: object) -> None:
    if value is not None and not isinstance(value, str):
        _fail(name, value, "None or a string")


def _check_non_empty_str(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        _fail(name, value, "a non-empty string")


def _check_operations(operations: object) -> None:
    allowed = "a non-empty list of distinct operations among '+', '-', '*'"
    if isinstance(operations, str) or not hasattr(operations, "__iter__"):
        _fail("operations", operations, allowed)
    ops = list(operations)
    if not ops or any(op not in ARITHMETIC_OPERATIONS for op in ops) or len(set(ops)) != len(ops):
        _fail("operations", ops, allowed)
