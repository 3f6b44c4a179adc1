"""The GPU-hour cost model (tinyablate/cost.py): its arithmetic, its table, its calibration by completed cells."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from tinyablate import cost
from tinyablate.config import MODELS, AlgoConfig, CellSpec, EvalConfig, ModelConfig, TaskConfig
from tinyablate.config.model import SHAPES

# Round coefficients, so the expected seconds can be written by hand.
DEV = cost.DeviceThroughput(
    "test",
    train_flops_per_s=1e12,
    decode_s_per_layer=1e-3,
    dp_efficiency=0.8,
    cell_overhead_s=5.0,
    svd_s_per_module=0.5,
)


def spec(**kw) -> CellSpec:
    algo = kw.pop(
        "algo",
        AlgoConfig(max_steps=10, prompts_per_step=4, num_generations=2, micro_batch_size=8, max_completion_length=16),
    )
    return CellSpec(
        model=ModelConfig(name="tiny-qwen2"),
        task=TaskConfig(name="arithmetic", eval_size=10),
        algo=algo,
        eval=EvalConfig(batch_size=4, max_new_tokens=8),
        gpus=kw.pop("gpus", 1),
        **kw,
    )


def test_matmul_weights_of_the_shape_table_match_the_registry_parameter_counts():
    # untied models also hold an input embedding (vocab x hidden); tied ones hold it once, as the LM head
    for name in (
        "qwen2.5-7b",
        "qwen2.5-3b",
        "llama3.1-8b",
        "llama3.2-1b",
        "smollm2-135m",
        "qwen2.5-coder-0.5b",
        "qwen2.5-coder-1.5b",
    ):
        s = SHAPES[name]
        tied = name in ("qwen2.5-3b", "llama3.2-1b", "smollm2-135m")
        counted = cost._matmul_params(s) + (0 if tied else s.vocab * s.hidden)
        assert counted == pytest.approx(MODELS[name].n_params, rel=0.01), name


def test_grpo_cell_seconds_by_hand():
    s, c = SHAPES["tiny-qwen2"], spec()
    n = cost._matmul_params(s)
    tokens = cost.PROMPT_TOKENS["arithmetic"] + 16
    attn = 4 * s.layers * s.heads * s.head_dim * tokens * tokens / 2
    train_step = 8 * (4 * n * tokens + 3 * attn) / 1e12
    p = cost.PROMPT_TOKENS["arithmetic"]
    prefill = 8 * (2 * n * p + 4 * s.layers * s.heads * s.head_dim * p * p / 2) / 1e12
    rollout_step = prefill + 16 * s.layers * 1e-3
    est = cost.estimate_cell(c, DEV)
    assert est.parts["train"] == pytest.approx(10 * train_step)
    assert est.parts["rollout"] == pytest.approx(10 * rollout_step)
    assert est.parts["setup"] == pytest.approx(5.0 + 0.5 * 2 * 7)  # 2 layers x 7 projections adapted
    eval_prefill = 10 * (2 * n * p + 4 * s.layers * s.heads * s.head_dim * p * p / 2) / 1e12
    assert est.parts["eval"] == pytest.approx(eval_prefill + math.ceil(10 / 4) * 8 * s.layers * 1e-3)
    assert est.gpu_hours == pytest.approx(est.wall_s / 3600) and est.wall_s == pytest.approx(sum(est.parts.values()))


def test_gpus_split_training_and_evaluation_but_not_decode_steps():
    one, two = cost.estimate_cell(spec(gpus=1), DEV), cost.estimate_cell(spec(gpus=2), DEV)
    assert two.parts["train"] == pytest.approx(one.parts["train"] / (2 * 0.8))
    assert two.parts["rollout"] < one.parts["rollout"]  # half the prefill per rank...
    decode = 10 * 16 * 2 * 1e-3
    assert two.parts["rollout"] > decode  # ...the same decode steps
    assert two.gpu_hours == pytest.approx(2 * two.wall_s / 3600)
    assert cost.estimate_cell(spec(gpus=0), DEV).gpu_hours == 0


def test_sft_has_no_rollout_and_trains_prompt_plus_answer_tokens():
    algo = AlgoConfig(name="sft", max_steps=3, prompts_per_step=8, micro_batch_size=8, max_length=64)
    est = cost.estimate_cell(spec(algo=algo), DEV)
    s = SHAPES["tiny-qwen2"]
    length = min(64, cost.PROMPT_TOKENS["arithmetic"] + cost.ANSWER_TOKENS["arithmetic"])
    assert est.parts["rollout"] == 0
    assert est.parts["train"] == pytest.approx(3 * 8 * cost._train_flops_per_seq(s, length) / 1e12)


def test_num_iterations_samples_once_per_k_steps():
    base = spec()
    k2 = spec(algo=replace(base.algo, num_iterations=2))
    a, b = cost.estimate_cell(base, DEV), cost.estimate_cell(k2, DEV)
    assert b.parts["rollout"] == pytest.approx(a.parts["rollout"] / 2)
    assert b.parts["train"] == pytest.approx(a.parts["train"] * 1.25)


def test_derive_inverts_the_measurements():
    m = {
        "train": {"model": "qwen2.5-7b", "layers": 8, "sequences": 8, "tokens_per_sequence": 512, "seconds": 0.1},
        "decode": {
            "model": "qwen2.5-7b",
            "layers": 8,
            "batch": 64,
            "prompt_tokens": 32,
            "new_tokens": 128,
            "seconds": 1.0,
        },
        "data_parallel": {"gpus": 2, "train_s_1": 6.0, "train_s_n": 4.0},
        "overhead": {"seconds": 5.0},
        "svd": {"seconds_per_module": 0.03},
    }
    dev = cost.derive("x", m)
    shape = replace(SHAPES["qwen2.5-7b"], layers=8)
    # the derived rates reproduce the measured seconds
    assert cost.training_seconds(shape, dev, 8, 512) == pytest.approx(0.1)
    rollout, _ = cost.grpo_step(shape, dev, 64, 32, 128)
    assert rollout == pytest.approx(1.0)
    assert dev.dp_efficiency == pytest.approx(0.75)


def test_the_shipped_table_cites_every_measurement_and_derives():
    table = cost.load_table()
    assert {"h100", "h200"} <= set(table.kinds())
    for kind in table.kinds():
        for name, m in table.data["devices"][kind].items():
            assert m.get("source") and m.get("date") and m.get("device"), (kind, name)
        dev = table.device(kind)
        assert dev.train_flops_per_s > 0 and dev.decode_s_per_layer > 0 and 0 < dev.dp_efficiency <= 1
    with pytest.raises(ValueError, match="known: h100, h200"):
        table.device("a100")


def test_record_measurement_replaces_one_entry(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(cost.load_table().data))
    cost.record_measurement(
        path,
        "h200",
        "train",
        {
            "model": "qwen2.5-7b",
            "sequences": 1,
            "tokens_per_sequence": 100,
            "seconds": 1.0,
            "source": "x",
            "date": "d",
            "device": "H200",
        },
    )
    data = json.loads(path.read_text())
    assert data["devices"]["h200"]["train"]["seconds"] == 1.0
    assert data["devices"]["h200"]["decode"] == cost.load_table().data["devices"]["h200"]["decode"]


def test_calibration_measured_then_calibrated_then_model():
    a = spec()
    other_steps = spec(algo=replace(a.algo, max_steps=20))
    other_model = replace(spec(), model=ModelConfig(name="tiny-llama"))
    modelled = cost.estimate_cell(a, DEV).gpu_hours
    out = cost.calibrate([a, other_steps, other_model, spec(gpus=0)], [(a, 3 * modelled)], DEV)
    assert [e.source for e in out] == ["measured", "calibrated", "model", "cpu"]
    assert out[0].gpu_hours == pytest.approx(3 * modelled) and out[0].n == 1
    assert out[1].factor == pytest.approx(3) and out[1].gpu_hours == pytest.approx(
        3 * cost.estimate_cell(other_steps, DEV).gpu_hours
    )
    assert out[2].gpu_hours == pytest.approx(cost.estimate_cell(other_model, DEV).gpu_hours)
    assert "measured" in out[0].label() and "calibrated on 1 completed cell" in out[1].label()


def test_the_adapter_size_does_not_change_the_kind():
    a = spec()
    b = replace(a, adapter=replace(a.adapter, u=64))
    assert cost.cost_kind(a) == cost.cost_kind(b)
    assert cost.cost_kind(a) != cost.cost_kind(replace(a, gpus=2))


def test_cost_module_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, tinyablate.cost; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dp_bench_writes_the_measurements_the_model_derives_from(tmp_path):
    from types import SimpleNamespace

    from benchmarks.dp_bench import throughput_entries

    report = {
        "device": "NVIDIA H200",
        "date": "2026-12-02",
        "argv": ["--device", "cuda"],
        "rows": [
            {"world_size": 1, "sampler": "torch", "rollout_s": 5.0, "train_s": 6.0},
            {"world_size": 2, "sampler": "torch", "rollout_s": 4.9, "train_s": 3.2},
            {"world_size": 1, "sampler": "keyed", "rollout_s": 9.0, "train_s": 9.0},
            {"world_size": 1, "sampler": "torch", "engine": "graph", "rollout_s": 2.0, "train_s": 6.1},
        ],
    }
    args = SimpleNamespace(shape="qwen2.5-7b", layers=28, prompts=64, generations=4, prompt_len=128, new_tokens=256)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(cost.load_table().data))
    kind = cost.device_kind(report["device"])
    for name, m in throughput_entries(report, args).items():
        cost.record_measurement(path, kind, name, m)
    assert kind == "h200" and cost.device_kind("NVIDIA H100 80GB HBM3") == "h100"
    dev = cost.load_table(path).device("h200")
    shape = SHAPES["qwen2.5-7b"]
    rollout, train = cost.grpo_step(shape, dev, 256, 128, 256)
    assert rollout == pytest.approx(5.0) and train == pytest.approx(6.0)
    assert cost.grpo_step(shape, dev, 256, 128, 256, engine="graph")[0] == pytest.approx(2.0)
    assert dev.dp_efficiency == pytest.approx(6.0 / 6.4)


def test_the_engine_setting_picks_the_decode_rate_and_the_eval_batch():
    """On CUDA "auto"/"graph" price rollouts and evaluation at the graph engine's rate where it was measured."""
    fast = replace(DEV, engine_decode_s_per_layer=2e-4)
    hf_cell = replace(
        spec(algo=replace(spec().algo, rollout_engine="hf")),
        eval=EvalConfig(batch_size=4, max_new_tokens=8, engine="hf"),
    )
    auto, hf = cost.estimate_cell(spec(), fast), cost.estimate_cell(hf_cell, fast)
    decode_hf, decode_engine = 10 * 16 * 2 * 1e-3, 10 * 16 * 2 * 2e-4  # steps x tokens x layers x rate
    assert hf.parts["rollout"] - auto.parts["rollout"] == pytest.approx(decode_hf - decode_engine)
    # 10 problems: HF in batches of 4 (3 batches), the engine in one batch of engine_batch_size
    prefill = auto.parts["eval"] - 8 * 2 * 2e-4
    assert hf.parts["eval"] - prefill == pytest.approx(3 * 8 * 2 * 1e-3)
    assert cost.cost_kind(spec()) != cost.cost_kind(hf_cell)
    # a kind without an engine measurement prices every setting at HF generate's rate
    assert cost.estimate_cell(spec(), DEV).parts == cost.estimate_cell(hf_cell, DEV).parts
    table = cost.load_table()
    assert table.device("h200").engine_decode_s_per_layer < table.device("h200").decode_s_per_layer
    assert table.device("h100").engine_decode_s_per_layer is None


