"""The typed spec of one sweep cell, its validation, and the Hydra root config around it.

A `CellSpec` is everything that defines a cell: model, adapter, task, algorithm, evaluation, seed.
`validate_spec` is the one place that checks a cell: every section's `check` plus the rules that
span sections, all problems reported together in one `ConfigError`, so a whole grid is checked
before anything is loaded or submitted. `RootConfig` is what Hydra composes (conf/config.yaml lists
`root_schema` first): a cell plus the options of one launch, registered by
hydra_plugins/tinyablate/conf.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Optional

from .adapter import AdapterConfig, adapter_from_dict
from .algo import NOT_CAPTURABLE, ROLLOUT_CORRECTIONS, AlgoConfig
from .checks import Checks, is_number, raise_problems
from .eval import EvalConfig
from .logger import LoggerConfig
from .model import ModelConfig
from .task import TaskConfig, default_task_config


@dataclass
class CellSpec:
    """One cell of a sweep. A new field changes every cell_id unless tinyablate/config/identity.py
    lists it as not part of the identity (README, "Extending")."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # Seed of training (sampling, data order); the model's and P's seeds are their own settings.
    seed: int = 0
    # Sweep name: the W&B group and the folder under output_dir.
    sweep: str = "default"
    # Root of sweep folders: a cell writes to <output_dir>/<sweep>/<cell_id>/.
    output_dir: str = "runs"
    # Skip training (evaluate the adapter as initialised); used for the 0-parameter point.
    train: bool = True
    # GPUs this cell uses (0 = CPU). With model.device=auto it decides the device (and so the dtype:
    # bf16 on GPU, fp32 on CPU), so it is part of the cell's identity. Launchers request this many;
    # N > 1 runs N data-parallel ranks on one node (tinyablate/distributed.py), same global batch.
    gpus: int = 0


SECTIONS = ("model", "adapter", "task", "algo", "eval", "logger")
_SECTION_TYPES = {
    "model": ModelConfig,
    "task": TaskConfig,
    "algo": AlgoConfig,
    "eval": EvalConfig,
    "logger": LoggerConfig,
}


def spec_problems(spec: CellSpec, world_size: Optional[int] = None) -> list:
    """Every problem of one cell (empty when valid). `world_size`: the ranks it will run as
    (default: one per GPU, or 1 on CPU)."""
    c = Checks()
    gpus_ok = c.integer("gpus", spec.gpus, minimum=0, note=" (0 = CPU; N > 1 runs N data-parallel ranks on one node)")
    if c.integer("seed", spec.seed, minimum=0, note=" below 2**32 (numpy's seed range)") and spec.seed >= 2**32:
        c.fail("seed", spec.seed, "an integer >= 0 below 2**32 (numpy's seed range)")
    c.boolean("train", spec.train)
    c.string("output_dir", spec.output_dir)
    if not isinstance(spec.sweep, str) or not spec.sweep or "/" in spec.sweep:
        c.fail("sweep", spec.sweep, "a non-empty name without '/'")
    problems = list(c.problems)
    for name in SECTIONS:
        section = getattr(spec, name)
        if name == "algo":
            problems += section.problems(world_size=world_size or (max(spec.gpus, 1) if gpus_ok else 1))
        else:
            problems += section.problems()
    return problems + _cross_section_problems(spec, gpus_ok) + _eval_task_problems(spec)


def eval_task_configs(spec: CellSpec) -> dict:
    """{task name: TaskConfig} of the tasks a cell is evaluated on: the training task (always, first;
    its accuracy is the cell's `accuracy`) and those `eval.tasks` lists.

    The training task keeps its own config (an `eval.task_settings` entry for it must agree with it);
    another listed task takes its defaults (conf/task/<name>.yaml, `default_task_config`) updated by
    `eval.task_settings[name]`. ConfigError if a name or setting is unknown.
    """
    out = {spec.task.name: spec.task}
    for name in spec.eval.tasks:
        if name != spec.task.name:
            out[name] = default_task_config(name, **dict(spec.eval.task_settings.get(name) or {}))
    return out


def _eval_task_problems(spec: CellSpec) -> list:
    """The evaluation tasks' own problems, each prefixed by where its settings come from."""
    if spec.eval.problems():  # eval.tasks itself is wrong: said there
        return []
    c = Checks()
    for key, value in dict(spec.eval.task_settings.get(spec.task.name) or {}).items():
        if getattr(spec.task, key, value) != value:  # unknown keys: default_task_config names them below
            c.rule(
                f"eval.task_settings.{spec.task.name}.{key}={value!r} differs from task.{key}="
                f"{getattr(spec.task, key)!r}: the training task is evaluated with its task.* settings; set "
                f"task.{key}={value!r} too, or drop eval.task_settings.{spec.task.name}.{key}"
            )
    for name in spec.eval.tasks:
        if name == spec.task.name:
            continue
        try:
            task_cfg = default_task_config(name, **dict(spec.eval.task_settings.get(name) or {}))
        except ValueError as err:
            c.problems += [f"eval.task_settings.{name}: {p}" for p in str(err).splitlines()]
            continue
        c.problems += [f"evaluation task {name!r} (eval.task_settings.{name}): {p}" for p in task_cfg.problems()]
    return c.problems


