"""Hydra's ConfigStore: the typed root config, and the launcher settings.

`root_schema` is tinyablate.config.RootConfig (a cell's CellSpec plus the options of one launch);
conf/config.yaml lists it first in its defaults, so every composed config is typed by it.
Launchers: `hydra/launcher=local` or `hydra/launcher=slurm` (pick on the command line, never inside
an experiment file). Every field can be overridden, e.g.
`hydra.launcher.partition=gpu hydra.launcher.timeout_min=720`.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from tinyablate.config import CellSpec, RootConfig, cell_spec

from .sweeper import register as register_sweeper

TARGET = "hydra_plugins.tinyablate.launcher.TinyablateLauncher"


@dataclass
class LocalConf:
    """Cells run in subprocesses on this machine (submitit's local executor)."""

    _target_: str = TARGET
    backend: str = "local"
    # Jobs running at once (a job: one cell, or a bundle of cells_per_job).
    max_parallel: int = 1
    # Jobs sharing one GPU at once (small models leave most of a GPU idle): each GPU is handed to up to this
    # many running jobs of gpus=1 cells (a gpus=N>1 cell takes N different GPUs). Raise max_parallel with it.
    # "auto": as many as fit by the cost model's memory estimate of the largest cell (tinyablate/cost.py
    # cell_memory_bytes) with a 1.5x margin in 90% of the GPU, at most one per CPU core; max_parallel is raised
    # to fill every GPU. The launcher prints what it chose.
    cells_per_gpu: Any = 1
    # Cells one job runs one after another in one process (imports, compiled kernels and the base-accuracy
    # cache stay warm: seconds, not tens of seconds, to a later cell's first step). Each cell keeps its own
    # folder, lock, result and W&B run; a failed cell does not stop the next. Cells of gpus>1 run one per job.
    cells_per_job: int = 1
    # Wall-clock limit of one cell, in minutes.
    timeout_min: int = 24 * 60
    # Seconds between progress checks while waiting.
    poll_s: float = 2.0


@dataclass
class SlurmConf:
    """Cells run as one SLURM job array per GPU count, through submitit."""

    _target_: str = TARGET
    backend: str = "slurm"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    # CPUs per task and memory per cell (one node). GPUs per cell come from the cell's `gpus`; a cell with
    # gpus=N runs as N tasks (one rank per GPU), each with cpus_per_task CPUs.
    cpus_per_task: int = 8
    mem_gb: int = 64
    # Time limit per attempt (minutes); at the limit the job is requeued and resumes from its checkpoint.
    timeout_min: int = 24 * 60
    # Jobs of one array running at once.
    array_parallelism: int = 64
    # Cells one job (array task) runs on its node (as the local launcher's cells_per_job: one after another in
    # one process); timeout_min is then the whole bundle's, and a requeued bundle skips its completed cells.
    cells_per_job: int = 1
    # Cells of a job's bundle running at once, each in a worker process of the job's pool (hydra_plugins/tinyablate/
    # pool.py), sharing the job's GPU (gpus=1 cells) or its CPUs (gpus=0 cells; cpus_per_task split between
    # them). "auto": as many as fit in the job's GPU by the cost model's memory estimate (known in the job: a
    # number that does not fit is lowered there, and the job's log says so), at most one per CPU; CPU cells: 1.
    # Needs cells_per_job > 1; mem_gb and cpus_per_task are the whole job's.
    cells_per_gpu: Any = 1
    # Requeues after a time-out before the cell counts as failed (preemptions requeue without limit).
    max_requeues: int = 3
    # SLURM signals the job this many seconds before its time limit, so it can requeue itself.
    signal_delay_s: int = 120
    # Shell lines run before the cell in the batch script (module load, source venv, export ...).
    setup: List[str] = field(default_factory=list)
    # Any other sbatch option, e.g. {"reservation": "ml"}.
    additional_parameters: Dict[str, Any] = field(default_factory=dict)
    poll_s: float = 10.0


def root_from_hydra(cfg) -> RootConfig:
    """The typed RootConfig of a composed Hydra/OmegaConf config."""
    root = OmegaConf.to_object(cfg)
    if not isinstance(root, RootConfig):
        raise TypeError(f"expected the composed config to be a RootConfig, got {type(root).__name__}")
    return root


def spec_from_hydra(cfg, auto_gpus: Optional[int] = None) -> CellSpec:
    """The CellSpec of a composed config (not validated: run_cell and the launcher validate). `gpus: null`
    (auto) becomes `auto_gpus`, by default `local_auto_gpus()`."""
    return cell_spec(root_from_hydra(cfg), local_auto_gpus() if auto_gpus is None else auto_gpus)


def local_auto_gpus() -> int:
    """What gpus=auto means on this machine: 1 where a CUDA GPU is visible, else 0 (CPU)."""
    from tinyablate.distributed import visible_gpus  # imports torch: only when auto is asked about

    return 1 if visible_gpus() > 0 else 0


def rate_by_u(algo: str, u: int, table: str) -> float:
    """A preset's learning rate by algorithm and adapter size, written in its YAML with its reason, e.g.
    ``learning_rate: ${rate_by_u:${algo.name},${adapter.u},"grpo 1:2e-3 16:1e-3 64:5e-4; sft 1:2e-3"}``:
    for `algo`, the rate of the largest threshold <= u (sweeps/embedded.yaml, sweeps/evidence.yaml)."""
    rules = {}
    for part in table.split(";"):
        name, *steps = part.split()
        rules[name] = sorted((int(k), float(v)) for k, v in (step.split(":") for step in steps))
    if algo not in rules or not rules[algo] or u < rules[algo][0][0]:
        raise ValueError(f"rate_by_u: no rate for algo {algo!r} at u={u} in {table!r}")
    return [rate for threshold, rate in rules[algo] if threshold <= u][-1]


def register() -> None:
    """Register the root schema, the sweeper, the launchers and the presets' resolvers in Hydra's ConfigStore."""
    OmegaConf.register_new_resolver("rate_by_u", rate_by_u, replace=True)
    register_sweeper()
    store = ConfigStore.instance()
    store.store(name="root_schema", node=RootConfig)
    store.store(group="hydra/launcher", name="local", node=LocalConf, provider="tinyablate")
    store.store(group="hydra/launcher", name="slurm", node=SlurmConf, provider="tinyablate")
