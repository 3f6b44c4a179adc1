"""One sweep cell's life: preflight → lock → (spawn ranks) → build → base evaluation → train → final
evaluation → result → publish, and a failure's record.

    from tinyablate.cell import run_cell
    result = run_cell(spec)          # spec: tinyablate.config.CellSpec; returns result.json's content

`run_cell` is the one way into a cell: launch.py, the launchers' jobs, spawned ranks and tests all
call it. It runs the same in a notebook, a test, a local subprocess or a SLURM job: it imports no
launcher. Before anything loads it runs `preflight` (tinyablate/preflight.py: every check that needs no
weights, the same call a sweep's launcher makes) and takes the cell's lock (one process per cell;
CellBusy if another live one holds it). A cell started again resumes training from its last complete
checkpoint (its final one: no training, evaluation and export only). Its samples and exported adapter are
staged and published with its result (CellFolder.publish). Whatever happens, the cell ends with a
result.json (status completed or failed) unless the process itself is killed; a completed one evaluated
problems and trained the steps asked for.
A `gpus: N > 1` cell runs as N ranks (distributed.py): started as one plain process, run_cell spawns
them on this machine; under torchrun or a SLURM task it is one of them. Every rank builds, trains
(DDP) and evaluates its share; rank 0 alone writes the result, metrics, W&B run and exported adapter.
`run_cells`: a bundle of cells one after another in one warm process, one summary per cell.

The steps live in their own rooms: building in build.py, the training run in train/run.py, the
evaluation plan in evaluation/plan.py, the result's assembly (timing, export, W&B summary) in result.py.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import console, distributed
from .build import BuiltCell, build
from .cell_folder import CellBusy, CellFolder, ErrorRecord, Result, ResultError, Timing
from .config import CellSpec, cell_id, spec_to_dict
from .distributed import Ranks
from .evaluation.plan import base_accuracy, evaluate_final
from .files import disk_full
from .metrics import MetricLogger, NullLogger, wandb_run_id
from .preflight import preflight
from .provenance import collect_provenance
from .result import Clock, completed_result, export, log_result, run_config
from .train import MetricLoggerCallback
from .train.run import prepare_resume, train


def run_cell(spec: CellSpec, cell_dir: Optional[Path] = None, started: Optional[float] = None) -> dict:
    """Run one cell (checked here, once, by preflight) and return its result, as written to <cell_dir>/result.json.

    `cell_dir` defaults to <output_dir>/<sweep>/<cell_id>. Under RANK/WORLD_SIZE (torchrun, submitit
    tasks, spawned ranks) this process is one data-parallel rank; a `gpus: N > 1` cell started without
    them spawns its N ranks here. Every rank returns rank 0's result. `started`: when the cell began (its
    timing's start_to_first_step_s counts from it; default: the process's start).
    """
    console.quiet_known_warnings()
    started_as = distributed.ranks_from_env()
    params, _ = preflight(spec, started_as.world_size if started_as.distributed else None)  # no weights loaded yet
    folder = CellFolder(cell_dir) if cell_dir is not None else CellFolder.of(spec)
    spawns = spec.gpus > 1 and not started_as.distributed  # (preflight checked this machine's GPUs: no folder yet)
    with _cell_lock(folder, started_as):  # one process runs a cell at a time (CellBusy otherwise)
        if spawns:
            os.environ[_LOCK_HELD_ENV] = str(folder.path)  # the spawned ranks inherit it: this process holds the lock
            distributed.spawn_ranks(spec.gpus, run_cell, spec, folder.path)
            return folder.read_result().to_dict()
        with distributed.process_group(spec.gpus) as ranks:
            return _run_ranks(spec, folder, ranks, params, started).to_dict()


def run_cells(
    specs: Sequence[CellSpec], cell_dirs: Sequence[Optional[Path]], warm: bool = False, started: Optional[float] = None
) -> list:
    """Cells one after another in this process (a bundle: hydra.launcher.cells_per_job), each through run_cell
    with its own folder, lock, result and metrics; returns one summary per cell (cell_id, status, accuracy,
    error). The process stays warm: imports, compiled kernels (kernels.py `compiled` keeps them per model
    and batch shape) and the base-accuracy cache serve every cell after the first. A cell that fails (its
    result says why) or that another process holds does not stop the cells after it; memory is released
    between cells. A bundle run again (a requeue) returns its completed cells' results and resumes the others.
    `warm`: this process ran a cell before, so even the first cell's start to first step counts from its own start.
    `started`: else, when the first cell's start to first step counts from (default: this process's start).
    """
    summaries = []
    for i, (spec, cell_dir) in enumerate(zip(specs, cell_dirs)):
        try:  # the first cell's start is the process's (imports included), a later one's its own
            summaries.append(cell_summary(run_cell(spec, cell_dir, started=time.time() if i or warm else started)))
        except Exception as err:  # noqa: BLE001 - the cell's own result.json records its failure
            status = "busy" if isinstance(err, CellBusy) else "failed"
            summaries.append(unfinished_summary(cell_id(spec), status, f"{type(err).__name__}: {err}"))
        finally:
            _release_memory()
    return summaries


def cell_summary(result: dict) -> dict:
    """What a job reports of a cell it ran (run_cell's result): cell_id, status, accuracy, world_size, error."""
    return {
        "cell_id": result["cell_id"],
        "status": result["status"],
        "accuracy": result["metrics"]["accuracy"],
        "world_size": result["timing"]["world_size"],
        "error": None,
    }


def unfinished_summary(cid: str, status: str, error: str) -> dict:
    """What a job reports of a cell that gave no result to it: `status` "failed" or "busy" (another process holds
    it), and why."""
    return {"cell_id": cid, "status": status, "accuracy": None, "world_size": None, "error": error}


def _release_memory() -> None:
    """What a finished cell held (model, engine, CUDA graphs, optimizer) back to the device before the next one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # each cell's timing.gpu_peak_gib is its own


def _cell_lock(folder: CellFolder, started_as: Ranks):
    """The cell's lock, taken by the process that owns the cell: a plain process (which holds it for
    the ranks it spawns) or rank 0 of ranks started by torchrun/SLURM tasks."""
    if started_as.distributed and (not started_as.is_main or os.environ.get(_LOCK_HELD_ENV) == str(folder.path)):
        return contextlib.nullcontext()
    return folder.locked()


_LOCK_HELD_ENV = "TINYABLATE_CELL_LOCK_HELD"


def _run_ranks(
    spec: CellSpec, folder: CellFolder, ranks: Ranks, params: Optional[int], started: Optional[float] = None
) -> Result:
    """The cell on this rank, its record whatever happens: a completed one kept, else run; a failure recorded.
    `params`: the trainable parameters preflight counted (the banner says them)."""
    cid = cell_id(spec)
    previous = None
    if ranks.is_main:
        folder.path.mkdir(parents=True, exist_ok=True)
        folder.remove_temp_files()  # what a killed write left (we hold the lock: nobody else writes)
        previous = _previous_result(folder, cid)
    previous = distributed.broadcast_from_main(previous)
    if previous is not None:
        return previous  # e.g. a requeue signal that arrived after the cell had finished
    start = time.time()
    try:
        if ranks.is_main:
            folder.write_spec(spec)
            folder.mark_running(ranks.world_size)
            print(console.banner(spec, cid, folder.path, ranks.world_size, params), flush=True)
        result = _run(spec, cid, folder, start, ranks, started)
    except Exception as err:  # a failed cell still leaves its record (a kill or requeue signal does not)
        full = disk_full(err, folder.path)  # said in one line, naming the path
        recorded = folder.has_result()  # the first rank to fail says why (the others follow it)
        if not recorded:
            recorded = folder.write_failure(_failure(spec, cid, start, full or err, ranks))
        if ranks.is_main and recorded:  # not recorded (a full disk): running.json stays, the cell reads interrupted
            folder.clear_running()
        if full is not None:
            raise full from err
        raise
    # Ctrl-C (KeyboardInterrupt) or a signal's SystemExit: no result, and running.json stays, so the cell
    # reads interrupted (like a killed one) and a re-run resumes it
    if ranks.is_main:
        folder.clear_running()
    return distributed.broadcast_from_main(result)


def _previous_result(folder: CellFolder, cid: str) -> Optional[Result]:
    """This cell's completed result if it has one; any other is moved aside (this is a retry)."""
    try:
        result = folder.read_result()
    except ResultError:
        folder.move_result_aside("unreadable")
        return None
    if result is None:
        return None
    if result.completed and result.cell_id == cid:
        return result
    folder.move_result_aside(result.status)
    return None


