"""A SLURM job's bundle of cells run several at once on its GPU (or CPUs), each worker a process of its own.

    summaries = run_at_once(spec_dicts, cell_dirs, at_once=4)   # inside a job (CellJob does this)

hydra/launcher=slurm with `cells_per_job=K cells_per_gpu=N`: each job of the array gets a bundle of up to K
cells and runs N of them at a time. N worker processes (spawned: CUDA does not survive a fork) take the next
cell from one queue as they free up, so a worker stays warm (imports, compiled kernels, the base-accuracy cache)
across its cells. Each cell keeps its own folder, lock, result and W&B run (tinyablate.cell.run_cells).

Failures stay where they happen: a cell that fails writes its own failed result and its worker goes on; a worker
process that dies (killed, out of memory) fails only the cell it was running (its summary says so, its folder is
left to a later attempt) and a new worker takes its place. Workers ignore SLURM's pre-emption and time-out
signals: the job's main process handles them (submitit checkpoints and requeues the job; SLURM then stops every
process of the job), and the requeued bundle skips its completed cells and resumes the others.

A local job (hydra/launcher=local) runs its cells in one forked child (`run_forked`; forked before CUDA starts)
that the job's process watches: if the child is killed (kill -9, out of memory), the summaries of the cells it
did not finish say with which signal, and the launcher names the job, its cells and the signal.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

# Signals submitit's job process handles (requeue on time-out/pre-emption); workers leave them to it.
_LEFT_TO_THE_JOB = (signal.SIGTERM, signal.SIGCONT, signal.SIGUSR1, signal.SIGUSR2)
# The worker processes this (job) process runs now: stop_workers() ends them before a requeue.
_LIVE: list = []


def run_at_once(specs: list, cell_dirs: list, at_once: int, threads: int, worker: Optional[Callable] = None) -> list:
    """Cells (spec dicts, folders) `at_once` at a time in worker processes; one summary per cell, in order
    (tinyablate.cell.cell_summary's fields). `threads`: torch CPU threads per worker.
    `worker`: the worker's function (tests replace it; it must be importable by name)."""
    at_once = max(1, min(at_once, len(specs)))
    ctx = multiprocessing.get_context("spawn")
    # results: a SimpleQueue writes through at once, so what a worker put before it died is there to read
    tasks, results = ctx.Queue(), ctx.SimpleQueue()
    for i, (spec, cell_dir) in enumerate(zip(specs, cell_dirs)):
        tasks.put((i, spec, str(cell_dir)))
    for _ in range(at_once):
        tasks.put(None)  # one stop sign per worker; a dead worker leaves its own for its replacement
    start = lambda: _start(ctx, worker or cell_worker, tasks, results, threads)  # noqa: E731
    running, summaries = {}, {}  # running: pid -> [process, the cell it runs]

    def read_all() -> None:
        while not results.empty():
            kind, i, payload = results.get()
            if kind == "started":
                running[payload][1] = i
            else:
                summaries[i] = payload

    for _ in range(at_once):
        process = start()
        running[process.pid] = [process, None]
    _LIVE[:] = [p for p, _ in running.values()]
    try:
        while len(summaries) < len(specs):
            read_all()
            dead = [pid for pid, (p, _) in running.items() if not p.is_alive() and p.exitcode != 0]
            if dead:
                read_all()  # what they wrote before dying
                for pid in dead:
                    process, current = running.pop(pid)
                    if current is not None and current not in summaries:
                        summaries[current] = _failed(specs[current], exit_description(process.exitcode))
                    process = start()
                    running[process.pid] = [process, None]
                    _LIVE.append(process)
            if not any(p.is_alive() for p, _ in running.values()):  # every worker took its stop sign
                read_all()
                for i in set(range(len(specs))) - set(summaries):  # taken by a worker that died unheard
                    summaries[i] = _failed(specs[i], "no word from it")
            time.sleep(0.2)
    finally:  # every cell reported: the workers are taking their stop signs; else (an exception) stop them now
        finished = len(summaries) == len(specs)
        for process, _ in running.values():
            process.join(timeout=30 if finished else 0)
            if process.is_alive():
                process.kill()  # not terminate(): workers ignore SIGTERM (_LEFT_TO_THE_JOB)
        _LIVE.clear()
    return [summaries[i] for i in range(len(specs))]


def exit_description(code: int) -> str:
    """A process's exit code in words: "killed by SIGKILL" for -9, else "exit code N"."""
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def run_forked(specs: list, cell_dirs: list) -> list:
    """A local job's cells (typed specs) one after another in a forked child of this process, which waits for it:
    a child killed by a signal (kill -9, out of memory) is reported with it, in the summaries of the cells it
    did not finish. Ctrl-C reaches the child (this process ignores it) and ends the job with exit 130; the child
    dies with this process. Fork, not spawn: the imports are done and no torch op has run here."""
    import json

    from tinyablate.cell import unfinished_summary
    from tinyablate.config import cell_id

    started = _process_start()  # the job's: the first cell's start to first step counts its imports
    read_end, write_end = os.pipe()
    parent, pid = os.getpid(), os.fork()
    if pid == 0:  # the child: each cell's summary on the pipe as it finishes; it never returns
        code = 1
        try:
            os.close(read_end)
            _child_of_the_job(parent)
            with os.fdopen(write_end, "w") as out:
                code = _run_each(specs, cell_dirs, started, lambda s: print(json.dumps(s), file=out, flush=True))
        except BaseException:  # noqa: BLE001 - said in the job's log; the parent reports the cells unfinished
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write_end)
    _LIVE[:] = [_Forked(pid)]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with os.fdopen(read_end) as lines:
            summaries = [json.loads(line) for line in lines if line.endswith("\n")]  # (not a line cut by a kill)
        status = os.waitpid(pid, 0)[1]
    finally:
        signal.signal(signal.SIGINT, previous)
        _LIVE.clear()
    code = os.waitstatus_to_exitcode(status)
    if code == 130:
        raise SystemExit(130)  # Ctrl-C: the cell being run reads interrupted
    why = f"its job's process died ({exit_description(code)}) before it finished; it resumes from its folder next time"
    summaries += [unfinished_summary(cell_id(spec), "failed", why) for spec in specs[len(summaries) :]]
    return summaries


