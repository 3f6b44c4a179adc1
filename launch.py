"""Run a tinyablate cell, or with -m a sweep, from the composed Hydra config.

    python launch.py                                   # the default cell: SmolLM2-135M, TinyLoRA, GRPO, arithmetic
    python launch.py adapter.u=13 adapter.tie=all      # any axis on the command line
    python launch.py gpus=2 model=qwen2.5-7b ...       # one cell, data-parallel over 2 GPUs of this machine
    python launch.py adapter.u=13 dry_run=true         # check one cell and price it, run nothing (status=true: its state)
    python launch.py -m                                # the embedded sweep (sweeps/embedded.yaml), locally
    python launch.py -m sweeps=paper_gsm8k hydra/launcher=slurm task.data_dir=/data/gsm8k hydra.launcher.partition=gpu
    python launch.py -m sweeps=paper_gsm8k dry_run=true   # validate and list every cell, submit nothing
    python launch.py -m sweeps=paper_gsm8k status=true    # every cell's state
    python launch.py -m ... wait=false                    # SLURM: submit and return the job ids
    python launch.py -m ... retry_failed=true             # re-run failed cells (completed ones are always skipped)

Configs: conf/ (groups model, adapter, algo, task, eval, logger, split), sweeps/ (presets), typed by
tinyablate/config/ (RootConfig); launchers: hydra_plugins/tinyablate (hydra/launcher=local|slurm).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from hydra_plugins.tinyablate.conf import register, spec_from_hydra
from tinyablate.cell_folder import RESULT_FILE, CellBusy, CellFolder
from tinyablate.config import ConfigError
from tinyablate.console import end_lines
from tinyablate.distributed import ranks_from_env
from tinyablate.files import DiskFull, disk_full

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    # Imported for one cell only: `-m` never reaches here (the launcher runs the cells as jobs).
    from tinyablate.cell import run_cell

    spec = spec_from_hydra(cfg)
    if cfg.dry_run or cfg.status:  # the sweep's forms, for this one cell: nothing runs
        raise SystemExit(_dry_run(spec, cfg.cost_device) if cfg.dry_run else _status(spec))
    try:
        result = run_cell(spec)  # validates before any weight loads; spawns the ranks of a gpus=N cell
    except Exception as err:  # one clear message, no traceback (it is in result.json), non-zero exit
        print(_failure_message(err, spec), file=sys.stderr)
        raise SystemExit(2 if isinstance(err, (ConfigError, CellBusy)) else 1) from None
    except KeyboardInterrupt:  # the cell reads interrupted (cell.py keeps running.json)
        print("interrupted (Ctrl-C): the cell resumes from its last checkpoint when run again", file=sys.stderr)
        raise SystemExit(130) from None
    if not ranks_from_env().is_main:
        return
    page, note = _analysis_page(spec)
    print("\n" + end_lines(result, CellFolder.of(spec).file(RESULT_FILE), page, note))


def _dry_run(spec, cost_device: str) -> int:
    """dry_run=true for one cell: its checks (those of a run: settings, data, model file, GPUs here) and its plan
    line (trainable parameters and bytes, GPU-hours by the cost model), as `-m` prints them; exit 2 if invalid."""
    from hydra_plugins.tinyablate import plan
    from hydra_plugins.tinyablate.launcher import Cell
    from tinyablate.preflight import preflight

    try:
        params, size = preflight(spec)
    except ConfigError as err:
        print(_failure_message(err, spec), file=sys.stderr)
        return 2
    folder = CellFolder.of(spec)
    cell = Cell([], spec, folder.name, folder, params=params, trainable_bytes=size)
    print("\n".join(plan.plan_lines([cell], cost_device)))
    print("dry run: 1 valid cell, nothing run")
    return 0


def _status(spec) -> int:
    """status=true for one cell: its state (pending, running, completed with accuracy, failed with its error);
    exit 1 when it failed."""
    from tinyablate.status import cell_row, format_table

    row = cell_row(CellFolder.of(spec).path)
    print(format_table([row]))
    return 1 if row["state"] == "failed" else 0  # as the sweep's status=true


def _analysis_page(spec):
    """The analysis page of the cell's sweep folder (every cell completed there so far), or why none."""
    from analysis.report import analyze

    sweep_dir = CellFolder.of(spec).path.parent
    try:
        return analyze([sweep_dir], sweep_dir / "analysis", wandb_mode=None), ""
    except ValueError as err:
        return None, f"not written ({err})"
    except Exception as err:  # noqa: BLE001 - its own failure (a full disk, a plot): the cell's result stands
        return None, f"not written ({disk_full(err, sweep_dir) or f'{type(err).__name__}: {err}'})"


def _failure_message(err: Exception, spec) -> str:
    """What a failed single cell prints: the problems of an invalid cell, else the error and its record."""
    if isinstance(err, ConfigError):
        return "invalid cell, nothing was run:\n  " + "\n  ".join(err.problems)
    if isinstance(err, (CellBusy, DiskFull)):
        return str(err) if isinstance(err, CellBusy) else f"cell failed: {err}"
    where = CellFolder.of(spec).file(RESULT_FILE)
    return f"cell failed: {type(err).__name__}: {err}\n(the traceback is in {where}, under error.traceback)"


def _default_sweep(argv: list) -> list:
    """`python launch.py -m` with no sweep named runs the embedded sweep."""
    if any(a.lstrip("+") in ("sweeps=null", "sweeps=None", "sweeps=") for a in argv):
        raise SystemExit(
            "sweeps=null is invalid: expected a preset of sweeps/ (e.g. sweeps=embedded); "
            "leave sweeps= out to run the embedded sweep with -m"
        )
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if multirun and not any(a.startswith(("sweeps=", "+sweeps=")) for a in argv):
        return argv + ["sweeps=embedded"]
    return argv


def _check_output_dir(argv: list) -> None:
    """Hydra writes <output_dir>/.hydra before any of our code runs: an unwritable output_dir is named here,
    in one line, instead of Hydra's traceback."""
    from omegaconf import OmegaConf

    from tinyablate.preflight import output_dir_problems

    given = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("output_dir=")]
    output_dir = given[-1] if given else OmegaConf.load(Path(__file__).parent / "conf" / "config.yaml").output_dir
    problems = output_dir_problems(output_dir)
    if problems:
        print("invalid launch, nothing was run:\n  " + "\n  ".join(problems), file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    sys.argv = _default_sweep(sys.argv)
    _check_output_dir(sys.argv[1:])
    main()
