"""Cross-task evaluation (`eval.tasks`) and training on multiple-choice tasks, end to end on CPU."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tinyablate.cell import run_cell
from tinyablate.cell_folder import SCHEMA_VERSION, CellFolder
from tinyablate.config import (
    AdapterConfig,
    AlgoConfig,
    CellSpec,
    EvalConfig,
    LoggerConfig,
    ModelConfig,
    TaskConfig,
    cell_id,
    eval_task_configs,
    identity_dict,
    validate_spec,
)
from tinyablate.config.task import default_task_config

REPO = Path(__file__).resolve().parents[1]
MMLU_DIR = REPO.parent / "shared" / "data" / "mmlu_cs"
HELLASWAG_DIR = REPO / "tests" / "fixtures" / "hellaswag"
needs_mmlu = pytest.mark.skipif(
    not (MMLU_DIR / "machine_learning_test.csv").is_file(), reason=f"MMLU-CS CSVs not found at {MMLU_DIR}"
)
FAST_ARITHMETIC = TaskConfig(name="arithmetic", max_value=9, train_size=40, eval_size=12, scorer="flexible")


def spec_for(tmp_path, task=FAST_ARITHMETIC, algo="sft", tasks=(), settings=None, **algo_kw) -> CellSpec:
    algo_settings = dict(
        name=algo,
        max_steps=2,
        learning_rate=1e-2,
        prompts_per_step=4,
        micro_batch_size=2,
        num_generations=2,
        max_completion_length=8,
        max_length=256,
        save_steps=2,
    )
    algo_settings.update(algo_kw)
    return CellSpec(
        model=ModelConfig(name="tiny-qwen2", cache_dir=str(tmp_path / "cache")),
        adapter=AdapterConfig(kind="tinylora", r=2, u=3, tie=2),
        task=task,
        algo=AlgoConfig(**algo_settings),
        eval=EvalConfig(batch_size=12, max_new_tokens=8, tasks=list(tasks), task_settings=dict(settings or {})),
        logger=LoggerConfig(mode="disabled"),
        output_dir=str(tmp_path / "runs"),
        sweep="cross",
    )


CROSS_SETTINGS = {
    "mmlu_cs": {"data_dir": str(MMLU_DIR), "eval_limit": 6},
    "hellaswag": {"data_dir": str(HELLASWAG_DIR), "num_fewshot": 1},
}


@needs_mmlu
def test_cell_trained_on_arithmetic_is_evaluated_on_every_listed_task(tmp_path):
    spec = spec_for(tmp_path, tasks=["arithmetic", "mmlu_cs", "hellaswag"], settings=CROSS_SETTINGS)
    result = run_cell(spec)
    cell_dir = CellFolder.of(spec).path
    on_disk = json.loads((cell_dir / "result.json").read_text())
    assert on_disk["schema_version"] == SCHEMA_VERSION == 2
    tasks = on_disk["metrics"]["tasks"]
    assert list(tasks) == ["arithmetic", "mmlu_cs", "hellaswag"]
    assert tasks["arithmetic"]["trained_on"] and not tasks["mmlu_cs"]["trained_on"]
    assert tasks["arithmetic"]["accuracy"] == on_disk["metrics"]["accuracy"]
    assert (tasks["mmlu_cs"]["n_eval"], tasks["hellaswag"]["n_eval"]) == (6, 8)
    for name, scorer in (("mmlu_cs", "acc"), ("hellaswag", "acc_norm")):
        m = tasks[name]
        assert m["scorer"] == scorer and m["accuracy"] == m["final"][scorer]
        assert m["delta"] == pytest.approx(m["accuracy"] - m["base_accuracy"])
        assert set(m["final"]) >= {"acc", "acc_norm", "chance"} and m["final"]["chance"] == 0.25
    assert len((cell_dir / "eval_samples.mmlu_cs.jsonl").read_text().splitlines()) == 6
    assert len((cell_dir / "eval_samples.jsonl").read_text().splitlines()) == 12
    parsed = CellFolder.of(spec).read_result().task_metrics()
    assert {name: m.to_dict() for name, m in parsed.items()} == tasks
    # every base accuracy is cached per task: a second cell with other training reads all three
    again = run_cell(dataclasses.replace(spec, seed=1))
    assert all(m["base_cached"] for m in again["metrics"]["tasks"].values())
    assert {n: m["base_accuracy"] for n, m in again["metrics"]["tasks"].items()} == {
        n: m["base_accuracy"] for n, m in result["metrics"]["tasks"].items()
    }


def test_table_of_tasks_goes_to_the_metrics_sink(tmp_path):
    spec = spec_for(tmp_path, tasks=["hellaswag"], settings={"hellaswag": {"data_dir": str(HELLASWAG_DIR)}})
    spec.logger = LoggerConfig(mode="offline")
    run_cell(spec)
    rows = [json.loads(line) for line in (CellFolder.of(spec).path / "metrics.jsonl").read_text().splitlines()]
    table = [r["eval/tasks"] for r in rows if "eval/tasks" in r]
    assert len(table) == 1 and table[0]["columns"][:3] == ["task", "scorer", "accuracy"]
    assert [row[0] for row in table[0]["data"]] == ["arithmetic", "hellaswag"]


@pytest.mark.parametrize("algo", ["sft", "grpo"])
def test_training_on_a_multiple_choice_task(tmp_path, algo):
    task = default_task_config("hellaswag", data_dir=str(HELLASWAG_DIR), num_fewshot=1)
    result = run_cell(spec_for(tmp_path, task=task, algo=algo))
    assert result["status"] == "completed" and result["metrics"]["train_steps"] == 2
    m = result["metrics"]["tasks"]["hellaswag"]
    assert m["n_eval"] == 8 and result["metrics"]["accuracy"] == m["final"]["acc_norm"]
    assert result["metrics"]["accuracy_strict"] is None


def test_a_task_that_cannot_train_fails_before_the_model_loads(tmp_path, monkeypatch):
    import tinyablate.models as models

    monkeypatch.setattr(models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "hs").mkdir()
    (tmp_path / "hs" / "hellaswag_val.jsonl").write_text((HELLASWAG_DIR / "hellaswag_val.jsonl").read_text())
    with pytest.raises(ValueError, match="cannot train here.*has no hellaswag_train.jsonl"):
        run_cell(spec_for(tmp_path, task=default_task_config("hellaswag", data_dir=str(tmp_path / "hs"))))


def test_bad_evaluation_data_fails_before_the_model_loads(tmp_path, monkeypatch):
    import tinyablate.models as models

    monkeypatch.setattr(models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded the model"))
    (tmp_path / "hs").mkdir()
    bad = tmp_path / "hs" / "hellaswag_val.jsonl"
    bad.write_text('{"ctx_a": "a", "ctx_b": "b", "endings": ["x", "y"], "label": 2}\n')
    spec = spec_for(tmp_path, tasks=["hellaswag"], settings={"hellaswag": {"data_dir": str(tmp_path / "hs")}})
    with pytest.raises(ValueError, match=f"{bad}:1: label 2 is out of range"):
        run_cell(spec)


# --- spec ----------------------------------------------------------------------------------------
def test_eval_tasks_resolve_with_their_defaults_and_settings(tmp_path):
    spec = spec_for(tmp_path, tasks=["mmlu_cs", "arithmetic"], settings={"mmlu_cs": {"num_fewshot": 5}})
    configs = eval_task_configs(validate_spec(spec))
    assert list(configs) == ["arithmetic", "mmlu_cs"] and configs["arithmetic"] is spec.task
    assert configs["mmlu_cs"] == default_task_config("mmlu_cs", num_fewshot=5)


@pytest.mark.parametrize(
    "tasks, settings, message",
    [
        (["mmlu"], {}, "eval.tasks"),
        (["hellaswag", "hellaswag"], {}, "eval.tasks"),
        (["hellaswag"], {"mmlu_cs": {}}, "eval.task_settings has settings for \\['mmlu_cs'\\]"),
        (["hellaswag"], {"hellaswag": {"scorer": "strict"}}, "evaluation task 'hellaswag'.*task.scorer"),
        (["hellaswag"], {"hellaswag": {"data_dri": "x"}}, "eval.task_settings.hellaswag: task.data_dri='x' is invalid"),
        (
            ["arithmetic"],
            {"arithmetic": {"eval_limit": 3}},
            "arithmetic.eval_limit=3 differs from task.eval_limit=None",
        ),
    ],
)
def test_bad_eval_tasks_are_refused_before_anything_runs(tmp_path, tasks, settings, message):
    with pytest.raises(ValueError, match=message):
        validate_spec(spec_for(tmp_path, tasks=tasks, settings=settings))


def test_settings_of_the_training_task_may_repeat_its_own(tmp_path):
    validate_spec(spec_for(tmp_path, tasks=["arithmetic"], settings={"arithmetic": {"max_value": 9}}))


def test_cell_id_is_unchanged_by_the_new_settings_at_their_defaults(tmp_path):
    spec = spec_for(tmp_path)
    assert cell_id(spec) == cell_id(
        dataclasses.replace(spec, eval=dataclasses.replace(spec.eval, tasks=["arithmetic"]))
    )
    others = dataclasses.replace(spec, eval=dataclasses.replace(spec.eval, tasks=["arithmetic", "mmlu_cs"]))
    assert cell_id(others) != cell_id(spec)
    ids = identity_dict(spec)
    assert "num_fewshot" not in ids["task"] and "tasks" not in ids["eval"] and "task_settings" not in ids["eval"]


def test_eval_tasks_compose_from_the_command_line():
    from hydra import compose, initialize_config_dir

    from hydra_plugins.tinyablate.conf import register, spec_from_hydra

    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "eval.tasks=[arithmetic,mmlu_cs]",
                "+eval.task_settings.mmlu_cs.data_dir=/data/mmlu",
                "+eval.task_settings.mmlu_cs.num_fewshot=5",
            ],
        )
    spec = spec_from_hydra(cfg)
    assert eval_task_configs(spec)["mmlu_cs"] == default_task_config("mmlu_cs", data_dir="/data/mmlu", num_fewshot=5)
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):  # one folder per task
        cfg = compose(
            config_name="config",
            overrides=[
                "task=mmlu_cs",
                "eval.tasks=[mmlu_cs,hellaswag]",
                "+eval.task_settings.mmlu_cs.data_dir=/data/mmlu",
            ],
        )
    assert spec_from_hydra(cfg).task.data_dir == "/data/mmlu"


def test_preflight_checks_every_evaluation_tasks_data_before_anything_loads(tmp_path):
    """What a sweep's launcher runs on every cell before it submits any: bad data is named by file and line."""
    from tinyablate.config import ConfigError
    from tinyablate.preflight import preflight

    (tmp_path / "hs").mkdir()
    bad = tmp_path / "hs" / "hellaswag_val.jsonl"
    bad.write_text('{"ctx_a": "a", "ctx_b": "b", "endings": ["x", "y"], "label": 2}\n')
    with pytest.raises(ConfigError, match=f"eval.tasks hellaswag: task data: {bad}:1: label 2 is out of range"):
        preflight(spec_for(tmp_path, tasks=["hellaswag"], settings={"hellaswag": {"data_dir": str(tmp_path / "hs")}}))
    bad.write_text((HELLASWAG_DIR / "hellaswag_val.jsonl").read_text())  # valid, but no train file to train on
    with pytest.raises(ConfigError, match="cannot train here.*has no hellaswag_train.jsonl"):
        preflight(spec_for(tmp_path, task=default_task_config("hellaswag", data_dir=str(tmp_path / "hs"))))
    preflight(spec_for(tmp_path, tasks=["mmlu_cs"]))  # from the Hub: checked when the cell runs, not here
