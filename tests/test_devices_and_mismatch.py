"""The GPU by default (gpus=auto), device checks before anything loads, the engine's sampling log-probabilities,
GRPO's training-rollout mismatch metric and its truncated importance-sampling correction."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import hydra_plugins.tinyablate.conf as conf
from hydra_plugins.tinyablate.submit import cpu_threads_per_cell
from test_cell import tiny_spec
from test_sweeps import TINY, launch
from tinyablate.cell import run_cell
from tinyablate.cell_folder import CellFolder
from tinyablate.config import ConfigError, validate_spec
from tinyablate.engine import GenerationEngine, Sampling
from tinyablate.metrics import read_metrics
from tinyablate.models import build_tiny_model
from tinyablate.preflight import preflight

CONF = Path(__file__).resolve().parents[1] / "conf"
NO_GPU = not torch.cuda.is_available()
conf.register()


def _compose(overrides, auto_gpus=None):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return conf.spec_from_hydra(cfg, auto_gpus)


def test_gpus_default_is_auto_and_follows_the_machine(monkeypatch):
    assert _compose([], auto_gpus=1).gpus == 1  # a machine with a GPU: one per cell
    assert _compose([], auto_gpus=0).gpus == 0
    assert _compose(["gpus=0"], auto_gpus=1).gpus == 0  # gpus=0 still forces the CPU
    assert _compose(["gpus=2"], auto_gpus=1).gpus == 2
    monkeypatch.setattr(conf, "local_auto_gpus", lambda: 1)
    assert _compose([]).gpus == 1  # python launch.py asks this machine
    monkeypatch.setattr(conf, "local_auto_gpus", lambda: 0)
    assert _compose([]).gpus == 0


def test_cpu_threads_are_split_between_cells_running_at_once(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_threads_per_cell(cores=16, max_parallel=6, cells=6) == 2
    assert cpu_threads_per_cell(cores=16, max_parallel=6, cells=2) == 8  # only 2 run at once
    assert cpu_threads_per_cell(cores=2, max_parallel=6, cells=6) == 1  # at least one
    assert cpu_threads_per_cell(cores=16, max_parallel=1, cells=6) is None  # one at a time: torch's default
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads_per_cell(cores=16, max_parallel=6, cells=6) is None  # the user's setting wins


@pytest.mark.skipif(not NO_GPU, reason="checks a machine without a GPU")
def test_gpus_on_a_machine_without_gpu_is_refused_before_anything_loads(tmp_path):
    out = launch([*TINY, "gpus=1", f"output_dir={tmp_path / 'runs'}"], tmp_path)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if "is invalid" in line]
    assert lines == [
        "  gpus=1 is invalid here: this machine shows 0 CUDA GPU(s); set gpus=0 for the CPU, or run where "
        "the GPUs are (hydra/launcher=slurm requests them)"
    ], out.stderr
    assert not list((tmp_path / "runs").rglob("result.json"))  # refused before its folder exists


@pytest.mark.skipif(not NO_GPU, reason="checks a machine without a GPU")
def test_cuda_device_is_refused_by_the_local_dry_run(tmp_path):
    out = launch(
        ["-m", *TINY, "model.device=cuda", "adapter.u=1,2", "dry_run=true", f"output_dir={tmp_path}"], tmp_path
    )
    assert out.returncode == 2 and "model.device='cuda' is invalid here" in out.stdout, out.stdout[-2000:]
    assert "nothing was submitted" in out.stdout


def test_rollout_correction_settings_are_checked(tmp_path):
    spec = tiny_spec(tmp_path, rollout_correction="importance")
    with pytest.raises(ConfigError, match="algo.rollout_correction='importance' is invalid") as bad:
        validate_spec(spec)
    assert len(bad.value.problems) == 1, bad.value.problems  # not also "set algo.rollout_engine=eager"
    spec = tiny_spec(tmp_path, rollout_correction="truncated_is", rollout_engine="hf")
    with pytest.raises(ConfigError, match="needs the generation engine's sampling log-probabilities"):
        validate_spec(spec)
    spec = tiny_spec(tmp_path, rollout_correction="truncated_is", rollout_engine="eager", rollout_is_cap=0.5)
    with pytest.raises(ConfigError, match="algo.rollout_is_cap=0.5 is invalid"):
        preflight(spec)


def test_engine_logprobs_are_the_models_temperature_scaled_logprobs():
    torch.manual_seed(0)
    model = build_tiny_model("qwen2", seed=1)
    engine = GenerationEngine(model, pad_token_id=0, eos_token_ids=[], use_graphs=False)
    prompts = [[5, 6, 7, 8], [9, 10], [5, 6, 7, 8]]
    completions, logprobs = engine.generate(prompts, 6, Sampling(temperature=0.7), logprobs=True)
    for prompt, tokens, lps in zip(prompts, completions, logprobs):
        assert len(tokens) == len(lps) == 6
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / 0.7
        reference = logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lps), reference, atol=1e-4), (lps, reference)
    assert engine.generate(prompts, 3, Sampling()) == engine.generate(prompts, 3, Sampling(), logprobs=True)[0]


@pytest.mark.parametrize("correction", ["none", "truncated_is"])
def test_grpo_logs_the_rollout_mismatch(tmp_path, correction):
    spec = tiny_spec(tmp_path, rollout_engine="eager", rollout_correction=correction, max_steps=2)
    spec.logger.mode = "disabled"
    result = run_cell(spec)
    assert result["status"] == "completed"
    rows = [r for r in read_metrics(CellFolder.of(spec).path) if "train/rollout_logp_diff_mean" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:  # the same fp32 model and weights: the engine's and training's log-probs agree to rounding
        assert 0 <= r["train/rollout_logp_diff_mean"] <= r["train/rollout_logp_diff_max"] < 1e-4


def test_truncated_is_weights_each_token_by_the_capped_ratio():
    from tinyablate.train.mismatch import truncated_is_advantages

    train = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, -1.0]])
    sampling = torch.tensor([[-1.0, -3.0, -0.1], [-3.0, -1.5, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = truncated_is_advantages(torch.tensor([1.0, -2.0]), train, sampling, mask, cap=2.0)
    ratio = torch.exp(train - sampling).clamp(max=2.0) * mask
    assert torch.allclose(adv, torch.tensor([[1.0], [-2.0]]) * ratio)
    assert adv[0, 1] == 2.0 and math.isclose(adv[0, 2].item(), math.exp(-0.4), rel_tol=1e-6) and adv[1, 2] == 0
