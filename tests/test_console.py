"""What a cell prints (tinyablate/console.py): banner, one line per step, the end, silenced known warnings."""

from __future__ import annotations

import warnings
from pathlib import Path

from tinyablate import console
from tinyablate.config import AdapterConfig, AlgoConfig, CellSpec, LoggerConfig


def test_step_line_grpo_and_sft():
    grpo = {"loss": -1.9e-08, "reward": 0.0625, "reward_std": 0.25, "completions/mean_length": 31.6, "entropy": 6.4}
    line = console.step_line(8, 50, grpo, 2.5)
    assert line == "step 8/50  reward 0.062 ± 0.250  length 32  2.50 s/step  ETA 1:45"
    sft = {"loss": 6.4634, "mean_token_accuracy": 0.25, "num_tokens": 100.0}
    assert console.step_line(1, 3, sft, None) == "step 1/3  loss 6.463  token accuracy 0.250"
    assert len(console.step_line(8, 50, {**grpo, **{f"x/{i}": i for i in range(40)}}, 2.5)) < 100


def test_duration():
    assert [console.duration(s) for s in (5.4, 65, 3725)] == ["5 s", "1:05", "1:02:05"]


def test_banner_names_cell_model_adapter_algo_output_and_wandb(tmp_path):
    spec = CellSpec(
        adapter=AdapterConfig(u=13, tie="all"), algo=AlgoConfig(max_steps=7), gpus=2, logger=LoggerConfig(mode="online")
    )
    text = console.banner(spec, "the-id", tmp_path / "rel", 2, params=13)
    assert "cell     the-id" in text and f"output   {(tmp_path / 'rel').resolve()}" in text
    assert "tinylora r=2 u=13 tie=all sharing=tiled precision=fp32: 13 trainable parameters" in text
    assert "7 steps of 64 prompts x 4 completions of <= 512 tokens" in text
    assert "on 2 GPUs (2 ranks)" in text and "W&B      online (project tinyablate)" in text


def test_end_lines_give_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = {
        "cell_id": "c",
        "metrics": {"accuracy": 0.5, "base_accuracy": None, "n_eval": 8},
        "adapter": {"trainable_params": 13},
    }
    text = console.end_lines(result, Path("runs/c/result.json"), Path("runs/analysis/index.html"))
    assert f"result:        {tmp_path / 'runs/c/result.json'}" in text
    assert f"analysis page: {tmp_path / 'runs/analysis/index.html'}" in text
    assert "analysis page: not written (why)" in console.end_lines(result, Path("r.json"), None, "not written (why)")


def test_only_the_known_warnings_are_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_known_warnings()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