def test_multiple_choice_evaluation_is_one_forward_per_row():
    """mmlu_cs: one row per question (the letters share it); hellaswag: four rows (its endings)."""
    from tinyablate.config.task import default_task_config

    s = SHAPES["tiny-qwen2"]
    for name, rows in (("mmlu_cs", 412), ("hellaswag", 4 * 10042)):
        task = default_task_config(name)
        c = replace(spec(), task=task, train=False)
        forward = cost._forward_flops_per_seq(s, cost.prompt_tokens(task)) / 1e12
        assert cost.estimate_cell(c, DEV).parts["eval"] == pytest.approx(rows * forward), name
    few = default_task_config("mmlu_cs", num_fewshot=5)
    assert cost.prompt_tokens(few) == 6 * cost.PROMPT_TOKENS["mmlu_cs"]


def test_every_task_of_eval_tasks_adds_its_evaluation_and_its_kind():
    from tinyablate.config.task import default_task_config

    alone = spec()
    more = replace(alone, eval=replace(alone.eval, tasks=["mmlu_cs"]))
    extra = cost.eval_seconds(more, SHAPES["tiny-qwen2"], DEV, task=default_task_config("mmlu_cs"))
    assert extra > 0
    assert cost.estimate_cell(more, DEV).parts["eval"] == pytest.approx(
        cost.estimate_cell(alone, DEV).parts["eval"] + extra
    )
    assert cost.estimate_cell(more, DEV).base_eval_s > cost.estimate_cell(alone, DEV).base_eval_s
    assert cost.cost_kind(more) != cost.cost_kind(alone)
    nf4 = replace(alone, model=replace(alone.model, quantization="nf4"))
    assert cost.cost_kind(nf4) != cost.cost_kind(alone)  # priced alike, measured apart
