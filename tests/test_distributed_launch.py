"""Launching a multi-rank cell: submitit tasks (local executor and a real SLURM cluster) and launch.py.

On CPU the ranks use gloo, so a `gpus: 0` cell is submitted with 2 tasks here; `gpus: N` requests
N tasks and N GPUs the same way (see hydra_plugins/tinyablate/submit.py).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import submitit

from hydra_plugins.tinyablate.submit import CellJob, _slurm_executor
from slurm_cluster import PARTITION, require_cluster, requires_slurm, wait_done, wait_sacct
from test_cell import result_on_disk, tiny_spec
from tinyablate.config import LoggerConfig


def _spec(tmp_path):
    spec = tiny_spec(tmp_path, algo="sft", prompts_per_step=4, micro_batch_size=2, max_steps=2, save_steps=2)
    spec.logger = LoggerConfig(mode="disabled")
    return spec


def test_local_executor_runs_a_cell_as_two_tasks(tmp_path):
    spec = _spec(tmp_path)
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=10, tasks_per_node=2)
    job = executor.submit(CellJob(), [asdict(spec)], [str(tmp_path / "cell")])
    results = [r[0] for r in job.results()]  # one per task (each a list: the job's cells)
    assert [r["world_size"] for r in results] == [2, 2], job.stderr()
    assert results[0] == results[1] and results[0]["status"] == "completed"
    assert result_on_disk(tmp_path / "cell")["timing"]["world_size"] == 2


@pytest.mark.slurm
@requires_slurm
def test_slurm_runs_a_cell_as_two_tasks_of_one_job(tmp_path):
    require_cluster()
    spec = _spec(tmp_path)
    settings = {
        "max_requeues": 1,
        "partition": PARTITION,
        "cpus_per_task": 1,
        "mem_gb": 4,
        "timeout_min": 10,
        "array_parallelism": 4,
        "signal_delay_s": 60,
    }
    executor = _slurm_executor(settings, tmp_path / "submitit", gpus=0, sweep="dist", tasks=2)
    job = executor.submit(CellJob(), [asdict(spec)], [str(tmp_path / "cell")])
    script = Path(job.paths.submission_file).read_text()
    assert "--ntasks-per-node=2" in script and "--kill-on-bad-exit=1" in script
    wait_done(job, timeout_s=300)
    wait_sacct(job.job_id, timeout_s=60, expect={"COMPLETED"})
    assert [r[0]["world_size"] for r in job.results()] == [2, 2]
    result = result_on_disk(tmp_path / "cell")
    assert result["status"] == "completed" and result["timing"]["world_size"] == 2


def test_a_multi_gpu_cell_without_the_gpus_says_so(tmp_path, monkeypatch):
    import torch

    from tinyablate.cell import run_cell
    from tinyablate.config import ConfigError

    monkeypatch.delenv("WORLD_SIZE", raising=False)

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    spec = _spec(tmp_path)
    spec.gpus = 2
    with pytest.raises(
        ConfigError, match=r"gpus=2 is invalid here: this machine shows \d CUDA GPU.*set gpus=0 for the CPU"
    ):
        run_cell(spec)  # refused by preflight, before the cell's folder or any weight
    assert not (tmp_path / "runs").exists()


def test_a_multi_gpu_cell_in_one_process_is_refused_before_loading(tmp_path, monkeypatch):
    """A rank's process group never trains a gpus=N cell on fewer GPUs than it asks for (run_cell spawns
    the N ranks; a single process that reaches the group anyway is refused)."""
    from tinyablate.distributed import process_group

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"gpus=2 runs as 2 ranks, but this is a single process.*torchrun"):
        with process_group(2):
            pass


@pytest.mark.parametrize("value", ["ten", "0"])
def test_a_bad_collective_timeout_says_what_to_set(monkeypatch, value):
    from tinyablate.distributed import collective_timeout

    monkeypatch.setenv("TINYABLATE_DIST_TIMEOUT_MIN", value)
    with pytest.raises(ValueError, match=f"TINYABLATE_DIST_TIMEOUT_MIN='{value}' is invalid: a whole number"):
        collective_timeout()
    monkeypatch.setenv("TINYABLATE_DIST_TIMEOUT_MIN", "90")
    assert collective_timeout().total_seconds() == 90 * 60
