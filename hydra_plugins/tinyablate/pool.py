"""The pool: warm worker processes that run a job's cells, each taking the next cell from one queue.

    summaries = run_pool(spec_dicts, cell_dirs, workers=4, threads=2)   # in a job (submit.CellJob does this)

Every job whose cells share a GPU (or the CPUs) runs them here. A local job (hydra/launcher=local) is a pool of
one worker: its cell, or its bundle of `cells_per_job` one after another (several local jobs share a GPU with
`cells_per_gpu`). A SLURM job with `cells_per_job=K cells_per_gpu=N` is a pool of N workers on the job's GPU
taking its K cells. A worker stays warm (imports, compiled kernels, the base-accuracy cache) across its cells;
each cell keeps its own folder, lock, result and W&B run (tinyablate.cell.run_cells). Workers are spawned, never
forked: CUDA started in the job's process would not survive a fork, and the job's process does not load torch.
They inherit the job's environment (CUDA_VISIBLE_DEVICES: the job's GPUs) and die with the job's process.

Failures stay where they happen: a cell that fails writes its own failed result and its worker goes on. A worker
that dies (killed, out of memory) fails the cell it was running (its summary names the signal or exit code, its
folder is left to a later attempt); in a SLURM job a new worker takes its place, a local job stops there (its
cells not run are left pending, and the launcher names the job and the signal). Ctrl-C reaches the workers
(the job's process ignores it while they run): each stops its cell, which reads interrupted, and the job ends
with exit 130. Workers ignore SLURM's pre-emption and time-out signals: the job's main process handles them
(submitit checkpoints and requeues the job after stop_workers()), and the requeued bundle skips its completed
cells and resumes the others.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

# Signals submitit's job process handles (requeue on time-out/pre-emption); workers leave them to it.
_LEFT_TO_THE_JOB = (signal.SIGTERM, signal.SIGCONT, signal.SIGUSR1, signal.SIGUSR2)
# The worker processes this (job) process runs now: stop_workers() ends them before a requeue.
_LIVE: list = []
INTERRUPTED = 130  # a worker's exit code after Ctrl-C (the job's too)
# What a job or a worker says when Ctrl-C stops its cells.
INTERRUPTED_LINE = "interrupted (SIGINT): this job's cells stop; each resumes from its last checkpoint"


def run_pool(
    specs: list,
    cell_dirs: list,
    workers: int,
    threads: Optional[int] = None,
    started: Optional[float] = None,
    replace_dead: bool = True,
    worker: Optional[Callable] = None,
) -> list:
    """Cells (spec dicts, folders) run by `workers` worker processes; one summary per cell, in order
    (tinyablate.cell.cell_summary's fields). `threads`: torch CPU threads per worker (None: torch's own).
    `started`: when the first workers' first cells count their start to first step from (None: each worker's
    own start). `replace_dead`: a dead worker is replaced; else the pool stops and the cells it did not run are
    reported unfinished. `worker`: the worker's function (tests replace it; it must be importable by name).
    Ctrl-C of the workers ends the job: SystemExit(130)."""
    pool = _Pool(specs, cell_dirs, worker or cell_worker, threads)
    with _sigint_left_to_workers():
        try:
            pool.open(max(1, min(workers, len(specs))), started)
            while not pool.done():
                pool.read()
                for process, cell in pool.dead():
                    pool.bury(process, cell, replace_dead)
                if not pool.done() and not pool.alive():  # every worker took its stop sign, or died unheard
                    pool.read()
                    pool.give_up("its worker process died (no word from it)")
                time.sleep(0.2)
        finally:
            pool.stop()
    if pool.interrupted:
        raise SystemExit(INTERRUPTED)  # each cell being run reads interrupted
    return [pool.summaries[i] for i in range(len(specs))]


class _Pool:
    """A job's queue of cells, its workers, and the summaries they sent (run_pool's state)."""

    def __init__(self, specs: list, cell_dirs: list, target: Callable, threads: Optional[int]) -> None:
        self.specs, self.target, self.threads = specs, target, threads
        self.ctx = multiprocessing.get_context("spawn")
        # results: a SimpleQueue writes through at once, so what a worker put before it died is there to read
        self.tasks, self.results = self.ctx.Queue(), self.ctx.SimpleQueue()
        for i, (spec, cell_dir) in enumerate(zip(specs, cell_dirs)):
            self.tasks.put((i, spec, str(cell_dir)))
        self.running: dict = {}  # pid -> [process, the index of the cell it runs]
        self.summaries: dict = {}
        self.interrupted = False
        self.stopped = False  # by a dead worker not replaced: the other workers' cells are not waited for

    def open(self, workers: int, started: Optional[float]) -> None:
        """`workers` workers, and a stop sign for each at the end of the queue."""
        for _ in range(workers):
            self.tasks.put(None)  # a dead worker leaves its own to the worker that replaces it
        for _ in range(workers):
            self.start(started)

    def start(self, started: Optional[float] = None) -> None:
        """One more worker."""
        args = (self.tasks, self.results, self.threads, started, os.getpid())
        process = self.ctx.Process(target=self.target, args=args, name="tinyablate-cell-worker")
        process.start()
        self.running[process.pid] = [process, None]
        _LIVE.append(process)

    def read(self) -> None:
        """What the workers sent: which cell each started, and the summaries of those they finished."""
        while not self.results.empty():
            kind, i, payload = self.results.get()
            if kind == "started":
                self.running[payload][1] = i
            else:
                self.summaries[i] = payload

    def dead(self) -> list:
        """The workers that died (not those that took their stop sign), each with the cell it ran, if any."""
        gone = [pid for pid, (p, _) in self.running.items() if not p.is_alive() and p.exitcode != 0]
        if gone:
            self.read()  # what they sent before dying
        return [self.running.pop(pid) for pid in gone]

    def bury(self, process, cell: Optional[int], replace: bool) -> None:
        """A dead worker: its cell failed (unless it reported it), then a new worker in its place or the pool
        stopped; Ctrl-C (exit 130) stops the pool."""
        _LIVE.remove(process)
        if process.exitcode == INTERRUPTED:
            self.interrupted = True
            return
        why = exit_description(process.exitcode)
        if cell is not None and cell not in self.summaries:
            self.summaries[cell] = _unfinished(self.specs[cell], f"its worker process died ({why}) before it finished")
        if replace:
            self.start()
        else:
            self.stopped = True
            self.give_up(f"its job stopped when a worker process died ({why})")

    def give_up(self, why: str) -> None:
        """Every cell without a summary: unfinished, for `why`."""
        for i in set(range(len(self.specs))) - set(self.summaries):
            self.summaries[i] = _unfinished(self.specs[i], why)

    def done(self) -> bool:
        return self.interrupted or len(self.summaries) == len(self.specs)

    def alive(self) -> bool:
        return any(p.is_alive() for p, _ in self.running.values())

    def stop(self) -> None:
        """Workers that finished (or were interrupted) are given time to end; any other is killed."""
        patient = self.interrupted or (len(self.summaries) == len(self.specs) and not self.stopped)
        for process, _ in self.running.values():
            process.join(timeout=30 if patient else 0)
            if process.is_alive():
                process.kill()  # not terminate(): workers ignore SIGTERM (_LEFT_TO_THE_JOB)
            with contextlib.suppress(ValueError):
                _LIVE.remove(process)
        self.tasks.cancel_join_thread()  # cells never taken: this process may end without them


@contextlib.contextmanager
def _sigint_left_to_workers():
    """Ctrl-C is the workers' while they run (each stops its cell); this process ignores it (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def exit_description(code: Optional[int]) -> str:
    """A process's exit code in words: "killed by SIGKILL" for -9, else "exit code N"."""
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def stop_workers() -> None:
    """Kill this process's workers at once (CellJob.checkpoint, before submitit requeues the job): their cells
    resume from their last checkpoints in the requeued job instead of running on into SLURM's kill."""
    for process in list(_LIVE):
        if process.is_alive():
            process.kill()


