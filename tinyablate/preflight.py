"""Everything about a cell that can be checked without its weights, in the one call that a single
cell (run_cell, before anything loads) and a sweep's launcher (every cell, before anything is
submitted or a dry run says "valid") share:

    params, nbytes = preflight(spec)      # ConfigError listing every problem, else the adapter's size

- the settings themselves (config.spec_problems: types, ranges, rules across sections);
- the adapter against the model's shapes on the meta device (shapes.py): r above a matrix's smaller
  side, unknown target_modules, layers beyond the model's;
- the files the cell will read: model.path exists, an embedded model's PyPI packages are installed (where
  the cell runs); task.data_dir holds non-empty train/test files
  whose every line parses (the message names the file and line), and enough problems to train on
  and evaluate; every other task of eval.tasks likewise (evaluation only); data from the Hub is
  checked when the cell runs;
- logger.mode=online has a W&B key to use (WANDB_API_KEY, logger.api_key_file, or a wandb login).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path
from typing import Optional

from .config import CellSpec, ConfigError, eval_task_configs, spec_problems
from .config.algo import attention_check_on
from .config.checks import raise_problems
from .config.logger import LoggerConfig
from .config.model import MODELS, ModelConfig, load_kind
from .config.task import TaskConfig
from .embedded import missing_problem
from .files import LOW_SPACE, disk_full
from .shapes import adapter_size


def preflight(spec: CellSpec, world_size: Optional[int] = None, here: bool = True) -> tuple:
    """Check one cell without loading weights; returns (trainable parameters, trainable bytes). `here`: the
    cell runs on this machine (a single cell, the local launcher, a job on its node), so its GPUs are checked
    too; a SLURM launcher passes False (its node is checked when the job starts there)."""
    problems, size = spec_problems(spec, world_size), (None, None)
    sound = lambda *sections: not any(p.startswith(tuple(f"{s}." for s in sections)) for p in problems)  # noqa: E731
    if sound("model", "adapter"):  # each check below needs its sections' settings well-typed
        try:
            size = adapter_size(spec.model.name, spec.adapter)
        except ValueError as err:
            problems += str(err).splitlines()
    if sound("model"):
        problems += model_file_problems(spec.model, here)
    if sound("task", "train"):
        problems += data_problems(spec.task, spec.train)
    if sound("task", "eval"):  # the other tasks of eval.tasks: their data too, evaluation only
        for name, cfg in eval_task_configs(spec).items():
            if name != spec.task.name:
                problems += [f"eval.tasks {name}: {p}" for p in data_problems(cfg, train=False)]
    if sound("logger"):
        problems += logger_problems(spec.logger)
    if here and isinstance(spec.gpus, int) and sound("model"):
        problems += device_problems(spec)
    if here:  # the environment the cell trains in
        try:
            attention_check_on()
        except ValueError as err:
            problems.append(str(err))
    problems += output_dir_problems(spec.output_dir)
    raise_problems(problems)
    return size


def output_dir_problems(output_dir) -> list:
    """output_dir can be written: a probe file of LOW_SPACE bytes is written, synced and removed in it, or in the
    nearest folder above it that exists (nothing is created); a full disk fails it (an empty file would not)."""
    path = Path(str(output_dir)).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is a file")
        with tempfile.TemporaryFile(dir=existing) as probe:
            probe.write(b"\0" * LOW_SPACE)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as err:
        full = disk_full(err, existing)
        if full is not None:
            return [f"output_dir={str(output_dir)!r} is invalid: {full}"]
        return [
            f"output_dir={str(output_dir)!r} is invalid: it cannot be written here ({type(err).__name__}: "
            f"{err.strerror or err}); choose a folder you can write (output_dir=/path/you/own)"
        ]
    return []


def device_problems(spec: CellSpec) -> list:
    """The GPUs a cell asks for (gpus, model.device) against what this machine shows."""
    from .distributed import visible_gpus  # here: the rest of preflight needs no torch.distributed

    visible = visible_gpus()
    if spec.gpus > visible:
        return [
            f"gpus={spec.gpus} is invalid here: this machine shows {visible} CUDA GPU(s); set gpus=0 for the "
            "CPU, or run where the GPUs are (hydra/launcher=slurm requests them)"
        ]
    device = str(spec.model.device)
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= visible:
            return [
                f"model.device={device!r} is invalid here: this machine shows {visible} CUDA GPU(s); use "
                "model.device=auto (the device follows gpus) or cpu"
            ]
    return []


def model_file_problems(cfg: ModelConfig, here: bool = True) -> list:
    """model.path exists; an embedded model's packages are installed where the cell runs (`here`: a SLURM
    launcher leaves that to the node, whose environment may differ from the login node's)."""
    if cfg.path is not None and not Path(cfg.path).expanduser().exists():
        return [f"model.path={cfg.path!r} is invalid: expected an existing folder (or GGUF file); nothing is there"]
    missing = missing_problem(cfg.name) if here and load_kind(cfg, MODELS[cfg.name]) == "gguf" else None
    return [f"model.name={cfg.name!r}: {missing}"] if missing else []


