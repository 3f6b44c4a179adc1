"""Sweeps through launch.py: presets, dry runs, bad input, local dispatch, skip and retry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinyablate.cell_folder import CellFolder, ErrorRecord, Result

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml"))

# A tiny, fast cell: random 2-layer model, 1-digit addition, 2 GRPO steps.
TINY = [
    "model=tiny-qwen2",
    "task.max_value=9",
    "task.train_size=40",
    "task.eval_size=8",
    "algo=grpo_cpu",
    "algo.max_steps=2",
    "algo.prompts_per_step=2",
    "algo.num_generations=4",
    "algo.micro_batch_size=8",
    "algo.max_completion_length=8",
    "algo.save_steps=1",
    "eval.max_new_tokens=8",
    "logger=disabled",
]


def launch(args, tmp_path, env=None, timeout=600) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
        "TINYABLATE_CACHE": str(tmp_path / "cache"),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_sweep_preset_composes_and_validates(sweep, tmp_path):
    # planned for the cluster they are written for (a local dry run refuses GPU cells on a machine without GPUs)
    proc = launch(
        ["-m", f"sweeps={sweep}", "hydra/launcher=slurm", "dry_run=true", f"output_dir={tmp_path}/runs"], tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("pending ")]
    assert lines and f"dry run: {len(lines)} valid cells, nothing submitted" in proc.stdout
    assert all("params=" in line and "bytes=" in line for line in lines)
    assert "SLURM: each cell's GPUs (gpus, model.device) are checked on its node when the job starts" in proc.stdout
    assert not list((tmp_path / "runs").rglob("spec.json"))  # a dry run creates no cell


def test_default_multirun_is_the_embedded_sweep(tmp_path):
    proc = launch(["-m", "dry_run=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run: 6 valid cells" in proc.stdout and "-u256-tall-" in proc.stdout


def test_dry_run_counts_duplicates_once_and_says_why(tmp_path):
    # (the embedded preset adds algo=grpo,sft) lora_xs ignores u (3 sets -> 1 cell); at tie=all tiled and
    # structured are one cell (2 -> 1)
    proc = launch(
        [
            "-m",
            "model=tiny-qwen2",
            "adapter=lora_xs,tinylora",
            "adapter.u=1,2,3",
            "adapter.tie=all",
            "adapter.sharing=tiled,structured",
            "gpus=1",
            "hydra/launcher=slurm",
            "dry_run=true",
            f"output_dir={tmp_path}/runs",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "24 override sets -> 8 distinct cells (16 duplicates, each run once):" in out
    assert "adapter.u (adapter=lora_xs ignores it)" in out
    assert "adapter.sharing (tie=all: one vector for every module, so tiled = structured)" in out
    lines = [line for line in out.splitlines() if line.startswith("pending ")]
    assert len(lines) == 8 and len({line.split()[1] for line in lines}) == 8
    assert all(" gpu_h=" in line and line.endswith("(model)") for line in lines)
    by_u = next(line for line in out.splitlines() if line.startswith("GPU-hours by adapter.u: "))
    assert "n/a " in by_u and ", 3 " in by_u  # lora_xs's cells count under n/a for u
    assert "GPU-hours on h200: " in out and "for 8 distinct cells (8 model)" in out
    assert "dry run: 8 valid cells, nothing submitted (24 override sets)" in out


def test_dry_run_estimates_are_measured_or_calibrated_once_cells_completed(tmp_path):
    from test_conf import compose_spec
    from tinyablate.cell_folder import (
        AdapterRecord,
        AlgoRecord,
        CellFolder,
        Metrics,
        ModelRecord,
        Result,
        TaskRecord,
        Timing,
    )
    from tinyablate.config import cell_id, spec_to_dict

    runs = tmp_path / "runs"
    common = ["model=tiny-qwen2", "gpus=1", "sweep=s", f"output_dir={runs}"]
    done = compose_spec(["sweeps=embedded", "algo=grpo_cpu", "adapter.u=1", *common])  # what -m composes
    cid = cell_id(done)
    CellFolder.of(done, cid).write_result(
        Result(
            cell_id=cid,
            status="completed",
            sweep="s",
            config=spec_to_dict(done),
            model=ModelRecord(name="tiny-qwen2", family="qwen2", size="0.16M", n_params=156_224, model_id="random:0"),
            adapter=AdapterRecord(trainable_params=56, kind="tinylora", r=2, u=1),
            algo=AlgoRecord(name="grpo"),
            task=TaskRecord(name="arithmetic"),
            metrics=Metrics(accuracy=0.5, n_eval=8, train_steps=done.algo.max_steps),
            timing=Timing(wall_s=1800.0, n_gpus=1, world_size=1, gpu_hours=0.5),
            provenance={},
        )
    )
    common = ["-m", *common, "hydra/launcher=slurm", "dry_run=true"]
    proc = launch([*common, "adapter.u=1,2", "algo=grpo_cpu"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if " gpu_h=" in line}
    assert lines["completed"].endswith("gpu_h=0.5 (measured, mean of 1 completed cell)")
    assert lines["pending"].endswith("gpu_h=0.5 (measured, mean of 1 completed cell)")  # same kind: same cost
    assert "0.5 for the 1 not completed" in proc.stdout
    steps = launch(
        [*common, "adapter.u=2", "algo=grpo_cpu", "algo.max_steps=200"], tmp_path
    )  # another kind: the ratio calibrates
    assert "(model x " in steps.stdout and "calibrated on 1 completed cell)" in steps.stdout


def test_gpu_cells_in_a_local_dry_run_without_gpus_are_refused_once_per_problem(tmp_path):
    proc = launch(["-m", "sweeps=paper_gsm8k", "dry_run=true", f"output_dir={tmp_path}/runs"], tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert proc.stdout.count("INVALID ") == 3 and "and 4317 more cells with this problem" in proc.stdout
    assert "gpus=1 is invalid here" in proc.stdout and "4320 of 4320 cells are invalid" in proc.stdout


def test_an_unknown_cost_device_names_the_known_ones(tmp_path):
    proc = launch(
        ["-m", "model=tiny-qwen2", "gpus=1", "cost_device=a100", "hydra/launcher=slurm", "dry_run=true"], tmp_path
    )
    assert proc.returncode != 0
    assert "cost_device='a100' has no throughput measurements; known: h100, h200" in proc.stderr


def test_interpolated_overrides_are_resolved_like_hydra_does(tmp_path):
    proc = launch(["-m", "sweeps=embedded", "seed=${algo.save_steps}", "dry_run=true"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert proc.stdout.count(" seed=10 ") == 6  # grpo_cpu and sft_cpu both save every 10 steps


def test_invalid_cells_are_all_listed_and_nothing_runs(tmp_path):
    # the embedded grid (6 cells) x 3 ranks, of which r=0 and r=999 (> 576 = min(d, k)) are invalid
    proc = launch(["-m", "sweeps=embedded", "adapter.r=0,2,999", "dry_run=true"], tmp_path)
    assert proc.returncode == 2
    # every problem is listed, each with its first 3 cells and the count of the others
    assert proc.stdout.count("INVALID") == 6 and proc.stdout.count("... and 3 more cells with this problem") == 2
    assert "adapter.r=0 is invalid" in proc.stdout and "adapter.r=999 is invalid" in proc.stdout
    assert "12 of 18 cells are invalid; nothing was submitted." in proc.stdout


def test_unknown_sweep_or_group_names_the_option(tmp_path):
    proc = launch(["-m", "sweeps=nope", "dry_run=true"], tmp_path)
    assert proc.returncode != 0 and "sweeps/nope" in proc.stderr
    proc = launch(["-m", "adapter=dora", "dry_run=true"], tmp_path)
    assert proc.returncode != 0 and "adapter/dora" in proc.stderr


def test_slurm_without_sbatch_says_what_to_change(tmp_path):
    proc = launch(
        ["-m", *TINY, f"output_dir={tmp_path}/runs", "hydra/launcher=slurm"],
        tmp_path,
        env={"PATH": str(tmp_path / "empty-bin")},
    )
    assert proc.returncode == 2
    assert "needs SLURM's sbatch on PATH" in proc.stdout and "hydra/launcher=local" in proc.stdout
    assert not list((tmp_path / "runs").rglob("launch.json"))


def fail_when_run(sweep_dir: Path, dry_run: subprocess.CompletedProcess) -> None:
    """Make the cell of a one-cell dry run fail once it runs: a file where its checkpoints folder goes
    (every setting is valid, so nothing before the run can refuse it)."""
    (cell_id,) = [line.split()[1] for line in dry_run.stdout.splitlines() if line.startswith("pending ")]
    (sweep_dir / cell_id).mkdir(parents=True)
    (sweep_dir / cell_id / "checkpoints").write_text("not a folder")


def _results(runs: Path) -> dict:
    out = {}
    for path in runs.rglob("result.json"):
        data = json.loads(path.read_text())
        out[data["cell_id"]] = data
    return out


@pytest.mark.slow
def test_local_sweep_runs_skips_and_retries(tmp_path):
    runs = tmp_path / "runs"
    common = ["-m", *TINY, f"output_dir={runs}", "sweep=local", "hydra.launcher.max_parallel=2"]
    proc = launch([*common, "adapter.u=1,2"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = _results(runs)
    assert len(results) == 2 and all(r["status"] == "completed" for r in results.values())
    assert "2 cells: 2 completed" in proc.stdout
    assert "2 override sets -> 2 distinct cells" in proc.stdout and "2 cells to run are CPU cells" in proc.stdout
    # two CPU cells at once share the cores: torch threads = cores / max_parallel (at least 1)
    cores = len(os.sched_getaffinity(0))
    assert f"{max(1, cores // 2)} torch CPU thread(s) per cell" in proc.stdout
    assert {r["provenance"]["devices"]["torch_threads"] for r in results.values()} == {max(1, cores // 2)}
    # the analysis ran by itself at the end of the sweep
    page = runs / "local" / "analysis" / "index.html"
    assert f"analysis page: {page}" in proc.stdout and page.exists()
    assert len((runs / "local" / "analysis" / "summary.csv").read_text().splitlines()) == 3  # header + 2 cells
    assert list((runs / "local" / "analysis").glob("*.png"))

    again = launch([*common, "adapter.u=1,2"], tmp_path)
    assert again.returncode == 0 and "0 to run, 2 completed cells skipped" in again.stdout

    # one failing cell beside a good one: the sweep goes on, ends non-zero, shows the log
    fail_when_run(runs / "local", launch([*common, "adapter.u=6", "dry_run=true"], tmp_path))
    bad = launch([*common, "adapter.u=3,6"], tmp_path)
    assert bad.returncode == 1, bad.stdout[-3000:]
    states = {
        r["config"]["adapter"]["u"]: r["status"] for r in _results(runs).values() if r["config"]["adapter"]["u"] > 2
    }
    assert states == {3: "completed", 6: "failed"}
    assert "failed" in bad.stdout and "log:" in bad.stdout and "error:" in bad.stdout

    skipped = launch([*common, "adapter.u=6"], tmp_path)
    assert "1 failed cells skipped (retry_failed=true re-runs them)" in skipped.stdout
    retried = launch([*common, "adapter.u=6", "retry_failed=true"], tmp_path)
    assert "1 to run" in retried.stdout and retried.returncode == 1

    status = launch([*common, "adapter.u=1,2,4", "status=true"], tmp_path)
    assert status.returncode == 0 and "3 cells: 2 completed, 1 pending" in status.stdout
    failed = launch([*common, "adapter.u=6", "status=true"], tmp_path)
    assert failed.returncode == 1 and "1 cells: 1 failed" in failed.stdout  # as python -m tinyablate.status says


def test_slimming_preset_lists_lora_qlora_and_tinylora_on_three_tasks(tmp_path):
    proc = launch(
        ["-m", "sweeps=slimming", "hydra/launcher=slurm", "dry_run=true", f"output_dir={tmp_path}/runs"], tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("pending ")]
    assert len(lines) == 27 and "dry run: 27 valid cells" in proc.stdout
    assert all("eval_tasks=gsm8k,mmlu_cs,hellaswag" in line and "gpu_h=" in line for line in lines)
    for task in ("gsm8k", "mmlu_cs", "hellaswag"):
        mine = [line for line in lines if f" task={task} " in line]
        assert len(mine) == 9 and sum("quantization=nf4" in line for line in mine) == 3
        params = sorted(int(line.split(" params=")[1].split()[0].replace(",", "")) for line in mine)
        assert params[:3] == [1, 13, 196]  # TinyLoRA, tie=all: u parameters
        assert params[3:] == sorted([8 * 2523136, 16 * 2523136, 64 * 2523136] * 2)  # LoRA = QLoRA: r (d+k) per module


def test_a_sweep_of_several_grids_is_their_union_and_the_command_line_wins(tmp_path):
    """sweeps/evidence.yaml: hydra.sweeper.grids, each with the shared seeds; a cell in two grids runs once."""
    base = ["-m", "sweeps=evidence", "hydra/launcher=slurm", "dry_run=true", f"output_dir={tmp_path}/runs"]
    proc = launch(base, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # 5 seeds x (6 u x 2 + LoRA-XS x 2 + LoRA x 2 + 4 ranks + 2 sharings + 2 precisions) = 120 sets; the r=2 and
    # the fp32 cell at u=16 are grid 1's u=16 GRPO cell: 110 distinct
    assert "dry run: 110 valid cells, nothing submitted (120 override sets)" in proc.stdout, proc.stdout[-1500:]
    one = launch([*base, "seed=0", "adapter.u=4"], tmp_path)
    assert "dry run: 12 valid cells, nothing submitted (14 override sets)" in one.stdout, one.stdout[-1500:]


def test_one_cell_dry_run_checks_and_prices_it_and_runs_nothing(tmp_path):
    """`python launch.py ... dry_run=true` (no -m): the cell's checks and plan line, nothing run; status=true: its
    state. Before, a single cell ignored both and ran."""
    runs = tmp_path / "runs"
    proc = launch([*TINY, f"output_dir={runs}", "gpus=0", "adapter.u=13", "dry_run=true"], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "dry run: 1 valid cell, nothing run" in proc.stdout and "params=" in proc.stdout and "u=13" in proc.stdout
    assert not list(runs.rglob("*.json")) and not list(runs.rglob("metrics.jsonl"))
    bad = launch([*TINY, f"output_dir={runs}", "gpus=0", "adapter.u=0", "dry_run=true"], tmp_path, timeout=300)
    assert bad.returncode == 2 and "adapter.u=0 is invalid" in bad.stderr, bad.stdout[-2000:] + bad.stderr[-2000:]
    state = launch([*TINY, f"output_dir={runs}", "gpus=0", "status=true"], tmp_path, timeout=300)
    assert state.returncode == 0 and "1 cells: 1 pending" in state.stdout, state.stdout[-2000:] + state.stderr[-2000:]
    assert not list(runs.rglob("*.json"))
    [cid] = [line.split()[-1] for line in state.stdout.splitlines() if line.startswith("pending")]
    failure = ErrorRecord(type="RuntimeError", message="it broke")
    CellFolder(runs / "default" / cid).write_result(Result(cell_id=cid, status="failed", error=failure))
    state = launch([*TINY, f"output_dir={runs}", "gpus=0", "status=true"], tmp_path, timeout=300)
    assert state.returncode == 1 and "1 cells: 1 failed" in state.stdout, state.stdout[-2000:]  # as a sweep's


def test_an_analysis_that_fails_says_so_in_one_line_and_the_cells_stand(tmp_path, monkeypatch, capsys):
    """After a single cell (launch.py) and after a sweep (the launcher): a full disk, or any error, in the
    analysis is its own one line; it neither fails the cells nor raises."""
    import errno
    from types import SimpleNamespace

    import analysis.report
    from hydra_plugins.tinyablate.launcher import TinyablateLauncher
    from launch import _analysis_page
    from tinyablate.config import CellSpec, LoggerConfig

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(analysis.report, "analyze", full)
    spec = CellSpec(output_dir=str(tmp_path / "runs"), sweep="s")
    page, note = _analysis_page(spec)
    assert page is None and note.startswith(f"not written (the disk holding {tmp_path / 'runs' / 's'} is full")
    cell = SimpleNamespace(folder=CellFolder(tmp_path / "runs" / "s" / "c"), spec=CellSpec(logger=LoggerConfig()))
    monkeypatch.setattr(analysis.report, "analyze", lambda *a, **k: 1 / 0)
    TinyablateLauncher()._run_analysis([cell])
    assert capsys.readouterr().out == "analysis failed, the cells' results stand: ZeroDivisionError: division by zero\n"


def test_submitting_on_a_full_disk_stops_the_sweep_with_one_line(tmp_path, monkeypatch, capsys):
    """submitit's pickles (or the launch records) cannot be written: one line naming the disk, exit 1."""
    import errno
    from types import SimpleNamespace

    import hydra_plugins.tinyablate.launcher as launcher

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "runs" / "s" / ".submitit" / "1.pkl"))

    monkeypatch.setattr(launcher, "submit_cells", full)
    cell = SimpleNamespace(folder=CellFolder(tmp_path / "runs" / "s" / "c"))
    with pytest.raises(SystemExit) as stop:
        launcher.TinyablateLauncher()._submit([cell], [cell], {}, wait=True)
    err = capsys.readouterr().err
    assert stop.value.code == 1 and err.count("\n") == 1, err
    assert f"the disk holding {tmp_path / 'runs' / 's' / '.submitit' / '1.pkl'} is full" in err


