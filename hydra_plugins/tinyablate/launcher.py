"""The sweep launcher: validate every cell, skip finished ones, submit the rest through submitit.

Unlike the stock hydra-submitit launcher it validates the whole grid before submitting anything,
skips completed cells (and failed ones unless `retry_failed=true`), resumes interrupted cells from
their checkpoints, can return at once (`wait=false`), lets a failed cell fail its SLURM job, and ends
with a status table. Cell folders: <output_dir>/<sweep>/<cell_id>/.
"""

import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher

from tinyablate.cell_folder import CellFolder
from tinyablate.config import CellSpec, Checks, cell_id, cell_spec
from tinyablate.cost import cells_per_gpu
from tinyablate.files import disk_full
from tinyablate.preflight import preflight
from tinyablate.status import cell_row, format_table, live_job

from . import plan
from .compose import compose_cells
from .conf import local_auto_gpus
from .submit import auto_cells_at_once, cores, job_end, local_gpu_bytes, local_gpus, slurm_auto_gpus, submit_cells


@dataclass
class Cell:
    overrides: list
    spec: Optional[CellSpec] = None
    cell_id: str = ""
    folder: Optional[CellFolder] = None
    error: Optional[str] = None
    params: Optional[int] = None  # trainable parameters (preflight)
    trainable_bytes: Optional[int] = None  # their storage in bytes, at the adapter's precision (preflight)


def invalid_lines(bad: list, shown: int = 3) -> list:
    """Each invalid cell with its problems; a problem shared by many cells (a whole grid without GPUs) is shown
    with its first `shown` cells and a count."""
    by_error: dict = {}
    for c in bad:
        by_error.setdefault(c.error, []).append(c)
    lines = []
    for error, group in by_error.items():
        lines += [f"INVALID {' '.join(c.overrides)}\n    {error}" for c in group[:shown]]
        if len(group) > shown:
            lines.append(f"... and {len(group) - shown} more cells with this problem")
    return lines


def died_job_lines(cells: list, jobs: list) -> list:
    """One line per finished job that left cells of its own neither completed nor failed (its process died: kill
    -9, out of memory, a lost node): which cells, in which state, and how the job ended."""
    left: dict = {}
    for c in cells:
        state = c.folder.state()
        if state in ("pending", "interrupted"):
            left.setdefault(str(c.folder.read_launch().get("job_id")), []).append(f"{c.cell_id} ({state})")
    by_id = {str(j.job_id): j for j in jobs}
    return [
        f"job {job_id} lost its cells: {job_end(by_id.get(job_id))}; {len(stuck)} of its cells did not finish: "
        f"{', '.join(stuck)}; run the sweep again to resume them"
        for job_id, stuck in left.items()
    ]


