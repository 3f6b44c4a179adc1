"""Helpers for tests that need a real SLURM cluster (see ``scripts/slurm_local.sh``).

Usage in a test module::

    from slurm_cluster import requires_slurm, make_executor, wait_done, wait_sacct

    pytestmark = [pytest.mark.slurm, requires_slurm]

Tests are skipped (with the reason printed by ``-ra``) when no cluster answers. Set
``TINYABLATE_REQUIRE_SLURM=1`` (CI, after running ``scripts/slurm_local.sh``) to turn that skip
into a failure, so a broken cluster cannot hide behind skipped tests.

Notes for submitting from tests:
- the job runs ``sys.executable -m submitit.core._submit`` with the submitter's environment and
  working directory, so whatever the job unpickles must be importable there. Functions defined in a
  test module are not (pytest puts ``tests/`` on ``sys.path`` only in the test process): call
  ``pickle_by_value(__name__)`` in such a module, or submit functions from the installed package.
- the submitit folder must be visible from the compute node; on this one-node cluster any local
  path (e.g. pytest's ``tmp_path``) works.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
from typing import Iterable

import pytest

PARTITION = os.environ.get("TINYABLATE_SLURM_PARTITION", "debug")
REQUIRE_ENV = "TINYABLATE_REQUIRE_SLURM"
USABLE_NODE_STATES = {"idle", "mixed"}
# sacct states after which a job will not run again by itself
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "REVOKED",
}


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


@functools.lru_cache(maxsize=None)
def cluster_available(timeout_s: float = 5.0) -> tuple[bool, str]:
    """(True, description) if a SLURM cluster answers with a usable node and working sacct,
    else (False, why not). Cached: the answer is computed once per process."""
    for tool in ("sinfo", "sbatch", "srun", "sacct", "scontrol"):
        if shutil.which(tool) is None:
            return False, f"'{tool}' not on PATH (start a local cluster with scripts/slurm_local.sh)"
    try:
        r = _run(["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N|%T"], timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"sinfo did not answer within {timeout_s:.0f}s (slurmctld down?)"
    if r.returncode != 0:
        return False, f"sinfo failed: {(r.stderr or r.stdout).strip()[:200]}"
    nodes = [line.split("|", 1) for line in r.stdout.splitlines() if "|" in line]
    if not nodes:
        return False, f"partition '{PARTITION}' has no nodes"
    usable = [n for n, st in nodes if st.strip() in USABLE_NODE_STATES]
    if not usable:
        states = ", ".join(f"{n}={st}" for n, st in nodes)
        return False, f"no idle/mixed node in partition '{PARTITION}' ({states})"
    try:
        r = _run(["sacct", "-n", "-X", "-S", "now-1minutes", "-o", "JobID"], timeout_s)
    except subprocess.TimeoutExpired:
        return False, f"sacct did not answer within {timeout_s:.0f}s (slurmdbd down?)"
    if r.returncode != 0:
        return False, f"sacct failed (no slurmdbd accounting?): {(r.stderr or r.stdout).strip()[:200]}"
    return True, f"partition '{PARTITION}', usable node(s): {', '.join(usable)}"


def _skip_condition() -> tuple[bool, str]:
    ok, reason = cluster_available()
    if ok:
        return False, reason
    if os.environ.get(REQUIRE_ENV) == "1":
        # Do not skip: the test runs and fails in `require_cluster()` with this reason.
        return False, reason
    return True, f"no SLURM cluster: {reason}"


_skip, _reason = _skip_condition()
#: skipif marker; the reason is printed in pytest's short summary (-ra).
requires_slurm = pytest.mark.skipif(_skip, reason=_reason)


def require_cluster() -> None:
    """Fail (not skip) the current test if no cluster is available."""
    ok, reason = cluster_available()
    if not ok:
        pytest.fail(f"SLURM cluster required ({REQUIRE_ENV}=1) but not available: {reason}")


def pickle_by_value(module_name: str) -> None:
    """Make cloudpickle ship functions/classes of `module_name` by value, so a job can run them
    even though the module is not importable in the job's interpreter (e.g. a test module)."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[module_name])


