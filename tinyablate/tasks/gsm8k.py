"""GSM8K grade-school math word problems, from local jsonl files or the Hugging Face Hub.

The official rows are {"question": ..., "answer": "<rationale with <<calculator>> notes>\\n#### 18"}.
A `Problem` keeps the normalized gold ("18") and, as reference solution, the rationale without the
calculator notes, ending in `\\boxed{18}` instead of the `#### 18` line.
"""

import re
from pathlib import Path

from ..config.task import TaskConfig
from .base import Problem, Task, hub_splits, jsonl_rows
from .scoring import normalize_number

SPLITS = ("train", "test")
_CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")


class GSM8KTask(Task):
    """GSM8K: training problems from the train split, evaluation problems from the test split."""

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        rows = _load_rows(cfg)
        train = [parse_row(row, f"gsm8k-train-{i}") for i, row in enumerate(rows["train"])]
        if cfg.train_size is not None and cfg.train_size > len(train):
            raise ValueError(
                f"task.train_size={cfg.train_size} is invalid: expected None or at most {len(train)}, "
                "the size of the GSM8K train split."
            )
        self._train = train[: cfg.train_size]
        self._eval = [parse_row(row, f"gsm8k-test-{i}") for i, row in enumerate(rows["test"])]

    def train_problems(self) -> list[Problem]:
        return list(self._train)

    def eval_problems(self) -> list[Problem]:
        return self._eval[: self.cfg.eval_limit]


def parse_row(row: dict, problem_id: str) -> Problem:
    """Turn an official GSM8K row into a Problem with a boxed reference solution."""
    rationale, separator, final = row["answer"].rpartition("####")
    gold = normalize_number(final)
    if not separator or gold is None:
        raise ValueError(f"GSM8K row {problem_id}: the answer does not end in '#### <number>': {row['answer']!r}")
    steps = _CALCULATOR_NOTE.sub("", rationale).strip()
    solution = f"{steps}\n\\boxed{{{gold}}}"
    return Problem(id=problem_id, question=row["question"].strip(), answer=gold, solution=solution)


def _how_to_provide(cfg: TaskConfig) -> str:
    return (
        "set task.data_dir=/path/to/gsm8k holding the official train.jsonl and test.jsonl, "
        f"or leave task.data_dir=None and make the Hub dataset {cfg.hub_id} (config {cfg.hub_config}) reachable."
    )


def _load_rows(cfg: TaskConfig) -> dict[str, list[dict]]:
    if cfg.data_dir is not None:
        return _read_local(Path(cfg.data_dir).expanduser(), cfg)
    return _load_from_hub(cfg)


def _read_local(data_dir: Path, cfg: TaskConfig) -> dict[str, list[dict]]:
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"task.data_dir={str(data_dir)!r} is not a folder. To get GSM8K, {_how_to_provide(cfg)}"
        )
    rows = {}
    for split in SPLITS:
        path = data_dir / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"task.data_dir={str(data_dir)!r} has no {path.name}. To get GSM8K, {_how_to_provide(cfg)}"
            )
        rows[split] = _read_jsonl(path)
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line_number, row in jsonl_rows(path):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("question"), str)
            or not isinstance(row.get("answer"), str)
        ):
            raise ValueError(f"{path}:{line_number}: expected a JSON object with 'question' and 'answer' strings")
        parse_row(row, f"{path}:{line_number}")  # every line checked here, so its error names it
        rows.append(row)
    return rows


def _load_from_hub(cfg: TaskConfig) -> dict[str, list[dict]]:
    how = f"To get GSM8K, {_how_to_provide(cfg)}"
    loaded = hub_splits("GSM8K", cfg.hub_id, [cfg.hub_config], {s: s for s in SPLITS}, how)[cfg.hub_config]
    return {split: [{"question": r["question"], "answer": r["answer"]} for r in rows] for split, rows in loaded.items()}
