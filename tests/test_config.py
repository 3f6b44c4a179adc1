"""The config package: torch-free, one validation vocabulary with one wording, every problem at once;
and the shape of the house (no import circles, one owner of the cell folder's file names)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tinyablate.config import (
    AdapterConfig,
    AlgoConfig,
    CellSpec,
    ConfigError,
    EvalConfig,
    LoggerConfig,
    ModelConfig,
    SVDConfig,
    TaskConfig,
    spec_problems,
    validate_spec,
)

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "peft", "wandb", "numpy", "omegaconf", "hydra", "submitit")


def test_importing_the_config_package_loads_no_torch_transformers_or_trl():
    code = (
        "import sys; from tinyablate.config import CellSpec, cell_id, validate_spec;"
        "cell_id(validate_spec(CellSpec())); print(' '.join(sorted(sys.modules)))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
        ).stdout.split()
    )
    assert "tinyablate.config.identity" in loaded  # the probe really imported and used the package
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}


# One wording: "<section>.<field>=<value!r> is invalid: expected <what>", for every section.
BAD_FIELDS = [
    (ModelConfig(dtype="fp8"), "model.dtype", "'fp8'"),
    (ModelConfig(init_seed=True), "model.init_seed", "True"),
    (AdapterConfig(r=0), "adapter.r", "0"),
    (AdapterConfig(tie="some"), "adapter.tie", "'some'"),
    (AdapterConfig(svd=SVDConfig(cache_rank=-1)), "adapter.svd.cache_rank", "-1"),
    (AdapterConfig(lora_dropout=1.0), "adapter.lora_dropout", "1.0"),
    (TaskConfig(scorer="lenient"), "task.scorer", "'lenient'"),
    (TaskConfig(eval_limit=0), "task.eval_limit", "0"),
    (AlgoConfig(learning_rate=0), "algo.learning_rate", "0"),
    (AlgoConfig(top_p=1.5), "algo.top_p", "1.5"),
    (AlgoConfig(adam_beta2=1.0), "algo.adam_beta2", "1.0"),
    (EvalConfig(pass_k=True), "eval.pass_k", "True"),  # a bool is not the integer 1
    (EvalConfig(temperature="hot"), "eval.temperature", "'hot'"),
    (LoggerConfig(project=""), "logger.project", "''"),
]


@pytest.mark.parametrize("cfg,field,value", BAD_FIELDS, ids=[f for _, f, _ in BAD_FIELDS])
def test_every_section_speaks_one_wording(cfg, field, value):
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert err.value.problems == [str(err.value)]
    assert re.fullmatch(rf"{re.escape(field)}={re.escape(value)} is invalid: expected \S.*", str(err.value))


def test_a_bool_is_not_an_integer_anywhere():
    for spec, field in [
        (CellSpec(gpus=True), "gpus=True"),
        (CellSpec(seed=False), "seed=False"),
        (CellSpec(eval=EvalConfig(pass_k=True)), "eval.pass_k=True"),
        (CellSpec(algo=AlgoConfig(max_steps=True)), "algo.max_steps=True"),
    ]:
        with pytest.raises(ValueError, match=re.escape(field)):
            validate_spec(spec)


def test_every_problem_of_a_cell_is_reported_together():
    spec = CellSpec(
        model=ModelConfig(dtype="fp8"),
        adapter=AdapterConfig(u=0, precision="fp16"),
        task=TaskConfig(scorer="lenient"),
        algo=AlgoConfig(beta=0.1, adam_epsilon=1e-8),
        eval=EvalConfig(pass_k=-1),
        logger=LoggerConfig(mode="cloud"),
        sweep="a/b",
        gpus=-1,
    )
    with pytest.raises(ConfigError) as err:
        validate_spec(spec)
    problems = err.value.problems
    assert str(err.value).splitlines() == problems
    for start in (
        "gpus=-1",
        "sweep='a/b'",
        "model.dtype='fp8'",
        "adapter.u=0",
        "task.scorer='lenient'",
        "eval.pass_k=-1",
        "logger.mode='cloud'",
        "algo.beta=0.1 is not supported",
        "algo.adam_epsilon=1e-08 is invalid with adapter.precision=fp16",
    ):
        assert sum(p.startswith(start) for p in problems) == 1, (start, problems)
    assert len(problems) == 9
    assert spec_problems(CellSpec()) == []


def test_rules_that_read_other_fields_wait_for_those_fields():
    """A broken field is reported once, not again through every rule that reads it."""
    assert TaskConfig(operations=[]).problems() == [
        "task.operations=[] is invalid: expected a non-empty list of distinct operations among '+', '-', '*'"
    ]
    assert [p.split("=")[0] for p in AlgoConfig(micro_batch_size=0).problems()] == ["algo.micro_batch_size"]


# -- the shape of the house ----------------------------------------------------------------------
PACKAGES = ("tinyablate", "hydra_plugins", "analysis")


def _modules() -> dict:
    """module name -> its source file, for every module of the project's packages (and launch.py)."""
    out = {"launch": REPO / "launch.py"}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set:
    """The project modules `name` imports, at module level or inside a function (a deferred import is
    still a dependency): `from X import y` counts as importing X.y when that is a module, else X."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def test_no_import_circles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    circles = set()

    def visit(node, path):
        for nxt in graph[node]:
            if nxt in path:
                circles.add(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(node)

    done: set = set()
    for name in sorted(graph):
        visit(name, [name])
    assert not circles, sorted(circles)
    assert graph["tinyablate.cell"] >= {"tinyablate.config", "tinyablate.cell_folder"}  # the graph is real


CELL_FILES = {
    "result.json",
    "spec.json",
    "running.json",
    "launch.json",
    "metrics.jsonl",
    "summary.json",
    "eval_samples.jsonl",
    "adapter_native",
    "checkpoints",
}


def test_only_the_cell_folder_module_names_the_files_of_a_cell_folder():
    offenders = []
    for name, path in _modules().items():
        if name == "tinyablate.cell_folder":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in CELL_FILES:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}")
    assert not offenders, offenders


def test_the_library_imports_no_launching_code():
    """House rule 1: tinyablate/ runs a cell from a plain spec; Hydra and submitit stay in launch.py and
    hydra_plugins/."""
    offenders = []
    for name, path in _modules().items():
        if not name.startswith("tinyablate"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            offenders += [f"{name}: {n}" for n in names if n.split(".")[0] in ("hydra", "omegaconf", "submitit")]
    assert not offenders, offenders


def _package(module: str) -> str:
    """The unit that owns private names: a subpackage of tinyablate (tinyablate.engine), or a top-level module of
    it (tinyablate.cell), or a top-level package (analysis, hydra_plugins)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "tinyablate" else parts[0]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_imports_or_reads_another_packages_private_names():
    """Packages talk through public names: no `from other.package import _name`, and no `obj._attr` where
    `_attr` is an attribute, function or class that only other packages define (e.g. the engine reading an
    adapter layer's merged-weight cache or a sampler's internals)."""
    modules = _modules()
    owners: dict = {}
    trees = {name: ast.parse(path.read_text()) for name, path in modules.items()}
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _private(node.attr):
                owners.setdefault(node.attr, set()).add(_package(name))
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and _private(node.name):
                owners.setdefault(node.name, set()).add(_package(name))
    offenders = []
    for name, tree in trees.items():
        mine, path = _package(name), modules[name]
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                if base in modules or base.split(".")[0] in ("tinyablate", "analysis", "hydra_plugins"):
                    offenders += [
                        f"{path.relative_to(REPO)}:{node.lineno} imports {a.name} from {base}"
                        for a in node.names
                        if _private(a.name) and _package(base) != mine
                    ]
            elif isinstance(node, ast.Attribute) and _private(node.attr):
                where = owners.get(node.attr, set())
                if where and mine not in where:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} reads .{node.attr} of {sorted(where)}")
    assert not offenders, offenders
