"""HellaSwag sentence completion (`task=hellaswag`), from the original jsonl files or Rowan/hellaswag.

A row of the original format: {"activity_label", "ctx_a", "ctx_b", "endings": [4 strings], "label"}
(other keys are ignored; `activity_label` may be absent). As in the evaluation harness, the context
is `activity_label: ctx_a Ctx_b` and the choices are the endings, both cleaned of the WikiHow
"[title]"-style markers; `acc_norm` (log-likelihood per character) is the usual headline number.
Splits: the validation split (10,042 rows) is evaluated, the train split trains and holds the
few-shot examples; the test split has no labels and is not used.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..config.task import TaskConfig
from .base import hub_splits, jsonl_rows
from .choice import ChoiceProblem, ChoiceTask, data_error, local_data_dir

FILES = {"train": "hellaswag_train.jsonl", "val": "hellaswag_val.jsonl"}
HUB_SPLITS = {"train": "train", "val": "validation"}
_BRACKETED = re.compile(r"\[.*?\]")


class HellaSwagTask(ChoiceTask):
    """hellaswag: evaluate on the val split, train (and draw few-shot examples) from train."""

    def __init__(self, cfg: TaskConfig):
        super().__init__(cfg)
        rows = _load(cfg)
        self._eval = rows["val"]
        self._train = self._fewshot_pool = rows.get("train")
        self._no_train_reason = f"task.data_dir={cfg.data_dir!r} has no {FILES['train']}"


def preprocess(text: str) -> str:
    """The harness's cleaning: strip, " [title]" -> ". ", drop other [markers], collapse double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = _BRACKETED.sub("", text)
    return text.replace("  ", " ")


def parse_row(row, index: int, split: str, error) -> ChoiceProblem:
    """A ChoiceProblem from one row; `error(message)` builds the exception that names the row."""
    if not isinstance(row, dict):
        raise error("expected a JSON object")
    missing = [key for key in ("ctx_a", "ctx_b", "endings", "label") if key not in row]
    if missing:
        raise error(f"missing {', '.join(missing)} (a row needs ctx_a, ctx_b, endings and label)")
    endings = row["endings"]
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        raise error(f"endings must be a list of at least 2 strings, got {endings!r}")
    label = row["label"]
    try:
        gold = int(label)
    except (TypeError, ValueError):
        gold = None
    if gold is None or isinstance(label, bool) or not 0 <= gold < len(endings):
        raise error(f"label {label!r} is out of range: expected an integer in 0..{len(endings) - 1}")
    ctx = f"{row['ctx_a']} {str(row['ctx_b']).capitalize()}"
    activity = row.get("activity_label")
    query = preprocess(f"{activity}: {ctx}" if activity else ctx)
    return ChoiceProblem(
        id=f"hellaswag-{split}-{index}", question=query, choices=tuple(preprocess(e) for e in endings), gold=gold
    )


def _load(cfg: TaskConfig) -> dict:
    data_dir = local_data_dir(cfg, _how_to_provide(cfg))
    if data_dir is None:
        return _load_from_hub(cfg)
    if not (data_dir / FILES["val"]).is_file():
        raise FileNotFoundError(f"task.data_dir={str(data_dir)!r} has no {FILES['val']}. {_how_to_provide(cfg)}")
    return {split: read_jsonl(data_dir / name, split) for split, name in FILES.items() if (data_dir / name).is_file()}


def read_jsonl(path: Path, split: str) -> list:
    """The problems of one HellaSwag jsonl file; a bad line raises an error naming the file and line."""
    problems = []
    for line_number, row in jsonl_rows(path):
        problems.append(
            parse_row(row, len(problems), split, lambda message, n=line_number: data_error(path, n, message))
        )
    return problems


def _how_to_provide(cfg: TaskConfig) -> str:
    return (
        f"To get HellaSwag, set task.data_dir to a folder holding {FILES['val']} (and {FILES['train']} to "
        f"train) in the original jsonl format, or leave it None and make the Hub dataset {cfg.hub_id} reachable."
    )


def _load_from_hub(cfg: TaskConfig) -> dict:
    loaded = hub_splits("HellaSwag", cfg.hub_id, [cfg.hub_config], HUB_SPLITS, _how_to_provide(cfg))[cfg.hub_config]
    return {
        split: [
            parse_row(
                row, i, split, lambda message, i=i, split=split: ValueError(f"{cfg.hub_id} {split} row {i}: {message}")
            )
            for i, row in enumerate(rows)
        ]
        for split, rows in loaded.items()
    }