def _unfinished(spec: dict, why: str) -> dict:
    """The summary of a cell its worker did not finish (its folder is left to a later attempt)."""
    from tinyablate.cell import unfinished_summary
    from tinyablate.config import cell_id, spec_from_dict

    why = f"{why}; it resumes from its folder next time"
    return unfinished_summary(cell_id(spec_from_dict(spec)), "failed", why)


def cell_worker(tasks, results, threads: Optional[int], started: Optional[float], parent: int) -> None:
    """A worker: cells from `tasks` one after another through run_cells until a stop sign; Ctrl-C: exit 130."""
    try:
        _worker_of(parent, threads)
        from tinyablate.cell import run_cells
        from tinyablate.config import spec_from_dict

        warm = False
        while (task := tasks.get()) is not None:
            i, spec, cell_dir = task
            results.put(("started", i, os.getpid()))
            (summary,) = run_cells([spec_from_dict(spec)], [Path(cell_dir)], warm=warm, started=started)
            results.put(("done", i, summary))
            warm = True
    except KeyboardInterrupt:
        print(INTERRUPTED_LINE, flush=True)
        sys.exit(INTERRUPTED)


def _worker_of(parent: int, threads: Optional[int]) -> None:
    """A worker's process set up: SLURM/submitit's signals left to the job, Ctrl-C its own, death with the job's
    process (Linux: PR_SET_PDEATHSIG, so that a job killed whole leaves nothing running), `threads` torch threads."""
    for sig in _LEFT_TO_THE_JOB:
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (spawned while the job ignored it)
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the job's process died before that took hold
        os._exit(1)
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
