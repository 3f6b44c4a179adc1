"""Sweeps on a real SLURM cluster (scripts/slurm_local.sh starts a one-node one; CI runs these).

A 3-cell sweep completes as a job array; a failing cell ends FAILED in sacct while the others
complete; re-running skips completed cells; a cell preempted mid-training is requeued and resumes
from its checkpoint with the same number of steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import preempt, require_cluster, requires_slurm, sacct_states, wait_sacct
from test_sweeps import TINY, fail_when_run, launch

pytestmark = [pytest.mark.slurm, requires_slurm]

SLURM = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=3",
    "hydra.launcher.timeout_min=10",
    "hydra.launcher.signal_delay_s=60",
    "hydra.launcher.poll_s=1",
]


def launch_records(runs: Path) -> dict:
    """{cell_id: launch.json} for every submitted cell."""
    return {p.parent.name: json.loads(p.read_text()) for p in runs.rglob("launch.json")}


def results(runs: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in runs.rglob("result.json")}


@pytest.fixture(scope="module")
def array_sweep(tmp_path_factory):
    require_cluster()
    tmp = tmp_path_factory.mktemp("slurm")
    runs = tmp / "runs"
    args = ["-m", *TINY, *SLURM, f"output_dir={runs}", "sweep=slurm", "adapter.u=1,2,3"]
    proc = launch(args, tmp, timeout=600)
    return tmp, runs, args, proc


def test_three_cells_complete_as_one_job_array(array_sweep):
    tmp, runs, _, proc = array_sweep
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = launch_records(runs)
    assert len(records) == 3
    array_ids = {r["job_id"].split("_")[0] for r in records.values()}
    assert len(array_ids) == 1, records  # one array, three tasks
    (array_id,) = array_ids
    states = wait_sacct(array_id, ids=[r["job_id"] for r in records.values()], expect={"COMPLETED"})
    assert len(states) == 3
    assert all(r["status"] == "completed" for r in results(runs).values()) and len(results(runs)) == 3
    assert "3 cells: 3 completed" in proc.stdout


def test_rerun_skips_completed_cells(array_sweep):
    tmp, runs, args, _ = array_sweep
    again = launch(args, tmp, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "0 to run, 3 completed cells skipped" in again.stdout


def test_failing_cell_is_failed_in_slurm_while_others_complete(tmp_path):
    require_cluster()
    runs = tmp_path / "runs"
    args = ["-m", *TINY, *SLURM, f"output_dir={runs}", "sweep=slurmfail"]
    fail_when_run(runs / "slurmfail", launch([*args, "adapter.u=6", "dry_run=true"], tmp_path))
    proc = launch([*args, "adapter.u=5,6"], tmp_path, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    by_u = {r["config"]["adapter"]["u"]: (cid, r) for cid, r in results(runs).items()}
    assert by_u[5][1]["status"] == "completed" and by_u[6][1]["status"] == "failed"
    records = launch_records(runs)
    good, bad = records[by_u[5][0]]["job_id"], records[by_u[6][0]]["job_id"]
    states = wait_sacct(good.split("_")[0], ids=[good, bad])
    assert states[good] == "COMPLETED" and states[bad] == "FAILED"
    assert "log:" in proc.stdout


def test_preempted_cell_is_requeued_and_resumes(tmp_path):
    require_cluster()
    runs = tmp_path / "runs"
    proc = launch(
        [
            "-m",
            *TINY,
            *SLURM,
            f"output_dir={runs}",
            "sweep=requeue",
            "adapter.u=7",
            "algo.max_steps=40",
            "algo.save_steps=4",
            "algo.max_completion_length=48",
            "wait=false",
        ],
        tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0 and "submitted 1 cells" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    ((cell_id, record),) = launch_records(runs).items()
    cell_dir = runs / "requeue" / cell_id
    # the same command again while the job is queued or running: no second copy is submitted
    again = launch(
        [
            "-m",
            *TINY,
            *SLURM,
            f"output_dir={runs}",
            "sweep=requeue",
            "adapter.u=7",
            "algo.max_steps=40",
            "algo.save_steps=4",
            "algo.max_completion_length=48",
            "wait=false",
        ],
        tmp_path,
        timeout=300,
    )
    assert "0 to run" in again.stdout and "1 cells already queued or running left alone" in again.stdout, again.stdout
    assert json.loads((cell_dir / "launch.json").read_text())["job_id"] == record["job_id"]
    deadline = time.time() + 240
    while not (cell_dir / "checkpoints" / "checkpoint-8" / "trainer_state.json").exists():
        assert time.time() < deadline, sacct_states(record["job_id"])
        assert (cell_dir / "result.json").exists() is False, "finished before it could be preempted"
        time.sleep(0.2)
    # preemption as SLURM does it: SIGTERM, then the signal submitit checkpoints and requeues on
    preempt(record["job_id"])
    deadline = time.time() + 300
    while not (cell_dir / "result.json").exists():
        assert time.time() < deadline, sacct_states(record["job_id"], duplicates=True)
        time.sleep(1)
    result = json.loads((cell_dir / "result.json").read_text())
    assert result["status"] == "completed"
    assert result["metrics"]["train_steps"] == 40
    assert result["metrics"]["resumed_from_step"] is not None and result["metrics"]["resumed_from_step"] >= 8
    history = wait_sacct_history(record["job_id"])
    assert "REQUEUED" in history and history.endswith("COMPLETED"), history


def wait_sacct_history(job_id: str, timeout_s: float = 60) -> str:
    deadline = time.time() + timeout_s
    while True:
        history = sacct_states(job_id, duplicates=True).get(job_id, "")
        if history.endswith("COMPLETED") or time.time() > deadline:
            return history
        time.sleep(1)


def _submit_one(tmp_path: Path, sweep: str, extra: list, env: dict = None) -> tuple:
    runs = tmp_path / "runs"
    proc = launch(
        [
            "-m",
            *TINY,
            *SLURM,
            f"output_dir={runs}",
            f"sweep={sweep}",
            "adapter.u=9",
            "algo.max_steps=400",
            "wait=false",
            *extra,
        ],
        tmp_path,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0 and "submitted 1 cells" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    ((cell_id, record),) = launch_records(runs / sweep).items()
    return runs / sweep / cell_id, record["job_id"], proc


def _wait_running(cell_dir: Path, job_id: str) -> int:
    """The pid of the job's cell process once it holds the cell (training has begun)."""
    from tinyablate.cell_folder import CellFolder

    deadline = time.time() + 240
    while not list(cell_dir.glob("checkpoints/checkpoint-*/trainer_state.json")):
        assert time.time() < deadline, sacct_states(job_id)
        time.sleep(0.3)
    assert CellFolder(cell_dir).state() == "running"
    return CellFolder(cell_dir).read_running()["pid"]