def make_executor(folder, timeout_min: int = 5, **params):
    """A submitit AutoExecutor on the test partition (1 CPU, `timeout_min`) plus `params`."""
    import submitit

    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(slurm_partition=PARTITION, timeout_min=timeout_min, cpus_per_task=1)
    if params:
        ex.update_parameters(**params)
    return ex


def preempt(job_id: str) -> None:
    """Preemption as SLURM does it: SIGTERM (submitit ignores it), then SIGUSR2 (submitit checkpoints and runs
    `scontrol requeue`). A pause between them: slurmstepd delivers signals asynchronously, and on a loaded
    machine a SIGTERM that arrives after the SIGUSR2 would kill the requeue command itself (submitit's own
    `SlurmJob._interrupt` sends them back to back)."""
    subprocess.run(["scancel", job_id, "--signal", "SIGTERM"], check=True, timeout=30)
    time.sleep(2)
    subprocess.run(["scancel", job_id, "--signal", "USR2"], check=True, timeout=30)


def sacct_states(job_id: str, duplicates: bool = False) -> dict[str, str]:
    """{job id (array tasks as '<id>_<i>'): State} for allocations (no steps) of `job_id`.
    With duplicates=True (sacct -D) a requeued job maps to a list joined by ','
    in submission order, e.g. 'REQUEUED,COMPLETED'."""
    cmd = ["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "JobID,State"]
    if duplicates:
        cmd.insert(1, "-D")
    r = _run(cmd, 15)
    out: dict[str, list[str]] = {}
    for line in r.stdout.splitlines():
        if "|" not in line:
            continue
        jid, state = line.split("|", 1)
        state = state.split()[0] if state.strip() else ""  # 'CANCELLED by 0' -> 'CANCELLED'
        out.setdefault(jid.strip(), []).append(state)
    return {k: ",".join(v) if duplicates else v[-1] for k, v in out.items()}


def wait_sacct(
    job_id: str,
    timeout_s: float = 60.0,
    expect: Iterable[str] | None = None,
    ids: Iterable[str] | None = None,
) -> dict[str, str]:
    """Wait until every allocation of `job_id` has a terminal sacct state; return the states.
    For an array pass `ids` (e.g. ['12_0', '12_1']): sacct briefly lists a finished array under
    its bare id before the per-task records arrive. Raises AssertionError (with diagnostics) on
    timeout or if a state is not in `expect`."""
    deadline = time.monotonic() + timeout_s
    want = set(ids) if ids is not None else {str(job_id)}
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = sacct_states(job_id)
        if want <= set(states) and all(s in TERMINAL_STATES for s in states.values()):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"job {job_id} not finished after {timeout_s:.0f}s: {states}\n{_diag(job_id)}")
    if expect is not None:
        bad = {k: v for k, v in states.items() if v not in set(expect)}
        assert not bad, f"job {job_id}: unexpected sacct states {bad} (wanted {set(expect)})\n{_diag(job_id)}"
    return states


def wait_done(job, timeout_s: float = 60.0) -> None:
    """Like job.wait() but bounded: on timeout cancel the job and fail with diagnostics."""
    deadline = time.monotonic() + timeout_s
    while not job.done():
        if time.monotonic() > deadline:
            diag = _diag(job.job_id.split("_")[0])
            _run(["scancel", job.job_id], 15)
            raise AssertionError(
                f"job {job.job_id} not done after {timeout_s:.0f}s (cancelled)\n{diag}\n"
                f"--- stderr ---\n{(job.stderr() or '')[-2000:]}"
            )
        time.sleep(0.5)


def _diag(job_id: str) -> str:
    parts = []
    for cmd in (
        ["squeue", "-j", str(job_id), "-o", "%i %T %r %S %M"],
        ["sacct", "-D", "-j", str(job_id), "-o", "JobID,State,ExitCode,Start,End,NodeList"],
        ["sinfo", "-N", "-o", "%N %T %E"],
    ):
        try:
            r = _run(cmd, 10)
            parts.append(f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}")
        except Exception as e:  # noqa: BLE001 - diagnostics only
            parts.append(f"$ {' '.join(cmd)}: {e}")
    return "\n".join(parts)
