"""Submission through submitit: a job array per GPU count on SLURM, at most `max_parallel` jobs at once locally.

A job's cells run in a pool of worker processes (pool.py; CellJob says when). A cell with `gpus: N > 1` is one
job of N tasks on one node (one rank per GPU); each task exports the torch.distributed variables from submitit's
job environment and runs the cell as its rank. Importing this module loads no torch: the launching process stays
light, and a job's process loads it only where it runs a cell itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import submitit

from tinyablate.config import spec_from_dict
from tinyablate.cost import cells_per_gpu

from .pool import INTERRUPTED_LINE, run_pool, stop_workers


class CellJob(submitit.helpers.Checkpointable):
    """What a job runs: one cell, or a bundle of cells (hydra.launcher.cells_per_job; tinyablate.cell.run_cells: a
    failed cell does not stop the next). A local job runs them in a pool of one worker (pool.run_pool: its death
    is reported with its signal); a SLURM job with `at_once` > 1 (cells_per_gpu) in a pool of that many workers
    on the job's GPU; else in the job's own process. On preemption or time-out submitit calls `checkpoint`,
    which requeues the same call; completed cells are then skipped and the cells that were interrupted resume
    from their last training checkpoint. The job's process loads torch only where it runs cells itself.
    `cpu_threads`: torch's thread pool for CPU cells that share this machine with others (None: torch's own).
    `at_once`: a number, or "auto" (as many as fit in the job's GPU by the cost model, cost.cells_per_gpu).
    `local`: a local launcher's job."""

    def __init__(self, cpu_threads: Optional[int] = None, at_once: Any = 1, local: bool = False) -> None:
        self.cpu_threads, self.at_once, self.local = cpu_threads, at_once, local

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on pre-emption or time-out, before it requeues this job: a bundle's worker
        processes are stopped at once (their cells resume from their checkpoints), then the same call again."""
        stop_workers()
        return super().checkpoint(*args, **kwargs)

    def __call__(self, specs: list, cell_dirs: list) -> list:
        # Ctrl-C stops the cells (a local launcher starts its jobs with SIGINT ignored: see _sigint_ignored); the
        # cell being run reads interrupted and resumes from its last checkpoint when run again
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.cpu_threads is not None:
            os.environ["OMP_NUM_THREADS"] = str(self.cpu_threads)  # for whatever the cell starts, too
        try:
            return self._run(specs, cell_dirs)
        except KeyboardInterrupt:
            print(INTERRUPTED_LINE, flush=True)
            raise SystemExit(130) from None

    def _run(self, specs: list, cell_dirs: list) -> list:
        if submitit.JobEnvironment().num_tasks > 1:  # one cell of several GPUs: this task is one of its ranks
            return self._run_rank(specs[0], cell_dirs[0])
        if self.local:  # a pool of one worker: its death is reported with its signal, and ends the job
            return run_pool(specs, cell_dirs, 1, self.cpu_threads, started=_process_start(), replace_dead=False)
        if len(specs) > 1:  # a bundle: cells of at most one GPU each (bundles() never bundles multi-GPU cells)
            at_once = job_cells_at_once(self.at_once, [spec_from_dict(s) for s in specs])
            if at_once > 1:  # each core shared by as few as can be
                return run_pool(specs, cell_dirs, at_once, threads=max(1, cores() // at_once))
        return self._run_here(specs, cell_dirs)

    def _run_here(self, specs: list, cell_dirs: list) -> list:
        """The cells in this process, one after another (tinyablate.cell.run_cells); one cell alone fails the job
        when it fails."""
        from tinyablate.cell import cell_summary, run_cell, run_cells  # in the job: the launcher stays light

        self._set_threads()
        typed, dirs = [spec_from_dict(s) for s in specs], [Path(d) for d in cell_dirs]
        return run_cells(typed, dirs) if len(specs) > 1 else [cell_summary(run_cell(typed[0], dirs[0]))]

    def _run_rank(self, spec: dict, cell_dir: str) -> list:
        """One rank of a cell of several GPUs: MASTER_ADDR/PORT, RANK, WORLD_SIZE, ... from submitit's job
        environment. Every task sees the node's GPUs; rank r takes cuda:LOCAL_RANK (distributed.process_group).
        A failure raises: the job fails (and its other ranks)."""
        from tinyablate.cell import cell_summary, run_cell

        self._set_threads()
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        return [cell_summary(run_cell(spec_from_dict(spec), Path(cell_dir)))]

    def _set_threads(self) -> None:
        if self.cpu_threads is not None:
            import torch

            torch.set_num_threads(self.cpu_threads)


def _process_start() -> float:
    """When this process started (a local job's first cell counts its start to first step from it)."""
    import psutil

    return psutil.Process().create_time()


def job_cells_at_once(value: Any, specs: list) -> int:
    """How many of a job's bundle run at once: `value` ("auto" or a number) within what fits in this job's GPU
    by the cost model's memory estimate (a number that does not fit is lowered, and says so) and its CPU cores;
    CPU cells take `value` as it is ("auto": 1)."""
    if all(spec.gpus == 0 for spec in specs):
        return 1 if value == "auto" else int(value)
    total = local_gpu_bytes()
    fit = cells_per_gpu(specs, total)[0] if total else 1
    n = auto_cells_at_once(fit, len(specs), cores()) if value == "auto" else int(value)
    if n > fit:
        print(
            f"cells_per_gpu={value}: only {fit} of these cells fit in this job's GPU "
            f"({total / 2**30:.0f} GiB) by the cost model; running {fit} at once",
            flush=True,
        )
        n = fit
    print(f"running {min(n, len(specs))} of this job's {len(specs)} cells at once", flush=True)
    return n


def bundles(cells: list, per_job: int) -> list:
    """The jobs to submit: consecutive cells of one GPU count in groups of up to `per_job` (one process runs a
    group one cell after another); a cell of gpus > 1 (several ranks) is always a job of its own."""
    jobs, current = [], []
    for cell in cells:
        if cell.spec.gpus > 1:
            jobs.append([cell])
            continue
        if current and (len(current) == per_job or current[0].spec.gpus != cell.spec.gpus):
            jobs.append(current)
            current = []
        current.append(cell)
    return jobs + ([current] if current else [])


def _job_args(bundle: list) -> tuple:
    return [asdict(c.spec) for c in bundle], [str(c.folder.path) for c in bundle]


def write_launch_record(cell, job, backend: str) -> None:
    """launch.json (job id, log files) and spec.json in the cell's folder, as soon as it is submitted."""
    cell.folder.write_launch(backend, job.job_id, job.paths.stdout, job.paths.stderr, sys.argv)
    cell.folder.write_spec(cell.spec)


def submit_cells(backend: str, settings: dict, cells: list, wait: bool) -> list:
    """Submit `cells` (the launcher's Cell records) and return their submitit jobs."""
    folder = cells[0].folder.path.parent / ".submitit" / "%j"
    jobs = []
    if backend == "local":
        if not wait:
            raise SystemExit("wait=false needs hydra/launcher=slurm: local cells are children of this process")
        return _run_local(settings, cells, folder)
    per_job = int(settings.get("cells_per_job", 1))
    for gpus in sorted({c.spec.gpus for c in cells}):
        group = bundles([c for c in cells if c.spec.gpus == gpus], per_job)
        executor = _slurm_executor(settings, folder, gpus, group[0][0].spec.sweep)
        with _key_kept_from_job([c for bundle in group for c in bundle]):
            specs, dirs = zip(*(_job_args(bundle) for bundle in group))
            at_once = settings.get("cells_per_gpu", 1) if per_job > 1 else 1
            group_jobs = executor.map_array(CellJob(at_once=at_once), list(specs), list(dirs))
        for bundle, job in zip(group, group_jobs):
            for cell in bundle:
                write_launch_record(cell, job, backend)
            jobs.append((job, len(bundle)))
        n_cells = sum(map(len, group))
        print(
            f"submitted {n_cells} cells ({gpus} GPU(s) each) as SLURM array {group_jobs[0].job_id.split('_')[0]}"
            + (f" of {len(group)} jobs (up to {per_job} cells each, {_order(at_once)})" if per_job > 1 else "")
        )
    if wait:
        _wait(jobs, settings.get("poll_s", 10.0))
    return [job for job, _ in jobs]


def job_end(job) -> str:
    """How a finished job that left cells unfinished ended, as far as it can be known: the exit signal of a
    process of it that died (the job's own report: a worker of its pool, pool.py), SLURM's
    state of the job, or that the job's own process died (its controller keeps no exit status)."""
    if job is None:
        return "not followed by this launch"
    deaths = []
    if job.paths.result_pickle.exists():  # (else job.result() would wait 15 s for it)
        with contextlib.suppress(Exception):  # a job that raised: no summaries
            deaths = [re.search(DIED, s.get("error") or "") for s in job.result()]
    deaths = [d.group(1) for d in deaths if d]
    if deaths:
        return f"a process running its cells died ({deaths[0]})"
    if isinstance(job, submitit.SlurmJob):
        return f"SLURM state {job.state}"
    return "its process ended without a result (killed, e.g. kill -9 or out of memory: no exit signal kept)"


DIED = r"process died \((killed by \w+|exit code -?\d+|no word from it)\)"  # pool.py's summaries of such cells


def _order(at_once: Any) -> str:
    if at_once == "auto":
        return "as many at once as fit in the job's GPU"
    return f"{at_once} at once" if int(at_once) > 1 else "one after another"


@contextlib.contextmanager
def _key_kept_from_job(cells: list):
    """sbatch stores the submitting environment with the job (--export=ALL): with logger.api_key_file
    the cells read the key themselves, so WANDB_API_KEY is left out of what sbatch sees."""
    key = os.environ.get("WANDB_API_KEY")
    if key is None:
        yield
        return
    if not all(c.spec.logger.api_key_file for c in cells):
        if any(c.spec.logger.mode == "online" for c in cells):
            print(
                "note: WANDB_API_KEY goes into the SLURM jobs' environment, which SLURM stores with each job; "
                "logger.api_key_file=<file> keeps it out (README, W&B and secrets)"
            )
        yield
        return
    del os.environ["WANDB_API_KEY"]
    try:
        yield
    finally:
        os.environ["WANDB_API_KEY"] = key


def ranks_per_cell(gpus: int) -> int:
    """Processes a cell runs as: one per GPU, one on CPU."""
    return max(gpus, 1)


def _slurm_executor(settings: dict, folder: Path, gpus: int, sweep: str, tasks: int = 0):
    """One node per cell, `tasks` tasks (default: one per GPU) of cpus_per_task CPUs each."""
    tasks = tasks or ranks_per_cell(gpus)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=settings["max_requeues"])
    params = dict(
        job_name=f"tinyablate-{sweep}",
        partition=settings.get("partition"),
        account=settings.get("account"),
        qos=settings.get("qos"),
        constraint=settings.get("constraint"),
        nodes=1,
        ntasks_per_node=tasks,
        # One rank failing stops the others (they would wait in a collective until the time-out).
        srun_args=["--kill-on-bad-exit=1"] if tasks > 1 else None,
        cpus_per_task=settings["cpus_per_task"],
        mem=f"{settings['mem_gb']}G",
        time=settings["timeout_min"],
        gpus_per_node=gpus or None,
        array_parallelism=settings["array_parallelism"],
        signal_delay_s=settings["signal_delay_s"],
        setup=list(settings.get("setup") or []),
        additional_parameters=dict(settings.get("additional_parameters") or {}),
    )
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def _run_local(settings: dict, cells: list, folder: Path) -> list:
    """At most `max_parallel` jobs at once (a job: one cell, or a bundle of up to `cells_per_job` run one after
    another by its pool's one worker); each gets its own GPUs (CUDA_VISIBLE_DEVICES) if it asks, a GPU going to up to
    `cells_per_gpu` jobs at once."""
    executor = submitit.LocalExecutor(folder=folder)
    gpu_ids = local_gpus() if any(c.spec.gpus for c in cells) else []
    too_big = [c.cell_id for c in cells if c.spec.gpus > len(gpu_ids)]
    if too_big:
        raise SystemExit(
            f"{len(too_big)} cells ask for more GPUs than this machine shows ({len(gpu_ids)}), "
            f"e.g. {too_big[0]}: set gpus=0 for CPU, or run them with hydra/launcher=slurm"
        )
    free_gpus = gpu_ids * int(settings.get("cells_per_gpu", 1))  # one slot per job a GPU may hold
    queue, running, jobs = bundles(cells, int(settings.get("cells_per_job", 1))), [], []
    limit = int(settings["max_parallel"])  # >= 1: the launcher checked it
    n_cores = cores()
    threads = cpu_threads_per_cell(n_cores, limit, len(queue))
    if threads is not None:
        print(f"{threads} torch CPU thread(s) per cell ({n_cores} cores, up to {limit} cells at once)")
    try:
        while queue or running:
            while queue and len(running) < limit and (gpus := _take_gpus(free_gpus, queue[0][0].spec.gpus)) is not None:
                bundle = queue.pop(0)
                executor.update_parameters(
                    timeout_min=settings["timeout_min"],
                    gpus_per_node=len(gpus),
                    visible_gpus=gpus,
                    tasks_per_node=ranks_per_cell(len(gpus)),
                )
                with _sigint_ignored():
                    job = executor.submit(CellJob(threads, local=True), *_job_args(bundle))
                running.append((job, gpus))
                jobs.append(job)
                for cell in bundle:
                    write_launch_record(cell, job, "local")
                more = f" and {len(bundle) - 1} more, one after another" if len(bundle) > 1 else ""
                print(f"started {bundle[0].cell_id}{more}{f' on GPU {gpus}' if gpus else ''} (log: {job.paths.stderr})")
            time.sleep(settings.get("poll_s", 2.0))
            for job, gpus in [r for r in running if r[0].done()]:
                free_gpus += gpus
            running = [r for r in running if not r[0].done()]
    except BaseException:  # Ctrl-C, or submitting failed (a full disk): the cells started here stop too
        with _sigint_ignored():  # a second Ctrl-C does not cut the stopping short
            stop_local_jobs([job for job, _ in running])
        raise
    return jobs


@contextlib.contextmanager
def _sigint_ignored():
    """Processes started in the block ignore SIGINT (inherited through exec): Ctrl-C reaches this launcher and
    the cells (CellJob handles it again), not submitit's job controller, which would print a traceback and
    kill its cell."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_local_jobs(jobs: list, grace_s: float = 2.0, patience_s: float = 30.0) -> None:
    """After Ctrl-C: each local job's cell processes get SIGINT unless they ended within `grace_s` (a terminal's
    Ctrl-C reached them already), and SIGKILL if still alive after `patience_s`; then their controllers end.
    Their cells read interrupted either way (resumed from their last checkpoint by a re-run)."""
    import psutil

    controllers = []
    for job in jobs:
        with contextlib.suppress(psutil.Error, ValueError):
            controllers.append(psutil.Process(int(job.job_id)))  # a local job's id is its controller's pid
    _, alive = psutil.wait_procs([task for c in controllers for task in _children(c)], timeout=grace_s)
    for task in alive:
        with contextlib.suppress(psutil.Error):
            task.send_signal(signal.SIGINT)
    _, alive = psutil.wait_procs(alive, timeout=patience_s)
    for task in alive:
        with contextlib.suppress(psutil.Error):
            task.kill()
    _, controllers = psutil.wait_procs(controllers, timeout=10)
    for controller in controllers:
        with contextlib.suppress(psutil.Error):
            controller.kill()


def _children(process) -> list:
    import psutil

    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def _take_gpus(free: list, n: int) -> Optional[list]:
    """`n` different GPU ids taken from the free slots (a GPU appears once per cell it may still hold), or None."""
    distinct = list(dict.fromkeys(free))
    if len(distinct) < n:
        return None
    for gpu in distinct[:n]:
        free.remove(gpu)
    return distinct[:n]


def cpu_threads_per_cell(cores: int, max_parallel: int, cells: int) -> Optional[int]:
    """Torch's CPU threads for each cell of a local sweep: the cores split between the cells that run at once
    (at least 1), so max_parallel > 1 never oversubscribes the CPU; None when one cell runs at a time (torch
    keeps its default: every core) or OMP_NUM_THREADS already says."""
    at_once = min(max_parallel, cells)
    if at_once <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, cores // at_once)


def auto_cells_at_once(fit: int, n_cells: int, n_cores: int) -> int:
    """cells_per_gpu=auto: as many of `n_cells` as fit on a GPU (`fit`, cost.cells_per_gpu), at most one per core."""
    return max(1, min(fit, n_cores, n_cells))


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def slurm_auto_gpus(partition: Optional[str]) -> int:
    """What gpus=auto means on SLURM: 1 when the partition's nodes offer a GPU (a `gpu` GRES in `sinfo`), else 0."""
    import subprocess

    cmd = ["sinfo", "-h", "-o", "%G"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0  # no sinfo: submitting will say so (the launcher checks for sbatch)
    return 1 if any("gpu" in line for line in out.split()) else 0


def local_gpus() -> list:
    """GPU ids this process may hand out: its own CUDA_VISIBLE_DEVICES, else every GPU torch sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [int(x) for x in visible.split(",") if x.strip().isdigit()]
    import torch  # here: importing this module loads no torch (a test checks)

    return list(range(torch.cuda.device_count()))


def local_gpu_bytes() -> int:
    """The memory of the smallest GPU this process may hand out (0 without one)."""
    ids = local_gpus()
    if not ids:
        return 0
    import torch

    return min((torch.cuda.get_device_properties(i).total_memory for i in ids), default=0)


def _wait(jobs: list, poll_s: float) -> None:
    """Until every job is done; `jobs`: (submitit job, cells it runs)."""
    last = None
    while True:
        states = [j.state for j, _ in jobs]
        done = sum(n for j, n in jobs if j.done())
        summary = f"{done}/{sum(n for _, n in jobs)} cells in finished jobs; " + ", ".join(
            f"{s.lower()}: {states.count(s)}" for s in sorted(set(states))
        )
        if summary != last:
            print(time.strftime("[%H:%M:%S] ") + summary, flush=True)
            last = summary
        if all(j.done() for j, _ in jobs):
            return
        time.sleep(poll_s)
