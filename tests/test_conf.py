"""Every YAML in conf/ composes into a valid CellSpec (one test per group option)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from hydra_plugins.tinyablate.conf import register, spec_from_hydra
from tinyablate.config import CellSpec, validate_spec

CONF = Path(__file__).resolve().parents[1] / "conf"
OPTIONS = sorted((p.parent.name, p.stem) for p in CONF.glob("*/*.yaml"))

register()


def compose_spec(overrides) -> CellSpec:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return validate_spec(spec_from_hydra(cfg))


def test_every_group_has_options():
    groups = {g for g, _ in OPTIONS}
    assert groups == {"model", "adapter", "algo", "task", "eval", "logger", "split", "slimming"}


def test_default_config_is_the_embedded_cell():
    spec = compose_spec([])
    assert (spec.model.name, spec.adapter.kind, spec.algo.name, spec.task.name) == (
        "smollm2-135m",
        "tinylora",
        "grpo",
        "arithmetic",
    )
    # the embedded default stays within 1,000 trainable parameters: 30 layers x 7 modules x u
    assert 30 * 7 * spec.adapter.u <= 1000


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_validates(group, option):
    spec = compose_spec([f"{group}={option}"])
    if group == "slimming":  # an adapter of sweeps/slimming.yaml: kind, r/u and quantization together
        kind, size = option.split("_")
        assert spec.adapter.kind == ("tinylora" if kind == "tinylora" else "lora")
        assert spec.model.quantization == ("nf4" if kind == "qlora" else "none")
        assert (spec.adapter.u if kind == "tinylora" else spec.adapter.r) == int(size[1:])
        return
    if group == "split":
        from tinyablate.shapes import adapter_size

        assert adapter_size("qwen2.5-7b", spec.adapter)[0] == 196  # matched total on Qwen2.5-7B
        return
    node = getattr(spec, group)
    if group in ("model",):
        assert node.name == option
    if group == "algo":
        assert node.name == option.split("_")[0]


def test_paper_settings_in_grpo_yaml():
    algo = compose_spec(["algo=grpo"]).algo
    assert (algo.num_generations, algo.prompts_per_step, algo.beta, algo.learning_rate) == (4, 64, 0.0, 1e-5)


def test_bad_override_names_the_field():
    with pytest.raises(Exception) as err:
        compose_spec(["adapter.sharing=diagonal"])
    assert "adapter.sharing" in str(err.value)
    with pytest.raises(Exception) as err:
        compose_spec(["adapter.r=two"])
    assert "r" in str(err.value)


def test_conf_yaml_of_each_task_is_its_default_config():
    """`task=<name>` composes what the library builds for <name> when it only has the name (eval.tasks)."""
    from tinyablate.config.task import TASK_DEFAULTS, default_task_config

    for name in TASK_DEFAULTS:
        if name != "arithmetic":  # conf/task/arithmetic.yaml is the embedded setting, not the class default
            assert compose_spec([f"task={name}"]).task == default_task_config(name), name