class TinyablateLauncher(Launcher):
    def __init__(self, backend: str = "local", **settings: Any) -> None:
        self.backend = backend
        self.settings = settings
        self.config = None
        self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.hydra_context = hydra_context
        self.config = config

    # -- the one entry point Hydra calls --------------------------------------------------------
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        t0 = time.time()
        self._check_settings(len(job_overrides))
        roots = compose_cells(self.hydra_context.config_loader, self.config, job_overrides)
        auto_gpus = self._auto_gpus(roots)
        cells = [self._check(list(o), r, auto_gpus) for o, r in zip(job_overrides, roots)]
        options = roots[0]
        print(f"composed and validated {len(cells)} cells in {time.time() - t0:.1f} s")
        bad = [c for c in cells if c.error]
        if bad:
            print("\n".join(invalid_lines(bad)))
            print(f"{len(bad)} of {len(cells)} cells are invalid; nothing was submitted.")
            raise SystemExit(2)
        print("\n".join(plan.count_lines(cells)))
        self._pack_gpus(cells)
        if options.status:
            rows = [cell_row(c.folder.path, c.cell_id) for c in plan.distinct(cells)[0]]
            print(format_table(rows))
            if any(r["state"] == "failed" for r in rows):
                raise SystemExit(1)  # as python -m tinyablate.status does
            return self._returns(cells)
        if options.dry_run:
            print("\n".join(plan.plan_lines(cells, options.cost_device, cells_per_gpu=self._packed())))
            if self.backend == "slurm":
                print("SLURM: each cell's GPUs (gpus, model.device) are checked on its node when the job starts")
            n_distinct = len(plan.distinct(cells)[0])
            print(
                f"dry run: {n_distinct} valid cells, nothing submitted"
                + (f" ({len(cells)} override sets)" if n_distinct != len(cells) else "")
            )
            return self._returns(cells)
        todo, notes = self._select(cells, options.retry_failed)
        if todo:
            print(plan.todo_line(todo, options.cost_device, self._packed()))
            self._check_backend()
            jobs = self._submit(todo, cells, notes, options.wait)
            if not options.wait:
                self._print_submitted(jobs, len(todo))
                return self._returns(cells)
        rows = [cell_row(c.folder.path, c.cell_id, notes.get(c.cell_id, "")) for c in plan.distinct(cells)[0]]
        print(format_table(rows))
        died = died_job_lines(todo, jobs if todo else [])
        self._run_analysis(cells)
        if died:
            print("\n".join(died), file=sys.stderr, flush=True)
        if died or any(r["state"] == "failed" for r in rows):
            raise SystemExit(1)
        return self._returns(cells)

    # -- steps ----------------------------------------------------------------------------------------
    def _auto_gpus(self, roots: list) -> int:
        """What gpus=auto (null, the default) means for these cells: 1 where they will run has a GPU, else 0."""
        if not any(not isinstance(r, Exception) and r.gpus is None for r in roots):
            return 0
        if self.backend == "slurm":
            n = slurm_auto_gpus(self.settings.get("partition"))
            where = f"SLURM partition {self.settings.get('partition') or '(default)'}"
        else:
            n, where = local_auto_gpus(), "this machine"
        print(f"gpus=auto: {n} GPU per cell ({where} {'has' if n else 'shows no'} GPUs; gpus=N to choose)")
        return n

    def _pack_gpus(self, cells: list) -> None:
        """Local cells of one GPU: cells_per_gpu=auto resolved by the cost model's memory estimate, and a number
        of cells that cannot fit on one of this machine's GPUs refused (one line, exit 2)."""
        value = self.settings.get("cells_per_gpu", 1)
        if self.backend == "slurm":  # the node's GPU is known in the job: submit.job_cells_at_once
            return
        specs = [c.spec for c in plan.distinct(cells)[0] if c.spec.gpus == 1]
        total = local_gpu_bytes() if self.backend == "local" and specs else 0
        if not total:
            if value == "auto":
                self.settings["cells_per_gpu"] = 1
            return
        fit, need = cells_per_gpu(specs, total)
        gib = 2**30
        where = f"{need / gib:.1f} GiB each by the cost model (x1.5 margin) in 90% of one GPU's {total / gib:.0f} GiB"
        if value == "auto":
            n = auto_cells_at_once(fit, len(specs), cores())
            self.settings["cells_per_gpu"] = n
            gpus = len(local_gpus())
            if self.settings.get("max_parallel", 1) < n * gpus:
                self.settings["max_parallel"] = n * gpus
            print(
                f"cells_per_gpu=auto: {n} cells at once per GPU ({fit} fit, {where}; at most one per CPU core, "
                f"{cores()}); max_parallel={self.settings['max_parallel']}"
            )
        elif value > fit:
            print(
                f"hydra.launcher.cells_per_gpu={value}: that many cells of up to {where} do not fit; at most "
                f"{fit} do (or cells_per_gpu=auto). Nothing was submitted."
            )
            raise SystemExit(2)

    def _packed(self) -> int:
        """One-GPU cells that share a GPU at once (local: resolved by _pack_gpus; SLURM: a bundle's cells at once,
        "auto" counted as 1 here since the job's GPU is not known before it runs)."""
        value = self.settings.get("cells_per_gpu", 1)
        if self.backend == "slurm":
            value = min(value, self.settings.get("cells_per_job", 1)) if isinstance(value, int) else 1
        return value if isinstance(value, int) else 1

    def _check(self, overrides: list, root, auto_gpus: int = 0) -> Cell:
        cell = Cell(overrides)
        try:
            if isinstance(root, Exception):
                raise root
            spec = cell_spec(root, auto_gpus)
            # the checks a single cell makes before loading (a SLURM cell's GPUs are checked on its node)
            cell.params, cell.trainable_bytes = preflight(spec, here=self.backend != "slurm")
        except Exception as err:  # every invalid cell is reported, not just the first
            cell.error = f"{type(err).__name__}: " + "\n    ".join(str(err).splitlines())  # one problem a line
            return cell
        cell.spec, cell.cell_id = spec, cell_id(spec)
        cell.folder = CellFolder.of(spec, cell.cell_id)
        return cell

    def _select(self, cells: list, retry_failed: bool) -> tuple:
        """The cells to submit, and a note for each one left alone."""
        todo, notes, seen = [], {}, set()
        for c in cells:
            if c.cell_id in seen:
                continue  # two override lists that define the same cell run it once
            seen.add(c.cell_id)
            state = c.folder.state()
            live = live_job(c.folder.path) if state != "completed" else None  # a retry may be queued too
            if state == "completed":
                notes[c.cell_id] = "skipped: completed"
            elif live:
                notes[c.cell_id] = f"left alone: {live}"
            elif state == "failed" and not retry_failed:
                notes[c.cell_id] = "skipped: failed (retry_failed=true re-runs it)"
            else:
                todo.append(c)  # new, interrupted (resumes from its checkpoint), or a retried failure
        counts = [
            sum(n.startswith(p) for n in notes.values()) for p in ("skipped: completed", "skipped: failed", "left")
        ]
        print(
            f"{len(todo)} to run, {counts[0]} completed cells skipped"
            + (f", {counts[1]} failed cells skipped (retry_failed=true re-runs them)" if counts[1] else "")
            + (f", {counts[2]} cells already queued or running left alone" if counts[2] else "")
        )
        return todo, notes

    def _check_settings(self, n_cells: int) -> None:
        """The launcher's own settings, and a sweep that has cells at all."""
        c = Checks("hydra.launcher")
        for name in ("max_parallel", "array_parallelism", "timeout_min", "cpus_per_task", "mem_gb", "cells_per_job"):
            if name in self.settings:
                c.integer(name, self.settings[name], minimum=1)
        if "cells_per_gpu" in self.settings and self.settings["cells_per_gpu"] != "auto":
            value = self.settings["cells_per_gpu"]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                c.rule(f"hydra.launcher.cells_per_gpu={value!r}: a positive integer or auto")
        if (
            self.backend == "slurm"
            and self.settings.get("cells_per_gpu", 1) != 1
            and self.settings.get("cells_per_job", 1) == 1
        ):
            c.rule(
                f"hydra.launcher.cells_per_gpu={self.settings['cells_per_gpu']} on SLURM runs that many cells of a "
                "job's bundle at once: set hydra.launcher.cells_per_job too (e.g. 4 times as many)"
            )
        for name in ("max_requeues", "signal_delay_s"):
            if name in self.settings:
                c.integer(name, self.settings[name], minimum=0)
        if "poll_s" in self.settings:
            c.number("poll_s", self.settings["poll_s"], above=0)
        if n_cells == 0:
            c.rule("the sweep has 0 cells (an axis with no values, e.g. range(1,1)?): nothing to run")
        if c.problems:
            print("\n".join(c.problems) + "\nnothing was submitted.")
            raise SystemExit(2)

    def _submit(self, todo: list, cells: list, notes: dict, wait: bool) -> list:
        """submit_cells, its jobs returned; Ctrl-C (_interrupted) and a full disk (submitit's pickles, the launch
        records) end the sweep with one line."""
        try:
            return submit_cells(self.backend, self.settings, todo, wait)
        except KeyboardInterrupt:
            self._interrupted(cells, notes)
        except OSError as err:
            full = disk_full(err, todo[0].folder.path.parent)
            if full is None:
                raise
            print(f"the sweep stopped (its running cells were stopped): {full}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    def _interrupted(self, cells: list, notes: dict) -> None:
        """Ctrl-C while the sweep ran: the status table, one line, exit 130 (local cells were stopped: submit.py)."""
        rows = [cell_row(c.folder.path, c.cell_id, notes.get(c.cell_id, "")) for c in plan.distinct(cells)[0]]
        print(format_table(rows))
        if self.backend == "local":
            n = sum(r["state"] == "interrupted" for r in rows)
            line = (
                f"interrupted (Ctrl-C): {n} cells stopped; they resume from their last checkpoint when this runs again"
            )
        else:
            line = (
                "interrupted (Ctrl-C): stopped waiting; the SLURM jobs go on (status=true follows them, scancel stops)"
            )
        print(line, file=sys.stderr, flush=True)
        raise SystemExit(130)

    def _check_backend(self) -> None:
        if self.backend == "slurm" and shutil.which("sbatch") is None:
            print(
                "hydra/launcher=slurm needs SLURM's sbatch on PATH, and none was found on this machine: "
                "run on a SLURM login node, or use hydra/launcher=local. Nothing was submitted."
            )
            raise SystemExit(2)

    def _print_submitted(self, jobs, n_cells: int) -> None:
        ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
        print(
            f"submitted {n_cells} cells in {len(jobs)} job(s) of array(s) {', '.join(ids)}; "
            "follow with `python launch.py -m <same arguments> status=true` or `python -m tinyablate.status <sweep dir>`"
        )

    def _run_analysis(self, cells: list) -> None:
        """At the end of a sweep: the analysis page and, unless W&B is disabled, a W&B summary run."""
        # Here, not at the top: Hydra imports this module at every start of launch.py (one cell, dry run,
        # status), and analysis loads matplotlib and scipy (~0.8 s) that only this step uses.
        from analysis.report import analyze

        for sweep_dir in sorted({c.folder.path.parent for c in cells}):
            mode = next(c.spec.logger.mode for c in cells if c.folder.path.parent == sweep_dir)
            try:
                page = analyze([sweep_dir], sweep_dir / "analysis", wandb_mode=None if mode == "disabled" else mode)
            except ValueError as err:  # e.g. no cell completed: say so, the status table says why
                print(f"analysis skipped: {err}")
                continue
            except Exception as err:  # noqa: BLE001 - its own failure (a full disk, a plot): the cells' results stand
                why = disk_full(err, sweep_dir) or f"{type(err).__name__}: {err}"
                print(f"analysis failed, the cells' results stand: {why}")
                continue
            print(f"analysis page: {page.resolve()}")

    @staticmethod
    def _returns(cells: list) -> list:
        out = []
        for c in cells:
            ret = JobReturn(overrides=c.overrides, status=JobStatus.COMPLETED)
            ret.return_value = c.cell_id
            out.append(ret)
        return out