def data_problems(cfg: TaskConfig, train: bool) -> list:
    """The task's data: readable, every line valid, and problems to train on and evaluate."""
    key = json.dumps(asdict(cfg), sort_keys=True, default=str)
    if cfg.name != "arithmetic" and cfg.data_dir is None:
        return []  # from the Hub, when the cell runs (no network here to check it)
    return list(_data_problems(key, train, _stamp(cfg.data_dir)))


def _stamp(data_dir: Optional[str]) -> tuple:
    """The data files' sizes and times: a file changed since it was checked is checked again."""
    if data_dir is None or not Path(data_dir).expanduser().is_dir():
        return ()
    return tuple(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(data_dir).expanduser().iterdir())
    )


@lru_cache(maxsize=64)  # a grid shares a few task configs: each is read once
def _data_problems(key: str, train: bool, stamp: tuple) -> tuple:
    from .tasks import load_task  # here: datasets' import costs the launcher ~1 s otherwise

    cfg = TaskConfig(**json.loads(key))
    try:
        task = load_task(cfg)
    except (OSError, ValueError) as err:  # missing folder or file, a bad line (the message names it)
        if cfg.train_size is None:
            return (f"task data: {err}",)
        # a train_size the training split cannot give: the evaluation split is still checked, and named (a bad
        # line that stops loading without train_size too is the same problem: said once)
        rest = _data_problems(json.dumps({**json.loads(key), "train_size": None}, sort_keys=True), False, stamp)
        return tuple(dict.fromkeys((f"task data: {err}", *rest)))
    problems = []
    where = f"task.name={task.cfg.name!r}, task.data_dir={task.cfg.data_dir!r}"
    if train:  # the training and the evaluation split are each checked, each named
        try:
            if not task.train_problems():  # a task without a training split says so
                problems.append(
                    f"task data: no training problems ({where}): give a non-empty train file, or train=false"
                )
        except (OSError, ValueError) as err:
            problems.append(f"task data (training split): {err}")
    try:
        if not task.eval_problems():
            problems.append(
                f"task data: no evaluation problems ({where}, task.eval_limit={task.cfg.eval_limit!r}): "
                "give a non-empty test file"
            )
    except (OSError, ValueError) as err:
        problems.append(f"task data (evaluation split): {err}")
    return tuple(problems)


def logger_problems(cfg: LoggerConfig) -> list:
    """logger.mode=online needs a key now, not after the model has loaded."""
    if cfg.api_key_file is not None:
        path = Path(cfg.api_key_file).expanduser()
        if not path.is_file() or not os.access(path, os.R_OK) or not path.read_text().strip():
            return [
                f"logger.api_key_file={cfg.api_key_file!r} is invalid: expected a readable file holding the "
                "W&B API key (one line)"
            ]
    if cfg.mode != "online" or cfg.api_key_file is not None or os.environ.get("WANDB_API_KEY"):
        return []
    netrc = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace"):
        return []
    return [
        "logger.mode='online' has no W&B API key: set logger.api_key_file=/path/to/a/file/holding/the/key "
        "(readable by you only; on SLURM this keeps the key out of the job's environment), or export "
        "WANDB_API_KEY, or use logger=offline and `wandb sync` the runs later"
    ]


__all__ = [
    "preflight",
    "ConfigError",
    "data_problems",
    "device_problems",
    "logger_problems",
    "model_file_problems",
    "output_dir_problems",
]
