"""The non-finite guard (tinyablate/train/guard.py): a NaN loss, gradient or trainable tensor fails the cell, or
skips the step with algo.nonfinite=skip; never a completed result with non-finite values; metrics.jsonl stays JSON."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_cell import tiny_spec
from tinyablate.adapters.layers import SVDAdapterLinear
from tinyablate.cell import run_cell
from tinyablate.cell_folder import CHECKPOINTS_DIR, METRICS_FILE, CellFolder, Result, ResultError
from tinyablate.config import ConfigError, validate_spec
from tinyablate.metrics import jsonl_line, read_metrics
from tinyablate.train.common import ADAPTER_STATE


@contextmanager
def nan_output_from_step(first_call: int):
    """Every SVDAdapterLinear's training forward returns NaN from the `first_call`-th training forward on."""
    original = SVDAdapterLinear._forward
    calls = {"n": 0}

    def forward(self, x):
        y = original(self, x)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] >= first_call:
                y = y * float("nan")
        return y

    SVDAdapterLinear._forward = forward
    try:
        yield calls
    finally:
        SVDAdapterLinear._forward = original


def _checkpoint_vectors(cell_dir: Path) -> list:
    return [load_file(p / ADAPTER_STATE) for p in sorted((cell_dir / CHECKPOINTS_DIR).glob("checkpoint-*"))]


@pytest.mark.parametrize("algo", ["grpo", "sft"])
def test_nan_in_training_fails_the_cell_naming_step_and_quantity(tmp_path, algo):
    extra = {} if algo == "grpo" else dict(prompts_per_step=4, micro_batch_size=2)
    spec = tiny_spec(tmp_path, algo=algo, max_steps=6, save_steps=2, **extra)
    spec.logger.mode = "disabled"
    modules_per_forward = 14  # 2 layers x 7 adapted modules of tiny-qwen2
    micro_batches = spec.algo.gradient_accumulation_steps()
    # NaN from the first training forward of step 3 (steps 1-2 finite; the step-2 checkpoint is written)
    with nan_output_from_step(2 * micro_batches * modules_per_forward + 1), pytest.raises(Exception) as err:
        run_cell(spec)
    assert type(err.value).__name__ == "NonFiniteTraining"
    message = str(err.value)
    assert message.startswith("step 3: the loss and the gradient of"), message
    assert "algo.nonfinite=skip" in message and "algo.learning_rate" in message
    folder = CellFolder.of(spec)
    result = folder.read_result()
    assert result.status == "failed" and result.error.type == "NonFiniteTraining"
    assert folder.state() == "failed"
    checkpoints = _checkpoint_vectors(folder.path)
    assert [p.name for p in sorted((folder.path / CHECKPOINTS_DIR).glob("checkpoint-*"))] == ["checkpoint-2"]
    assert all(torch.isfinite(t).all() for ck in checkpoints for t in ck.values())


def test_skip_mode_drops_the_bad_steps_and_completes(tmp_path):
    spec = tiny_spec(tmp_path, max_steps=4, nonfinite="skip")
    spec.logger.mode = "disabled"
    micro_batches = spec.algo.gradient_accumulation_steps()
    with nan_output_from_step(2 * micro_batches * 14 + 1):  # steps 3 and 4 are NaN
        result = Result.parse(run_cell(spec))
    assert result.completed and result.metrics.nonfinite_skipped_steps == 2 and result.metrics.train_steps == 4
    rows = read_metrics(CellFolder.of(spec).path)
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert math.isnan(losses[3]) and math.isnan(losses[4]) and math.isfinite(losses[1])
    skipped = {r["step"]: r["train/nonfinite_skipped_steps"] for r in rows if "train/nonfinite_skipped_steps" in r}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 2}
    # the file is strict JSON: a NaN is the string "NaN", which read_metrics turns back into a float
    text = (CellFolder.of(spec).path / METRICS_FILE).read_text()
    assert '"NaN"' in text
    for line in text.splitlines():
        json.loads(line, parse_constant=lambda token: pytest.fail(f"bare {token} in metrics.jsonl"))
    v = [p for p in CellFolder.of(spec).path.glob("adapter_native/*")]
    assert v  # exported: every value finite (the export reads the finite v the skipped steps left alone)


def test_fp16_vector_overflow_fails_sft_cell(tmp_path):
    """The issue's case: fp16 v, learning rate 1e6: v overflows; never 'completed' with last_loss 0."""
    spec = tiny_spec(
        tmp_path, algo="sft", prompts_per_step=4, micro_batch_size=2, max_steps=10, learning_rate=1e6, adam_epsilon=1e-7
    )
    spec.adapter.precision = "fp16"
    spec.logger.mode = "disabled"
    with pytest.raises(Exception) as err:
        run_cell(spec)
    assert type(err.value).__name__ == "NonFiniteTraining", err.value
    assert "not finite" in str(err.value) or "became non-finite" in str(err.value)
    result = CellFolder.of(spec).read_result()
    assert result.status == "failed"
    for ck in _checkpoint_vectors(CellFolder.of(spec).path):
        assert all(torch.isfinite(t).all() for t in ck.values())


def test_a_completed_result_with_nan_is_refused():
    raw = {
        "cell_id": "c",
        "status": "completed",
        "config": {"algo": {"max_steps": 1}},
        "model": {"name": "m", "family": "qwen2", "size": "1", "n_params": 1},
        "adapter": {"kind": "tinylora", "trainable_params": 1},
        "algo": {"name": "grpo", "learning_rate": 1.0, "steps": 1},
        "task": {"name": "arithmetic"},
        "metrics": {"accuracy": 0.5, "n_eval": 10, "reward": {"first": 0.1, "last": float("nan")}},
    }
    with pytest.raises(ResultError, match=r"metrics\.reward\.last"):
        Result.parse(raw)
    raw["metrics"]["reward"]["last"] = 0.2
    assert Result.parse(raw).completed


def test_metrics_lines_are_strict_json_and_read_back(tmp_path):
    row = {"step": 1, "a": float("nan"), "b": [float("inf"), 1.0], "c": {"d": float("-inf")}}
    line = jsonl_line(row)
    parsed = json.loads(line, parse_constant=lambda token: pytest.fail(f"bare {token}"))
    assert parsed["a"] == "NaN" and parsed["b"] == ["Infinity", 1.0] and parsed["c"] == {"d": "-Infinity"}
    (tmp_path / METRICS_FILE).write_text(line + '{"step": 2, "a": NaN}\n')  # an older file's bare token
    first, second = read_metrics(tmp_path)
    assert math.isnan(first["a"]) and first["b"] == [math.inf, 1.0] and first["c"]["d"] == -math.inf
    assert math.isnan(second["a"])


def test_nonfinite_setting_is_checked():
    spec = tiny_spec(Path("/tmp"), nonfinite="ignore")
    with pytest.raises(ConfigError, match="algo.nonfinite='ignore'"):
        validate_spec(spec)
