"""Synthetic arithmetic problems ("What is 3 + 4?"), generated in code from a seed.

Every question is an expression of `n_operands` integers in [min_value, max_value] joined by
operations drawn from `operations`. The questions are numbered 0..count-1 (a mixed-radix code
of operands and operations), so sampling distinct numbers gives distinct questions: the eval
set is sampled first, then the training set from the numbers the eval set left out.
"""

import random
from bisect import bisect_right

from ..config.task import TaskConfig
from .base import Problem, Task
from .scoring import normalize_number


class ArithmeticTask(Task):
    """Seeded synthetic arithmetic: same config, same problems; train and eval never overlap."""

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        count = cfg.arithmetic_question_count()
        eval_codes = random.Random(f"{cfg.seed}-eval").sample(range(count), cfg.eval_size)
        train_draws = random.Random(f"{cfg.seed}-train").sample(
            range(count - cfg.eval_size), cfg.arithmetic_train_size()
        )
        excluded = sorted(eval_codes)
        train_codes = [_nth_code_not_in(draw, excluded) for draw in train_draws]
        self._train = [self._problem(code, f"arithmetic-train-{i}") for i, code in enumerate(train_codes)]
        self._eval = [self._problem(code, f"arithmetic-eval-{i}") for i, code in enumerate(eval_codes)]

    def train_problems(self) -> list[Problem]:
        return list(self._train)

    def eval_problems(self) -> list[Problem]:
        return self._eval[: self.cfg.eval_limit]

    def _problem(self, code: int, problem_id: str) -> Problem:
        values, ops = self._decode(code)
        steps = _reduction_steps(values, ops)
        answer = normalize_number(steps[-1])
        solution = " = ".join([_render(values, ops)] + steps) + f".\n\\boxed{{{answer}}}"
        return Problem(id=problem_id, question=f"What is {_render(values, ops)}?", answer=answer, solution=solution)

    def _decode(self, code: int) -> tuple[list[int], list[str]]:
        """Operands and operations of question number `code` (mixed radix: values, then ops)."""
        n_values = self.cfg.max_value - self.cfg.min_value + 1
        operations = list(self.cfg.operations)
        values = []
        for _ in range(self.cfg.n_operands):
            code, digit = divmod(code, n_values)
            values.append(self.cfg.min_value + digit)
        ops = []
        for _ in range(self.cfg.n_operands - 1):
            code, digit = divmod(code, len(operations))
            ops.append(operations[digit])
        return values, ops


def _nth_code_not_in(n: int, excluded_sorted: list[int]) -> int:
    """The n-th (0-based) non-negative integer that is not in `excluded_sorted`."""
    code = n
    while True:
        shifted = n + bisect_right(excluded_sorted, code)
        if shifted == code:
            return code
        code = shifted


def _apply(op: str, left: int, right: int) -> int:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    return left * right


def _reduction_steps(values: list[int], ops: list[str]) -> list[str]:
    """Rendered expression after each single operation, multiplications first, then left to right."""
    values, ops, steps = list(values), list(ops), []
    while ops:
        i = ops.index("*") if "*" in ops else 0
        values[i : i + 2] = [_apply(ops[i], values[i], values[i + 1])]
        del ops[i]
        steps.append(_render(values, ops))
    return steps


def _render(values: list[int], ops: list[str]) -> str:
    """Write an expression like 3 + (-4) * 2: negative operands in parentheses, a lone number bare."""
    if not ops:
        return str(values[0])
    terms = [f"({v})" if v < 0 else str(v) for v in values]
    return " ".join([terms[0]] + [f"{op} {term}" for op, term in zip(ops, terms[1:])])
