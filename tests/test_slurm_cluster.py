"""Integration tests against a real SLURM cluster, driven through submitit.

Start one with `bash scripts/slurm_local.sh`; without a cluster every test here is skipped
(reason shown by -ra), unless TINYABLATE_REQUIRE_SLURM=1, in which case they fail.
Runtime on the local 2-CPU cluster: ~1.5 min (each requeue test ~25 s: the requeued job has to
wait AuthInfo cred_expire=20 s before it may start again).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

try:
    from slurm_cluster import (
        make_executor,
        pickle_by_value,
        preempt,
        require_cluster,
        requires_slurm,
        sacct_states,
        wait_done,
        wait_sacct,
    )
except ImportError:  # tests/ imported as a package
    from tests.slurm_cluster import (  # type: ignore[no-redef]
        make_executor,
        pickle_by_value,
        preempt,
        require_cluster,
        requires_slurm,
        sacct_states,
        wait_done,
        wait_sacct,
    )

import submitit

pytestmark = [pytest.mark.slurm, requires_slurm]

# The job's interpreter cannot import this test module: ship its functions/classes by value.
pickle_by_value(__name__)


@pytest.fixture(autouse=True)
def _cluster():
    require_cluster()


# ----------------------------------------------------------------------------- job payloads
def double(x: int) -> dict:
    return {"value": 2 * x, "job_id": os.environ.get("SLURM_JOB_ID"), "pid": os.getpid()}


def boom() -> None:
    raise ValueError("boom from inside the slurm job")


class RequeueOnce(submitit.helpers.Checkpointable):
    """First attempt: get preempted (how depends on `how`); second attempt: finish.

    `self.attempts` survives the requeue because submitit's SIGUSR2 handler calls
    `checkpoint()` (which pickles `self`) before running `scontrol requeue`.
    """

    def __init__(self, started_marker: str) -> None:
        self.started_marker = started_marker
        self.attempts = 0

    def __call__(self, how: str) -> dict:
        self.attempts += 1
        info = {
            "attempts": self.attempts,
            "restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
            "job_id": os.environ.get("SLURM_JOB_ID"),
        }
        if self.attempts == 1:
            Path(self.started_marker).write_text(str(os.getpid()))
            if how == "self":
                # what a training loop could do itself; same handler slurm's --signal triggers
                os.kill(os.getpid(), signal.SIGUSR2)
            # "external" / "timeout": wait for slurm (or the test) to send SIGUSR2
            time.sleep(300)
            raise RuntimeError("first attempt was never interrupted")
        return info


# ----------------------------------------------------------------------------- tests
def test_cluster_answers():
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0 and set(out.stdout.split()) & {"idle", "mixed", "allocated"}, out


def test_submit_returns_value(tmp_path):
    ex = make_executor(tmp_path)
    job = ex.submit(double, 21)
    wait_done(job, 60)
    out = job.result()
    assert out["value"] == 42
    assert out["job_id"] == job.job_id
    assert out["pid"] != os.getpid()
    assert wait_sacct(job.job_id, 30) == {job.job_id: "COMPLETED"}
    job.get_info(mode="force")  # submitit caches sacct output; force a refresh
    assert job.state == "COMPLETED"


def test_failing_job_is_failed(tmp_path):
    ex = make_executor(tmp_path)
    job = ex.submit(boom)
    wait_done(job, 60)
    with pytest.raises(submitit.core.utils.FailedJobError, match="boom from inside"):
        job.result()
    assert wait_sacct(job.job_id, 30) == {job.job_id: "FAILED"}
    job.get_info(mode="force")
    assert job.state == "FAILED"  # needs slurmdbd accounting; would be UNKNOWN without sacct


def test_job_array(tmp_path):
    ex = make_executor(tmp_path)
    jobs = ex.map_array(double, [1, 2, 3])
    assert len(jobs) == 3
    array_id = jobs[0].job_id.split("_")[0]
    assert [j.job_id for j in jobs] == [f"{array_id}_{i}" for i in range(3)]
    for j in jobs:
        wait_done(j, 60)
    assert [j.result()["value"] for j in jobs] == [2, 4, 6]
    states = wait_sacct(array_id, 30, expect={"COMPLETED"}, ids=[j.job_id for j in jobs])
    assert set(states) == {j.job_id for j in jobs}
    jobs[0].get_info(mode="force")
    assert [j.state for j in jobs] == ["COMPLETED"] * 3


def _check_requeued(job, out: dict) -> None:
    assert out["attempts"] == 2, out
    assert out["restart_count"] == "1", out
    assert out["job_id"] == job.job_id  # requeue keeps the job id
    wait_sacct(job.job_id, 30, expect={"COMPLETED"})
    assert sacct_states(job.job_id, duplicates=True)[job.job_id] == "REQUEUED,COMPLETED"
    log = (job.stdout() or "") + (job.stderr() or "")  # logs are appended across attempts
    assert "Caught signal SIGUSR2" in log and "Requeued job" in log, log[-2000:]


def test_requeue_checkpointable_self_signal(tmp_path):
    """The job signals itself -> submitit checkpoints + `scontrol requeue` -> second run finishes."""
    ex = make_executor(tmp_path)
    job = ex.submit(RequeueOnce(str(tmp_path / "started")), "self")
    wait_done(job, 60)
    _check_requeued(job, job.result())


def test_requeue_checkpointable_preempted(tmp_path):
    """Preemption from outside, as slurm does it: SIGTERM then SIGUSR2 to the job step
    (slurm_cluster.preempt: `scancel --signal ...`)."""
    ex = make_executor(tmp_path)
    marker = tmp_path / "started"
    job = ex.submit(RequeueOnce(str(marker)), "external")
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline, f"job never started: {sacct_states(job.job_id)}"
        time.sleep(0.2)
    preempt(job.job_id)  # SIGTERM (ignored by submitit), then SIGUSR2
    wait_done(job, 60)
    _check_requeued(job, job.result())


def test_requeue_checkpointable_near_timeout(tmp_path):
    """The real sweep path: slurm sends SIGUSR2 `slurm_signal_delay_s` before the time limit
    (`#SBATCH --signal=USR2@<delay>`); submitit checkpoints and requeues."""
    ex = make_executor(tmp_path, timeout_min=1, slurm_signal_delay_s=45)
    job = ex.submit(RequeueOnce(str(tmp_path / "started")), "timeout")
    wait_done(job, 90)
    _check_requeued(job, job.result())
