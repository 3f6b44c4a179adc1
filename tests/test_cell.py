"""One cell end to end on CPU with tiny random models: result record, exports, W&B, failure, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tinyablate.cell import run_cell
from tinyablate.cell_folder import CellFolder
from tinyablate.config import (
    AdapterConfig,
    AlgoConfig,
    CellSpec,
    ConfigError,
    EvalConfig,
    LoggerConfig,
    ModelConfig,
    TaskConfig,
    cell_id,
)
from wandb_reader import find_offline_runs, read_run

SECRET = "wandb-secret-key-0123456789abcdef0123456789"
REPO = Path(__file__).resolve().parents[1]


def result_on_disk(cell_dir):
    """result.json of a cell folder as a dict (None if it has none), read through the cell-folder schema."""
    result = CellFolder(cell_dir).read_result()
    return None if result is None else result.to_dict()


def tiny_spec(tmp_path, algo="grpo", kind="tinylora", family="tiny-qwen2", **algo_kw) -> CellSpec:
    settings = dict(
        name=algo,
        max_steps=4,
        learning_rate=1e-2,
        prompts_per_step=2,
        num_generations=4,
        micro_batch_size=4,
        max_completion_length=12,
        max_length=96,
        save_steps=2,
    )
    settings.update(algo_kw)
    return CellSpec(
        model=ModelConfig(name=family, cache_dir=str(tmp_path / "cache")),
        adapter=AdapterConfig(kind=kind, r=2, u=3, tie=2),
        task=TaskConfig(name="arithmetic", max_value=9, train_size=40, eval_size=12, scorer="flexible"),
        algo=AlgoConfig(**settings),
        eval=EvalConfig(batch_size=12, max_new_tokens=12),
        logger=LoggerConfig(mode="offline"),
        output_dir=str(tmp_path / "runs"),
        sweep="unit",
    )


@pytest.fixture(scope="module")
def grpo_cell(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grpo")
    os.environ["WANDB_API_KEY"] = SECRET
    try:
        spec = tiny_spec(tmp)
        result = run_cell(spec)
    finally:
        os.environ.pop("WANDB_API_KEY", None)
    return spec, result, CellFolder.of(spec).path


@pytest.fixture(scope="module")
def sft_cell(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    spec = tiny_spec(tmp, algo="sft", prompts_per_step=4, micro_batch_size=2)
    spec.logger = LoggerConfig(mode="disabled")
    return spec, run_cell(spec), CellFolder.of(spec).path


def test_result_record_has_everything(grpo_cell):
    spec, result, cell_dir = grpo_cell
    on_disk = result_on_disk(cell_dir)
    assert on_disk["cell_id"] == result["cell_id"] == cell_id(spec)
    assert on_disk["status"] == "completed" and CellFolder(cell_dir).state() == "completed"
    assert on_disk["model"]["family"] == "qwen2" and on_disk["model"]["n_params"] > 0
    adapter = on_disk["adapter"]
    # 2 layers x 7 modules, tie 2 (tiled) -> 7 groups of u=3
    assert adapter["trainable_params"] == 21 and adapter["trainable_bytes"] == 84
    assert {"kind", "r", "u", "tie", "sharing", "precision"} <= set(adapter)
    # the frozen basis' report (issue 15), as the README says: method, certified bound, gap, ties
    assert adapter["svd_method"] == "exact" and 0 <= adapter["svd_max_sin_bound"] < 1e-3
    assert adapter["svd_min_rel_gap"] > 0 and isinstance(adapter["svd_ties"], list)
    m = on_disk["metrics"]
    for key in ("accuracy", "accuracy_flexible", "accuracy_strict", "base_accuracy"):
        assert 0.0 <= m[key] <= 1.0
    assert m["n_eval"] == 12 and m["train_steps"] == 4 and set(m["reward"]) >= {"first", "last", "mean_last10"}
    assert m["resumed_from_step"] is None  # a fresh cell resumed from nothing (it wrote checkpoints 2 and 4)
    assert set(on_disk["timing"]) >= {"wall_s", "train_s", "eval_s", "gpu_hours"}
    prov = on_disk["provenance"]
    assert "torch" in prov["packages"] and "git" in prov and "devices" in prov
    assert on_disk["config"]["adapter"]["u"] == 3


def test_outputs_on_disk(grpo_cell):
    spec, result, cell_dir = grpo_cell
    assert (cell_dir / "adapter" / "adapter_config.json").exists()
    assert (cell_dir / "adapter" / "adapter_model.safetensors").exists()
    assert (cell_dir / "adapter_native" / "vectors.safetensors").exists()
    steps = [json.loads(line) for line in (cell_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = sorted({s["step"] for s in steps if "train/reward" in s})
    assert train_steps == [1, 2, 3, 4]
    assert len((cell_dir / "eval_samples.jsonl").read_text().splitlines()) == 12
    checkpoints = sorted(p.name for p in (cell_dir / "checkpoints").iterdir())
    assert "checkpoint-4" in checkpoints
    # checkpoints hold the adapter only, not the base weights
    assert (cell_dir / "checkpoints" / "checkpoint-4" / "adapter_state.safetensors").stat().st_size < 10_000


def test_peft_export_loads_and_matches(sft_cell):
    from peft import PeftModel

    from tinyablate.adapters import load_native
    from tinyablate.build import build

    spec, result, cell_dir = sft_cell

    def fresh_base():
        return build(CellSpec(model=spec.model, adapter=AdapterConfig(kind="none"), task=spec.task)).model

    peft_model = PeftModel.from_pretrained(fresh_base(), str(cell_dir / "adapter")).eval()
    native = load_native(fresh_base(), cell_dir / "adapter_native")
    base_model = fresh_base()
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = peft_model(ids).logits
        b = native.model(ids).logits
        c = base_model(ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(b, c, atol=1e-7)  # trained v differs from the fresh (zero) one


def test_wandb_offline_run_read_back(grpo_cell):
    spec, result, cell_dir = grpo_cell
    runs = find_offline_runs(cell_dir)
    assert runs
    run = read_run(runs[-1])
    assert run.group == "unit" and run.job_type == "grpo"
    assert run.config["trainable_params"] == 21 and run.config["model_family"] == "qwen2"
    assert run.config["adapter"]["u"] == 3 and run.config["adapter"]["sharing"] == "tiled"
    assert any("train/reward" in row for row in run.history)
    assert abs(float(_summary_value(run.summary["eval/accuracy"])) - result["metrics"]["accuracy"]) < 1e-9
    assert run.summary["trainable_params"] == 21


def _summary_value(v):
    return v["last"] if isinstance(v, dict) else v


def test_api_key_never_written(grpo_cell):
    _, _, cell_dir = grpo_cell
    for path in cell_dir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert SECRET.encode() not in path.read_bytes(), path


def test_base_accuracy_is_cached(grpo_cell, tmp_path):
    spec, result, _ = grpo_cell
    assert result["metrics"]["base_cached"] is False
    again = run_cell(CellSpec(**{**spec.__dict__, "seed": 1, "logger": LoggerConfig(mode="disabled")}))
    assert again["metrics"]["base_cached"] is True
    assert again["metrics"]["base_accuracy"] == result["metrics"]["base_accuracy"]


def test_sft_cell(sft_cell):
    _, result, _ = sft_cell
    assert result["status"] == "completed" and result["metrics"]["train_steps"] == 4
    losses = result["metrics"]["reward"]
    assert 0 < losses["first_loss"] < 20 and 0 < losses["last_loss"] < 20


def test_llama_family_cell(tmp_path):
    spec = tiny_spec(tmp_path, family="tiny-llama", max_steps=2)
    spec.logger = LoggerConfig(mode="disabled")
    result = run_cell(spec)
    assert result["status"] == "completed" and result["model"]["family"] == "llama"


def test_console_banner_one_line_per_step_and_no_known_warnings(tmp_path, capsys):
    import warnings

    spec = tiny_spec(tmp_path, max_steps=2)
    spec.logger = LoggerConfig(mode="disabled")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cell(spec)
    out = capsys.readouterr().out
    folder = CellFolder.of(spec).path.resolve()
    assert f"output   {folder}" in out and f"cell     {cell_id(spec)}" in out and "W&B      disabled" in out
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in steps] == ["1/2", "2/2"]
    assert all("reward " in line and " s/step  ETA " in line for line in steps)
    assert "{'loss'" not in out and "'reward'" not in out  # the raw dict is in metrics.jsonl only
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert not any("checkpointing" in m for m in future), future


@pytest.mark.parametrize("kind", ["lora_xs", "lora", "none"])
def test_other_adapters_complete(tmp_path, kind):
    spec = tiny_spec(tmp_path, kind=kind, max_steps=2)
    spec.logger = LoggerConfig(mode="disabled")
    result = run_cell(spec)
    assert result["status"] == "completed"
    if kind == "none":
        assert result["metrics"]["train_steps"] == 0
        assert result["metrics"]["accuracy"] == result["metrics"]["base_accuracy"]
        assert result["adapter"]["trainable_params"] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="fails for want of a GPU")
def test_failed_cell_leaves_a_failed_result(tmp_path, monkeypatch):
    import tinyablate.build

    def broken_loader(cfg):
        raise RuntimeError("the weights could not be read")

    spec = tiny_spec(tmp_path)
    spec.logger = LoggerConfig(mode="disabled")
    monkeypatch.setattr(tinyablate.build, "load_model_and_tokenizer", broken_loader)  # fails while it builds
    with pytest.raises(RuntimeError, match="could not be read"):
        run_cell(spec)
    result = result_on_disk(CellFolder.of(spec).path)
    assert result["status"] == "failed" and "could not be read" in result["error"]["message"]
    assert CellFolder.of(spec).state() == "failed"
    # a retry moves the failed record aside (kept for the post-mortem) and writes its own
    with pytest.raises(RuntimeError):
        run_cell(spec)
    assert len(list(CellFolder.of(spec).path.glob("result.failed-*.json"))) == 1


def test_missing_data_is_refused_before_the_cell_starts(tmp_path):
    spec = tiny_spec(tmp_path)
    spec.task = TaskConfig(name="gsm8k", data_dir=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="task.data_dir=.*missing' is not a folder"):
        run_cell(spec)
    assert not Path(spec.output_dir).exists()


def test_a_completed_cell_is_not_run_again(grpo_cell):
    spec, result, cell_dir = grpo_cell
    again = run_cell(spec)
    assert again["timing"] == result["timing"] and again["cell_id"] == result["cell_id"]


def test_invalid_spec_fails_before_any_weight_loads(tmp_path):
    spec = tiny_spec(tmp_path, num_generations=3)  # 2 prompts x 3 = 6 completions, micro-batch 4
    with pytest.raises(ValueError, match="not divisible by algo.micro_batch_size"):
        run_cell(spec)
    assert not Path(spec.output_dir).exists()


def _run_cell_subprocess(spec_path: Path, log: Path) -> subprocess.Popen:
    code = (
        "import json,sys; from tinyablate.config import spec_from_dict; from tinyablate.cell import run_cell;"
        f"run_cell(spec_from_dict(json.load(open({str(spec_path)!r}))))"
    )
    env = {**os.environ, "WANDB_MODE": "disabled", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


@pytest.mark.slow
def test_killed_cell_resumes_from_checkpoint_with_same_step_count(tmp_path):
    from dataclasses import asdict

    spec = tiny_spec(tmp_path, max_steps=12, save_steps=3, max_completion_length=24)
    spec.logger = LoggerConfig(mode="disabled")
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    cell_dir = CellFolder.of(spec).path
    proc = _run_cell_subprocess(spec_path, tmp_path / "first.log")
    deadline = time.time() + 240
    while time.time() < deadline and not (cell_dir / "checkpoints" / "checkpoint-6" / "trainer_state.json").exists():
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # a real kill: no cleanup, no result
    proc.wait()
    assert result_on_disk(cell_dir) is None
    second = _run_cell_subprocess(spec_path, tmp_path / "second.log")
    assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()[-3000:]
    result = result_on_disk(cell_dir)
    assert result["status"] == "completed"
    assert result["metrics"]["train_steps"] == 12
    assert result["metrics"]["resumed_from_step"] in (6, 9)
    logged = [
        json.loads(line)["step"]
        for line in (cell_dir / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]
    assert max(logged) == 12
    steps = [json.loads(line)["step"] for line in (cell_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(0) == 1  # ascending across the resume; the base line once