def _cross_section_problems(spec: CellSpec, gpus_ok: bool) -> list:
    """Rules that span sections."""
    c = Checks()
    if gpus_ok and spec.gpus > 1 and spec.model.device not in ("auto", "cuda"):
        c.rule(
            f"model.device={spec.model.device!r} with gpus={spec.gpus}: each rank uses its own GPU, "
            "so set model.device=auto (or cuda)"
        )
    on_cpu = spec.model.device == "cpu" or (spec.gpus == 0 and not str(spec.model.device).startswith("cuda"))
    for name, engine in (("algo.rollout_engine", spec.algo.rollout_engine), ("eval.engine", spec.eval.engine)):
        if engine == "graph" and on_cpu:
            c.rule(
                f"{name}=graph needs a CUDA GPU (its decode step is replayed from CUDA graphs) but this cell "
                f"runs on the CPU (gpus={spec.gpus}, model.device={spec.model.device}): use {name}=eager (the "
                f"same engine without graphs), hf or auto"
            )
        if engine == "graph" and spec.model.quantization in NOT_CAPTURABLE:
            c.rule(
                f"{name}=graph cannot run on model.quantization={spec.model.quantization}: LLM.int8()'s "
                f"outlier split has a data-dependent shape, which a CUDA graph cannot capture; use {name}=auto "
                f"(HF generate on such a base), eager or hf"
            )
    hf_rollouts = spec.algo.rollout_engine == "hf" or (spec.algo.rollout_engine == "auto" and on_cpu)
    correction = spec.algo.rollout_correction  # (an unknown one is said once, by AlgoConfig.check)
    if spec.algo.name == "grpo" and correction != "none" and correction in ROLLOUT_CORRECTIONS and hf_rollouts:
        c.rule(
            f"algo.rollout_correction={spec.algo.rollout_correction} needs the generation engine's sampling "
            f"log-probabilities, but this cell's rollouts come from HF generate (algo.rollout_engine="
            f"{spec.algo.rollout_engine}{', on the CPU' if on_cpu else ''}): set algo.rollout_engine=eager "
            "(or graph on a GPU), or algo.rollout_correction=none"
        )
    if spec.algo.name == "grpo" and is_number(spec.algo.beta) and spec.algo.beta > 0:
        c.rule(
            f"algo.beta={spec.algo.beta} is not supported: a KL penalty needs a reference model, which TRL would "
            "load from the Hub by name; use algo.beta=0 (as the TinyLoRA paper does)"
        )
    if spec.adapter.precision == "fp16" and is_number(spec.algo.adam_epsilon) and spec.algo.adam_epsilon < 1e-7:
        c.rule(
            f"algo.adam_epsilon={spec.algo.adam_epsilon} is invalid with adapter.precision=fp16: it rounds to 0 "
            "in fp16 and Adam divides by it; set algo.adam_epsilon >= 1e-7"
        )
    return c.problems


def validate_spec(spec: CellSpec, world_size: Optional[int] = None) -> CellSpec:
    """Check one cell; raises ConfigError (a ValueError) listing every problem, each naming the field,
    its value and what is allowed. Returns the spec."""
    raise_problems(spec_problems(spec, world_size))
    return spec


def spec_from_dict(raw: dict) -> CellSpec:
    """Build a CellSpec from a plain (resolved) dict such as result.json's `config` (not validated)."""
    raw = dict(raw)
    sections = {name: dict(raw.pop(name, {})) for name in SECTIONS}
    adapter = adapter_from_dict(sections.pop("adapter"))
    return CellSpec(
        adapter=adapter, **{name: _SECTION_TYPES[name](**values) for name, values in sections.items()}, **raw
    )


def spec_to_dict(spec: CellSpec) -> dict:
    """The spec as plain JSON-able values (what spec.json and result.json's `config` hold)."""
    return asdict(spec)


@dataclass
class RootConfig(CellSpec):
    """A composed config: one cell's spec plus what to do with the sweep it belongs to."""

    # Validate every cell and print each distinct cell once (axes, trainable parameters, bytes, estimated
    # GPU-hours: tinyablate/cost.py), totals per swept axis and for the sweep; submit nothing. Invalid cells
    # are listed with reasons and the exit code is 2.
    dry_run: bool = False
    # Block until every submitted cell ends and print the status table (SLURM only can return at once).
    wait: bool = True
    # Re-run cells whose result says failed (they are skipped otherwise).
    retry_failed: bool = False
    # Print every cell's state (pending, running, completed, failed with its log) and submit nothing.
    status: bool = False
    # Device kind of the GPU-hour estimates (dry run, submission): a kind in tinyablate/throughput.json
    # ("h200", "h100"), the measurements tinyablate/cost.py's model reads.
    cost_device: str = "h200"
    # GPUs per cell, as CellSpec.gpus; null (the default of launch.py) is "auto": 1 GPU per cell where the cells
    # will run has a GPU, else 0 (CPU). Where: this machine (`python launch.py`, the local launcher), or the
    # SLURM partition's GPUs (hydra/launcher=slurm: `sinfo`'s GRES). gpus=0 forces the CPU.
    gpus: Optional[int] = None


_CELL_FIELDS = tuple(f.name for f in fields(CellSpec))


def cell_spec(root: CellSpec, auto_gpus: int = 0) -> CellSpec:
    """The CellSpec part of a RootConfig (launch options dropped); `gpus: null` (auto) becomes `auto_gpus`."""
    values = {name: getattr(root, name) for name in _CELL_FIELDS}
    if values["gpus"] is None:
        values["gpus"] = auto_gpus
    return CellSpec(**values)