def _run(
    spec: CellSpec, cid: str, folder: CellFolder, start: float, ranks: Ranks, started: Optional[float] = None
) -> Optional[Result]:
    """Build → base evaluation → train → final evaluation → result → publish (rank 0; None on other ranks)."""
    built = build(spec, ranks)
    kept = prepare_resume(spec, folder, ranks.world_size) if ranks.is_main else []  # each step once in metrics.jsonl
    with _logger(spec, cid, folder, built) as logger:
        clock = Clock(start, setup=time.time())
        bases = {name: base_accuracy(spec, built, task) for name, task in built.eval_tasks.items()}
        if not any(row["step"] == 0 for row in kept):  # a resumed cell logged it in its first attempt: steps ascend
            logger.log({f"eval/base_{k}": v for k, v in bases[spec.task.name].logged().items()}, step=0)
        trained = train(spec, built, folder.path, [MetricLoggerCallback(logger)])
        clock.trained = time.time()
        finals = {
            name: evaluate_final(spec, built, folder, bases[name], trained=trained.steps > 0, task=task)
            for name, task in built.eval_tasks.items()
        }
        clock.evaluated = time.time()
        if not ranks.is_main:
            return None
        export(built, folder)
        result = completed_result(spec, cid, built, bases, finals, trained, clock, started)
        log_result(logger, result, built, trained)
    folder.publish(result)  # after the logger closed: nothing after this can turn it into a failure
    return result


def _logger(spec: CellSpec, cid: str, folder: CellFolder, built: BuiltCell):
    """The cell's metrics sink (metrics.jsonl and its W&B run) on rank 0; nothing on the others."""
    if not built.ranks.is_main:
        return NullLogger()
    config = run_config(spec, cid, built)
    return MetricLogger(
        folder.path,
        spec.logger,
        run_id=wandb_run_id(cid),
        group=spec.sweep,
        job_type=spec.algo.name,
        name=cid,
        config=config,
    )


def _failure(spec: CellSpec, cid: str, start: float, err: BaseException, ranks: Ranks) -> Result:
    """The failed result: what was raised, where, after how long."""
    return Result(
        cell_id=cid,
        status="failed",
        sweep=spec.sweep,
        config=spec_to_dict(spec),
        error=ErrorRecord(
            type=type(err).__name__,
            message=str(err),
            traceback=traceback.format_exc(),
            rank=ranks.rank,
            world_size=ranks.world_size,
        ),
        timing=Timing(wall_s=time.time() - start),
        provenance=collect_provenance(),
    )