def test_scancel_then_status_says_interrupted(tmp_path):
    """A cancelled job's cell is not shown running forever: status asks whether its holder lives."""
    from tinyablate.cell_folder import CellFolder

    require_cluster()
    cell_dir, job_id, _ = _submit_one(tmp_path, "cancel", [])
    _wait_running(cell_dir, job_id)
    subprocess.run(["scancel", job_id], check=True)
    wait_sacct(job_id.split("_")[0], ids=[job_id], expect={"CANCELLED"}, timeout_s=120)
    deadline = time.time() + 60  # the kernel drops the lock as the job's processes end
    while CellFolder(cell_dir).holder() is not None and time.time() < deadline:
        time.sleep(0.5)
    status = subprocess.run(
        [sys.executable, "-m", "tinyablate.status", str(cell_dir.parent)], capture_output=True, text=True
    )
    assert "1 cells: 1 interrupted" in status.stdout, status.stdout + status.stderr


def test_api_key_file_keeps_the_key_out_of_the_job_environment(tmp_path):
    """With logger.api_key_file the launcher leaves WANDB_API_KEY out of what sbatch stores with the
    job (StateSaveLocation) and out of the job's processes; without it, SLURM keeps the key."""
    require_cluster()
    secret = "wandb-key-" + os.urandom(16).hex()
    key_file = tmp_path / "wandb_key"
    key_file.write_text(secret + "\n")
    key_file.chmod(0o600)
    state_dir = Path("/var/lib/slurm/slurmctld")

    def key_kept(cell_dir, job_id) -> tuple:
        pid = _wait_running(cell_dir, job_id)
        in_state = subprocess.run(["grep", "-rl", secret, str(state_dir)], capture_output=True, text=True).stdout
        in_job = secret.encode() in Path(f"/proc/{pid}/environ").read_bytes()
        subprocess.run(["scancel", job_id], check=True)
        return bool(in_state.strip()), in_job

    safe = _submit_one(tmp_path, "keyfile", [f"logger.api_key_file={key_file}"], env={"WANDB_API_KEY": secret})
    assert key_kept(*safe[:2]) == (False, False)
    exported = _submit_one(tmp_path, "keyenv", [], env={"WANDB_API_KEY": secret})
    assert key_kept(*exported[:2]) == (True, True)  # the README's plain export: SLURM keeps it (the test can fail)


