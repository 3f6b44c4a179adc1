"""MMLU's four computer-science subjects (`task=mmlu_cs`), from MMLU CSVs or the Hub's cais/mmlu.

The original CSV format has no header and one question a row: `question, A, B, C, D, answer letter`
(fields may span lines inside quotes). The prompt is the evaluation harness's MMLU prompt:

    The following are multiple choice questions (with answers) about machine learning.

    <question>
    A. <choice A>
    B. ...
    Answer:

and the choices are the letters " A" .. " D" (so `acc_norm` equals `acc` here). Splits: `test`
(412 questions) is evaluated; `val` trains; `dev` (5 a subject) holds the few-shot examples.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..config.task import TaskConfig
from .base import hub_splits
from .choice import ChoiceProblem, ChoiceTask, data_error, local_data_dir

MMLU_CS_SUBJECTS = ("college_computer_science", "high_school_computer_science", "computer_security", "machine_learning")
LETTERS = ("A", "B", "C", "D")
SPLITS = {"test": "test", "val": "validation", "dev": "dev"}  # file suffix -> Hub split


class MMLUTask(ChoiceTask):
    """mmlu_cs: evaluate on the test split, train on val, few-shot examples from dev."""

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        rows = _load(cfg)
        self._eval = rows["test"]
        self._train = rows.get("val")
        self._fewshot_pool = rows.get("dev")
        self._no_train_reason = (
            f"no val split was found (task.data_dir={cfg.data_dir!r} holds no "
            "<subject>_val.csv files); MMLU trains on its val split (cais/mmlu 'validation')"
        )

    def description(self, problem: ChoiceProblem) -> str:
        return (
            f"The following are multiple choice questions (with answers) about {problem.group.replace('_', ' ')}.\n\n"
        )


def question_text(question: str, options) -> str:
    lines = [question.strip()] + [f"{letter}. {option}" for letter, option in zip(LETTERS, options)]
    return "\n".join(lines) + "\nAnswer:"


def make_problem(split: str, subject: str, index: int, question: str, options, gold: int) -> ChoiceProblem:
    return ChoiceProblem(
        id=f"mmlu_cs-{split}-{subject}-{index}",
        question=question_text(question, options),
        choices=LETTERS,
        gold=gold,
        group=subject,
    )


def _load(cfg: TaskConfig) -> dict:
    """{"test": [...], "val": [...] if present, "dev": [...] if present}, subjects in order."""
    data_dir = local_data_dir(cfg, _how_to_provide(cfg))
    if data_dir is None:
        return _load_from_hub(cfg)
    out = {}
    for split in SPLITS:
        paths = [_find_csv(data_dir, subject, split) for subject in MMLU_CS_SUBJECTS]
        if split == "test":
            missing = [f"{subject}_test.csv" for subject, path in zip(MMLU_CS_SUBJECTS, paths) if path is None]
            if missing:
                raise FileNotFoundError(
                    f"task.data_dir={str(data_dir)!r} has no {', '.join(missing)}. {_how_to_provide(cfg)}"
                )
        if any(path is not None for path in paths):
            out[split] = [
                p
                for subject, path in zip(MMLU_CS_SUBJECTS, paths)
                if path is not None
                for p in read_csv(path, subject, split)
            ]
    return out


def _find_csv(data_dir: Path, subject: str, split: str):
    for path in (data_dir / f"{subject}_{split}.csv", data_dir / split / f"{subject}_{split}.csv"):
        if path.is_file():
            return path
    return None


def read_csv(path: Path, subject: str, split: str) -> list:
    """The questions of one MMLU CSV; a bad row raises an error naming the file and line."""
    problems = []
    with path.open(encoding="utf-8", newline="") as file:
        reader = csv.reader(file)
        line = 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as error:
                raise data_error(path, line, f"not a valid CSV row ({error})") from error
            if row:
                problems.append(_parse_row(row, path, line, subject, split, len(problems)))
            line = reader.line_num + 1
    return problems


def _parse_row(row: list, path: Path, line: int, subject: str, split: str, index: int) -> ChoiceProblem:
    if len(row) != 6:
        raise data_error(path, line, f"expected 6 fields (question, A, B, C, D, answer), found {len(row)}")
    answer = row[5].strip()
    if answer not in LETTERS:
        raise data_error(path, line, f"the answer {row[5]!r} is not one of A, B, C, D")
    return make_problem(split, subject, index, row[0], row[1:5], LETTERS.index(answer))


def _how_to_provide(cfg: TaskConfig) -> str:
    return (
        "To get MMLU-CS, set task.data_dir to a folder of MMLU CSVs (<subject>_test.csv, optionally "
        "<subject>_val.csv and <subject>_dev.csv, for " + ", ".join(MMLU_CS_SUBJECTS) + "), or leave it "
        f"None and make the Hub dataset {cfg.hub_id} reachable."
    )


def _load_from_hub(cfg: TaskConfig) -> dict:
    loaded = hub_splits("MMLU", cfg.hub_id, MMLU_CS_SUBJECTS, SPLITS, _how_to_provide(cfg))
    return {
        split: [
            _hub_problem(row, split, subject, i)
            for subject in MMLU_CS_SUBJECTS
            for i, row in enumerate(loaded[subject][split])
        ]
        for split in SPLITS
    }


def _hub_problem(row: dict, split: str, subject: str, index: int) -> ChoiceProblem:
    where = f"{subject} {split} row {index}"
    if len(row["choices"]) != 4 or not 0 <= int(row["answer"]) < 4:
        raise ValueError(f"Hub MMLU {where}: expected 4 choices and an answer in 0..3, got {row!r}")
    return make_problem(split, subject, index, row["question"], row["choices"], int(row["answer"]))
