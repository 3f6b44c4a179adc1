"""Configuration of the task room: which task, where its data lives, how prompts look.

Every field is a str/int/bool/Optional/list of those (Hydra's ConfigStore types it); `load_task`
validates before building.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import List, Optional

from .checks import Checks, ConfigError, Section, raise_problems

TASK_NAMES = ("arithmetic", "gsm8k", "mmlu_cs", "hellaswag")
# Multiple-choice tasks: evaluated by per-choice log-likelihood (tinyablate/evaluation/choice.py).
CHOICE_TASKS = ("mmlu_cs", "hellaswag")
# What defines `accuracy` (and, for generation tasks, the GRPO reward): generation tasks read the
# answer "strict" (\boxed{}, else ####) or "flexible" (the last number); multiple-choice tasks pick
# the choice of highest log-likelihood ("acc") or of highest log-likelihood per character ("acc_norm").
SCORERS = ("strict", "flexible")
CHOICE_SCORERS = ("acc", "acc_norm")
# Each task's own settings where they differ from TaskConfig's defaults; conf/task/<name>.yaml holds
# the same values (tests/test_conf.py checks that they agree). `default_task_config` builds them.
TASK_DEFAULTS = {
    "arithmetic": {},
    "gsm8k": {"hub_id": "openai/gsm8k", "hub_config": "main", "scorer": "strict"},
    "mmlu_cs": {"hub_id": "cais/mmlu", "hub_config": "per-subject", "scorer": "acc"},
    "hellaswag": {"hub_id": "Rowan/hellaswag", "hub_config": "default", "scorer": "acc_norm"},
}
ARITHMETIC_OPERATIONS = ("+", "-", "*")
# Number of generated arithmetic training problems when `train_size` is None.
ARITHMETIC_DEFAULT_TRAIN_SIZE = 2000
DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class TaskConfig(Section):
    # Which task to load: "arithmetic" (synthetic, generated in code), "gsm8k", or the
    # multiple-choice "mmlu_cs" (MMLU's four computer-science subjects) and "hellaswag".
    name: str = "arithmetic"
    # A local copy instead of the Hub (None loads `hub_id` through `datasets.load_dataset`):
    # gsm8k: a folder with the official train.jsonl and test.jsonl; mmlu_cs: a folder of MMLU CSVs
    # named <subject>_<split>.csv (flat, or in dev/ val/ test/ subfolders as in the MMLU release);
    # hellaswag: a folder with hellaswag_train.jsonl and hellaswag_val.jsonl (the original format).
    data_dir: Optional[str] = None
    # Hub dataset id used when data_dir is None (openai/gsm8k, cais/mmlu, Rowan/hellaswag).
    hub_id: str = "openai/gsm8k"
    # Hub dataset config used when data_dir is None (mmlu_cs ignores it: each subject is a config).
    hub_config: str = "main"
    # Generation tasks: optional system message put before the user message; None means none.
    # Multiple-choice tasks use plain-text prompts (as the evaluation harness does) and ignore it.
    system_prompt: Optional[str] = None
    # Generation tasks: text appended (after a newline) to every question; "" appends nothing.
    instruction: str = DEFAULT_INSTRUCTION
    # Which measure defines `accuracy`. Generation tasks: "strict" (the last \boxed{}, else ####)
    # or "flexible" (the last number), also the GRPO reward; both are reported. Multiple-choice
    # tasks: "acc" or "acc_norm" (log-likelihood per character of the choice); both are reported.
    scorer: str = "strict"
    # Training problems: the first N of the train split (gsm8k: 7473; mmlu_cs: the val split,
    # 42 questions; hellaswag: 39905); arithmetic generates N (None = ARITHMETIC_DEFAULT_TRAIN_SIZE).
    train_size: Optional[int] = None
    # Evaluation problems: the first N of the test split (None = the whole test split; mmlu_cs:
    # the 412 test questions, subjects in MMLU_CS_SUBJECTS order; hellaswag: the 10042 of the val
    # split; for arithmetic the test split is the `eval_size` generated problems).
    eval_limit: Optional[int] = None
    # Seed of the arithmetic problem generator and of the choice of few-shot examples.
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
    # Multiple-choice tasks: solved examples put before each question (the harness's few-shot
    # setting), drawn with `seed` from the dev split (mmlu_cs) or train split (hellaswag); where that
    # split is absent, from the question's own split without the question itself (as the harness does).
    num_fewshot: int = 0

    section = "task"

    def check(self, c: Checks) -> None:
        c.choice("name", self.name, TASK_NAMES)
        c.choice("scorer", self.scorer, CHOICE_SCORERS if self.is_multiple_choice else SCORERS)
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
        c.integer("num_fewshot", self.num_fewshot, minimum=0, note=" (0 = zero-shot)")
        self._check_operations(c)
        if c.problems:  # the rules below read these fields
            return
        if self.max_value < self.min_value:
            c.fail("max_value", self.max_value, f"an integer >= task.min_value ({self.min_value})")
        elif self.name == "arithmetic":
            self._check_enough_arithmetic_questions(c)

    def _check_operations(self, c: Checks) -> None:
        ops = self.operations
        if (
            isinstance(ops, (list, tuple))
            and ops
            and all(op in ARITHMETIC_OPERATIONS for op in ops)
            and len(set(ops)) == len(ops)
        ):
            return
        c.fail(
            "operations",
            list(ops) if isinstance(ops, tuple) else ops,
            "a non-empty list of distinct operations among '+', '-', '*'",
        )

    @property
    def is_multiple_choice(self) -> bool:
        """Evaluated by per-choice log-likelihood rather than by generating an answer."""
        return self.name in CHOICE_TASKS

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
            c.fail(
                "train_size",
                self.train_size,
                f"train_size (None = {ARITHMETIC_DEFAULT_TRAIN_SIZE}) + task.eval_size ({self.eval_size}) "
                f"<= {available}, the number of distinct questions with n_operands={self.n_operands}, "
                f"values {self.min_value}..{self.max_value} and operations {list(self.operations)}; "
                "lower the sizes or widen the value range",
            )


def default_task_config(name: str, **overrides) -> TaskConfig:
    """The config `task=<name>` composes (TaskConfig's defaults with the task's own), plus overrides;
    ConfigError for an unknown task or setting."""
    c = Checks("task")
    if not c.choice("name", name, TASK_DEFAULTS):
        raise ConfigError(c.problems)
    allowed = sorted(f.name for f in fields(TaskConfig) if f.name != "name")
    for key in sorted(set(overrides) - set(allowed)):
        c.fail(key, overrides[key], f"a TaskConfig field for task {name!r}; the fields are {allowed}")
    raise_problems(c.problems)
    return TaskConfig(**{**TASK_DEFAULTS[name], **overrides, "name": name})
