"""Data-parallel cells on CPU: 2 gloo ranks against 1 rank with the same global batch.

Each run is a fresh set of processes (distributed.spawn_ranks). A recorder wraps the cell's train
step to keep, on every rank, the trainable tensors after every optimizer step.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_cell import result_on_disk, tiny_spec
from tinyablate import distributed
from tinyablate.config import LoggerConfig, spec_from_dict, validate_spec

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# -- what each spawned rank runs (module level: spawn pickles it by name) -----------------------
def _text_reward(kind):
    """A reward a random tiny model earns unevenly (the task's is always 0 for it): digits in the text."""

    def reward(completions, **kwargs):
        return [float(sum(ch.isdigit() for ch in str(c))) for c in completions]

    return reward


def _recorded_rank(spec: dict, cell_dir: str, out: str, text_reward: bool = False) -> None:
    """run_cell, keeping each step's trainable tensors of this rank in <out>/rank<r>/."""
    import tinyablate.cell as cell
    from tinyablate.tasks.base import Task

    if text_reward:  # GRPO takes its reward from the task (Task.reward_fn)
        Task.reward_fn = lambda self: _text_reward(self.cfg.scorer)
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    from tinyablate.adapters import trainable_state

    rank = distributed.ranks_from_env().rank
    folder = Path(out) / f"rank{rank}"
    folder.mkdir(parents=True, exist_ok=True)
    inner = cell.train

    class Recorder(TrainerCallback):
        def __init__(self, model):
            self.model = model

        def on_step_end(self, args, state, control, **kwargs):
            save_file(trainable_state(self.model), str(folder / f"step{state.global_step}.safetensors"))

    def train(spec_, built, cell_dir_, callbacks):
        return inner(spec_, built, cell_dir_, [*callbacks, Recorder(built.model)])

    cell.train = train  # cell's own binding: _run looks train up there (it lives in tinyablate.train.run)
    result = cell.run_cell(spec_from_dict(spec), cell_dir)
    (folder / "result.json").write_text(json.dumps(result, default=str))


def _run(spec, world_size: int, tmp_path: Path, name: str, text_reward: bool = False) -> tuple:
    cell_dir, out = tmp_path / name / "cell", tmp_path / name / "out"
    distributed.spawn_ranks(world_size, _recorded_rank, asdict(spec), str(cell_dir), str(out), text_reward)
    return cell_dir, out


def _steps(out: Path, rank: int) -> dict:
    return {int(p.stem[4:]): load_file(str(p)) for p in (out / f"rank{rank}").glob("step*.safetensors")}


def _assert_close(a: dict, b: dict, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def _spec(tmp_path, algo, **kw):
    spec = tiny_spec(tmp_path, algo=algo, **kw)
    spec.logger = LoggerConfig(mode="offline")
    return spec


# -- SFT --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_sft")
    spec = _spec(tmp, "sft", prompts_per_step=4, micro_batch_size=2, max_steps=4, save_steps=2)
    one = _run(spec, 1, tmp, "one")
    two = _run(spec, 2, tmp, "two")
    return spec, one, two


def test_sft_two_ranks_match_one_rank_every_step(sft_runs):
    _, (_, one), (_, two) = sft_runs
    ref, r0, r1 = _steps(one, 0), _steps(two, 0), _steps(two, 1)
    assert sorted(ref) == sorted(r0) == sorted(r1) == [1, 2, 3, 4]
    for step in ref:
        assert r0[step].keys() == r1[step].keys()
        for k in r0[step]:  # DDP all-reduces the gradients: bit-identical on every rank
            assert torch.equal(r0[step][k], r1[step][k]), (step, k)
        _assert_close(r0[step], ref[step])
    assert any(float(t.abs().max()) > 0 for t in ref[4].values()), "v never moved: the comparison proves nothing"


def test_only_rank_zero_writes_and_every_problem_is_scored_once(sft_runs):
    spec, _, (cell_dir, out) = sft_runs
    result = result_on_disk(cell_dir)
    assert result["status"] == "completed"
    assert result["timing"]["world_size"] == 2 and result["config"]["gpus"] == 0
    assert json.loads((out / "rank1" / "result.json").read_text())["cell_id"] == result["cell_id"]
    ids = [json.loads(line)["id"] for line in (cell_dir / "eval_samples.jsonl").read_text().splitlines()]
    from tinyablate.tasks import load_task

    assert ids == [p.id for p in load_task(spec.task).eval_problems()]  # 12 problems over 2 ranks, in order
    assert result["metrics"]["n_eval"] == len(ids)
    steps = [
        json.loads(line)["step"]
        for line in (cell_dir / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]
    assert steps == [1, 2, 3, 4]  # one sink: rank 1 logged nothing
    runs = list((cell_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    ckpt = cell_dir / "checkpoints" / "checkpoint-4"
    assert (ckpt / "rng_state_0.pth").exists() and (ckpt / "rng_state_1.pth").exists()


def test_two_rank_cell_resumes_like_one_rank(sft_runs, tmp_path):
    """Drop the last checkpoint and the result: the rerun resumes at step 2 and ends on the same v."""
    import shutil

    spec, _, (cell_dir, out) = sft_runs
    copy = tmp_path / "cell"
    shutil.copytree(cell_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "checkpoint-4")
    (copy / "result.json").unlink()
    resumed_out = tmp_path / "out"
    distributed.spawn_ranks(2, _recorded_rank, asdict(spec), str(copy), str(resumed_out))
    result = result_on_disk(copy)
    assert result["metrics"]["resumed_from_step"] == 2 and result["metrics"]["train_steps"] == 4
    assert sorted(_steps(resumed_out, 0)) == [3, 4]
    _assert_close(_steps(resumed_out, 0)[4], _steps(out, 0)[4], rtol=1e-6, atol=1e-8)


# -- GRPO -------------------------------------------------------------------------------------
def test_grpo_keyed_rollouts_two_ranks_match_one_rank(tmp_path):
    """Keyed sampling draws the same completions whatever the split, so the updates agree too."""
    spec = _spec(
        tmp_path,
        "grpo",
        rollout_sampler="keyed",
        prompts_per_step=2,
        num_generations=4,
        micro_batch_size=2,
        max_steps=3,
        save_steps=3,
    )
    spec.logger = LoggerConfig(mode="disabled")
    _, one = _run(spec, 1, tmp_path, "one", text_reward=True)
    cell_dir, two = _run(spec, 2, tmp_path, "two", text_reward=True)
    ref, r0, r1 = _steps(one, 0), _steps(two, 0), _steps(two, 1)
    assert sorted(ref) == sorted(r0) == [1, 2, 3]
    for step in ref:
        for k in r0[step]:
            assert torch.equal(r0[step][k], r1[step][k]), (step, k)
        _assert_close(r0[step], ref[step])
    assert any(float(t.abs().max()) > 0 for t in ref[3].values()), "v never moved: the comparison proves nothing"
    one_res = json.loads((one / "rank0" / "result.json").read_text())
    two_res = result_on_disk(cell_dir)
    assert two_res["metrics"]["reward"]["first"] == pytest.approx(one_res["metrics"]["reward"]["first"])


def test_grpo_torch_sampler_two_ranks_stay_in_sync(tmp_path):
    """TRL's own sampling (per-rank generators): rollouts differ from 1 rank, v is identical across ranks. The task's
    reward is 0 for every completion of a random model: a collapse, which stops both ranks at the same step."""
    spec = _spec(
        tmp_path,
        "grpo",
        prompts_per_step=2,
        num_generations=4,
        micro_batch_size=2,
        max_steps=4,
        save_steps=2,
        collapse_steps=2,
        on_collapse="stop",
    )
    spec.logger = LoggerConfig(mode="disabled")
    cell_dir, out = _run(spec, 2, tmp_path, "two")
    r0, r1 = _steps(out, 0), _steps(out, 1)
    assert sorted(r0) == sorted(r1) == [1, 2]  # each rank stopped at step 2 of 4 (else the other would wait forever)
    for step in r0:
        for k in r0[step]:
            assert torch.equal(r0[step][k], r1[step][k])
    result = result_on_disk(cell_dir)
    assert result["status"] == "completed" and result["algo"]["steps"] == 2
    assert result["metrics"]["collapse"]["stopped"] and result["metrics"]["collapse"]["detected_step"] == 2


# -- what fails, fails loudly -----------------------------------------------------------------
def _diverging_rank(spec: dict, cell_dir: str) -> None:
    """Rank 1 nudges its v during step 2 (after DDP's initial broadcast): the sync check must catch it."""
    from transformers import TrainerCallback

    import tinyablate.cell as cell

    inner = cell.train

    class Nudge(TrainerCallback):
        def __init__(self, model):
            self.model = model

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1 and distributed.ranks_from_env().rank == 1:
                for p in self.model.parameters():
                    if p.requires_grad:
                        p.data.add_(1e-3)

    def train(spec_, built, cell_dir_, callbacks):
        return inner(spec_, built, cell_dir_, [*callbacks, Nudge(built.model)])

    cell.train = train
    cell.run_cell(spec_from_dict(spec), cell_dir)


def test_ranks_that_diverge_fail_the_cell(tmp_path):
    spec = _spec(tmp_path, "sft", prompts_per_step=4, micro_batch_size=2, max_steps=2)
    spec.logger = LoggerConfig(mode="disabled")
    with pytest.raises(Exception):
        distributed.spawn_ranks(2, _diverging_rank, asdict(spec), str(tmp_path / "cell"))
    failed = result_on_disk(tmp_path / "cell")
    assert failed["status"] == "failed"
    assert "the trainable parameters after step 2 differs between ranks" in failed["error"]["message"]


def test_global_batch_must_split_over_the_gpus(tmp_path):
    spec = _spec(tmp_path, "grpo", prompts_per_step=2, num_generations=4, micro_batch_size=4)
    validate_spec(spec, world_size=2)  # 8 completions = 4 x 2 ranks
    with pytest.raises(ValueError, match=r"micro_batch_size=4 x 4 GPUs.*algo.micro_batch_size=2"):
        validate_spec(spec, world_size=4)
    spec.gpus = 3
    with pytest.raises(ValueError, match="change algo.prompts_per_step"):
        validate_spec(spec)


def test_dp_bench_runs_on_cpu_ranks():
    """The scaling benchmark's script works end to end (gloo; its CPU timings mean nothing)."""
    from benchmarks.dp_bench import main

    report = main(
        [
            "--device",
            "cpu",
            "--shape",
            "small",
            "--layers",
            "1",
            "--world-sizes",
            "1,2",
            "--samplers",
            "torch,keyed",
            "--engines",
            "hf,eager",
            "--prompts",
            "2",
            "--generations",
            "2",
            "--prompt-len",
            "8",
            "--new-tokens",
            "4",
            "--micro-batch",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
        ]
    )
    assert [(r["engine"], r["sampler"], r["world_size"]) for r in report["rows"]] == [
        (e, s, w) for e in ("hf", "eager") for s in ("torch", "keyed") for w in (1, 2)
    ]
    assert all(r["step_s"] > 0 and r["rollout_tokens_per_s"] > 0 for r in report["rows"])
