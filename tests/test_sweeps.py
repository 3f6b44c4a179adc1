"""Sweeps through launch.py: presets, dry runs, bad input, local dispatch, skip and retry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml"))

# A tiny, fast cell: random 2-layer model, 1-digit addition, 2 GRPO steps.
TINY = [
    "model=tiny-qwen2", "task.max_value=9", "task.train_size=40", "task.eval_size=8", "algo=grpo_cpu",
    "algo.max_steps=2", "algo.prompts_per_step=2", "algo.num_generations=4", "algo.micro_batch_size=8",
    "algo.max_completion_length=8", "algo.save_steps=1", "eval.max_new_tokens=8", "logger=disabled",
]


def launch(args, tmp_path, env=None, timeout=600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "disabled", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
                "TINYABLATE_CACHE": str(tmp_path / "cache"), **(env or {})}
    return subprocess.run([sys.executable, str(REPO / "launch.py"), *args], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_sweep_preset_composes_and_validates(sweep, tmp_path):
    proc = launch(["-m", f"sweeps={sweep}", "dry_run=true", f"output_dir={tmp_path}/runs"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("pending ")]
    assert lines and f"dry run: {len(lines)} valid cells, nothing submitted" in proc.stdout
    assert all("params=" in line and "bytes=" in line for line in lines)
    assert not list((tmp_path / "runs").rglob("spec.json"))  # a dry run creates no cell


def test_default_multirun_is_the_embedded_sweep(tmp_path):
    proc = launch(["-m", "dry_run=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run: 6 valid cells" in proc.stdout and "-u256-tall-" in proc.stdout


def test_interpolated_overrides_are_resolved_like_hydra_does(tmp_path):
    proc = launch(["-m", "sweeps=embedded", "seed=${algo.save_steps}", "dry_run=true"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert proc.stdout.count(" seed=10 ") == 6  # grpo_cpu and sft_cpu both save every 10 steps


def test_invalid_cells_are_all_listed_and_nothing_runs(tmp_path):
    # the embedded grid (6 cells) x 3 ranks, of which r=0 and r=999 (> 576 = min(d, k)) are invalid
    proc = launch(["-m", "sweeps=embedded", "adapter.r=0,2,999", "dry_run=true"], tmp_path)
    assert proc.returncode == 2
    assert proc.stdout.count("INVALID") == 12
    assert "adapter.r=0 is invalid" in proc.stdout and "adapter.r=999 is invalid" in proc.stdout
    assert "12 of 18 cells are invalid; nothing was submitted." in proc.stdout


def test_unknown_sweep_or_group_names_the_option(tmp_path):
    proc = launch(["-m", "sweeps=nope", "dry_run=true"], tmp_path)
    assert proc.returncode != 0 and "sweeps/nope" in proc.stderr
    proc = launch(["-m", "adapter=dora", "dry_run=true"], tmp_path)
    assert proc.returncode != 0 and "adapter/dora" in proc.stderr


def test_slurm_without_sbatch_says_what_to_change(tmp_path):
    proc = launch(["-m", *TINY, f"output_dir={tmp_path}/runs", "hydra/launcher=slurm"], tmp_path,
                  env={"PATH": str(tmp_path / "empty-bin")})
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
    states = {r["config"]["adapter"]["u"]: r["status"] for r in _results(runs).values() if r["config"]["adapter"]["u"] > 2}
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