def test_rate_by_u_takes_the_step_at_or_below_u_and_refuses_what_it_has_no_rate_for():
    from hydra_plugins.tinyablate.conf import rate_by_u

    table = "grpo 1:2e-3 16:1e-3 64:5e-4; sft 1:2e-3"
    assert [rate_by_u("grpo", u, table) for u in (1, 4, 15, 16, 63, 64, 1024)] == [
        2e-3,
        2e-3,
        2e-3,
        1e-3,
        1e-3,
        5e-4,
        5e-4,
    ]
    assert rate_by_u("sft", 256, table) == 2e-3
    with pytest.raises(ValueError, match="no rate for algo 'dpo' at u=4"):
        rate_by_u("dpo", 4, table)
    with pytest.raises(ValueError, match="no rate for algo 'grpo' at u=0"):
        rate_by_u("grpo", 0, table)


def test_a_presets_rate_rule_is_resolved_for_each_cell(tmp_path):
    """sweeps/embedded.yaml's GRPO learning rate falls with u: every cell of a sweep gets the rate of its own u (the
    launcher's fast path composes a config once per group choice and sets plain values on copies, which would keep
    the first u's rate; a config that interpolates is composed per cell)."""
    from test_conf import compose_spec
    from tinyablate.config import cell_id

    proc = launch(["-m", "adapter.u=1,16,256", "algo=grpo_cpu", "gpus=0", "dry_run=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("pending ")}
    common = ["sweeps=embedded", "algo=grpo_cpu", "gpus=0", f"output_dir={tmp_path}/runs"]
    expected = {
        cell_id(compose_spec([*common, f"adapter.u={u}", f"algo.learning_rate={lr}"]))
        for u, lr in ((1, 2e-3), (16, 1e-3), (256, 5e-4))
    }
    assert ids == expected
    assert compose_spec(["sweeps=embedded", "algo=sft_cpu", "adapter.u=256"]).algo.learning_rate == 2e-3