def _run_each(specs: list, cell_dirs: list, started: float, report: Callable) -> int:
    """The forked child's work: the cells through run_cells, each reported as it ends; its exit code."""
    from tinyablate.cell import run_cells

    try:
        for i, (spec, cell_dir) in enumerate(zip(specs, cell_dirs)):
            report(run_cells([spec], [cell_dir], warm=i > 0, started=started)[0])
        return 0
    except KeyboardInterrupt:
        print("interrupted (SIGINT): this job's cells stop; each resumes from its last checkpoint", flush=True)
        return 130


def _child_of_the_job(parent: int) -> None:
    """In a forked child: SLURM/submitit's signals left to the job (as a worker), and death with the parent
    (Linux: PR_SET_PDEATHSIG), so that a job killed whole leaves nothing running."""
    for sig in _LEFT_TO_THE_JOB:
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before that took hold
        os._exit(1)


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()


class _Forked:
    """A forked child as stop_workers sees a worker (is_alive, kill)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def is_alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)


def stop_workers() -> None:
    """Kill this process's workers at once (CellJob.checkpoint, before submitit requeues the job): their cells
    resume from their last checkpoints in the requeued job instead of running on into SLURM's kill."""
    for process in _LIVE:
        if process.is_alive():
            process.kill()


def _start(ctx, target, tasks, results, threads):
    process = ctx.Process(target=target, args=(tasks, results, threads), name="tinyablate-cell-worker")
    process.start()
    return process


def _failed(spec: dict, why: str) -> dict:
    """The summary of a cell whose worker process died while running it (its folder is left to a later attempt)."""
    from tinyablate.cell import unfinished_summary
    from tinyablate.config import cell_id, spec_from_dict

    why = f"its worker process died ({why}); the cell resumes from its folder next time"
    return unfinished_summary(cell_id(spec_from_dict(spec)), "failed", why)


def cell_worker(tasks, results, threads: int) -> None:
    """A worker: cells from `tasks` one after another through run_cells, until a stop sign."""
    for sig in _LEFT_TO_THE_JOB:
        signal.signal(sig, signal.SIG_IGN)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    from tinyablate.cell import run_cells
    from tinyablate.config import spec_from_dict

    warm = False
    while (task := tasks.get()) is not None:
        i, spec, cell_dir = task
        results.put(("started", i, os.getpid()))
        (summary,) = run_cells([spec_from_dict(spec)], [Path(cell_dir)], warm=warm)
        results.put(("done", i, summary))
        warm = True