def test_a_requeued_bundle_keeps_its_completed_cell_and_resumes_the_next(tmp_path):
    """hydra.launcher.cells_per_job=2: one array task runs two cells one after another. Preempted while the second
    trains, the job is requeued: the first cell's result is kept as it was (not run again), the second resumes
    from its checkpoint."""
    require_cluster()
    runs = tmp_path / "runs"
    proc = launch(
        [
            "-m",
            *TINY,
            *SLURM,
            f"output_dir={runs}",
            "sweep=bundle",
            "adapter.u=21,22",
            "algo.max_steps=40",
            "algo.save_steps=4",
            "algo.max_completion_length=48",
            "hydra.launcher.cells_per_job=2",
            "wait=false",
        ],
        tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0 and "submitted 2 cells in 1 job(s)" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    records = launch_records(runs)
    (job_id,) = {r["job_id"] for r in records.values()}
    by_u = {
        json.loads((runs / "bundle" / cid / "spec.json").read_text())["config"]["adapter"]["u"]: runs / "bundle" / cid
        for cid in records
    }
    first, second = by_u[21], by_u[22]
    deadline = time.time() + 300
    while not (second / "checkpoints" / "checkpoint-8" / "trainer_state.json").exists():
        assert time.time() < deadline, sacct_states(job_id)
        time.sleep(0.2)
    assert not (second / "result.json").exists(), "finished before it could be preempted"
    kept = (first / "result.json").read_text()
    assert json.loads(kept)["status"] == "completed"
    preempt(job_id)
    deadline = time.time() + 300
    while not (second / "result.json").exists():
        assert time.time() < deadline, sacct_states(job_id, duplicates=True)
        time.sleep(1)
    result = json.loads((second / "result.json").read_text())
    assert result["status"] == "completed" and result["metrics"]["train_steps"] == 40
    assert result["metrics"]["resumed_from_step"] is not None and result["metrics"]["resumed_from_step"] >= 8
    assert (first / "result.json").read_text() == kept  # the completed cell was not run again
    history = wait_sacct_history(job_id)
    assert "REQUEUED" in history and history.endswith("COMPLETED"), history


def test_a_bundles_cells_run_at_once_in_one_job_and_a_requeue_resumes_them(tmp_path):
    """hydra.launcher.cells_per_job=3 cells_per_gpu=2: one array task runs three cells, two at a time in two worker
    processes. Preempted while two cells train at once, the job is requeued: every cell completes, an
    interrupted one resumes from its checkpoint."""
    require_cluster()
    runs = tmp_path / "runs"
    slurm = [a for a in SLURM if not a.startswith(("hydra.launcher.cpus_per_task", "hydra.launcher.mem_gb"))]
    proc = launch(
        [
            "-m",
            *TINY,
            *slurm,
            f"output_dir={runs}",
            "sweep=atonce",
            "adapter.u=21,22,23",
            "algo.max_steps=40",
            "algo.save_steps=4",
            "algo.max_completion_length=48",
            "hydra.launcher.cells_per_job=3",
            "hydra.launcher.cells_per_gpu=2",
            "hydra.launcher.cpus_per_task=2",
            "hydra.launcher.mem_gb=6",
            "wait=false",
        ],
        tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0 and "2 at once" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    records = launch_records(runs)
    (job_id,) = {r["job_id"] for r in records.values()}
    folders = [runs / "atonce" / cid for cid in records]
    deadline = time.time() + 300
    while (
        len(
            training := [
                f for f in folders if (f / "checkpoints" / "checkpoint-4").exists() and not (f / "result.json").exists()
            ]
        )
        < 2
    ):
        assert time.time() < deadline, sacct_states(job_id)
        time.sleep(0.2)
    pids = {json.loads((f / "running.json").read_text())["pid"] for f in training}
    assert len(pids) == 2, pids  # two processes, each training a cell, at the same time
    preempt(job_id)
    deadline = time.time() + 400
    while not all((f / "result.json").exists() for f in folders):
        assert time.time() < deadline, sacct_states(job_id, duplicates=True)
        time.sleep(1)
    done = [json.loads((f / "result.json").read_text()) for f in folders]
    assert all(r["status"] == "completed" and r["metrics"]["train_steps"] == 40 for r in done), done
    resumed = [r["metrics"]["resumed_from_step"] for r in done if r["metrics"]["resumed_from_step"] is not None]
    assert resumed and min(resumed) >= 4, resumed
    history = wait_sacct_history(job_id)
    assert "REQUEUED" in history and history.endswith("COMPLETED"), history
