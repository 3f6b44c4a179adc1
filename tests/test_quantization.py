"""A quantized frozen base (model.quantization) through bitsandbytes, on CPU: what runs, what is refused,
TinyLoRA/LoRA-XS on the dequantized weight, QLoRA through PEFT, and cells end to end."""

from __future__ import annotations

import dataclasses
import importlib.metadata

import pytest
import torch

from tinyablate.adapters import apply_adapter
from tinyablate.config import AdapterConfig, ModelConfig
from tinyablate.models import load_model_and_tokenizer
from tinyablate.quantization import (
    QuantizationNotSupported,
    base_bytes,
    check_supported,
    dense_weight,
    is_quantized_linear,
)

bnb = pytest.importorskip(
    "bitsandbytes", reason="model.quantization needs bitsandbytes (pip install 'tinyablate[quant]')"
)


def tiny(quantization="none", family="tiny-qwen2"):
    model, tokenizer, _ = load_model_and_tokenizer(ModelConfig(name=family, device="cpu", quantization=quantization))
    return model, tokenizer


# --- what is refused, before loading ------------------------------------------------------------
def test_unsupported_device_is_refused_before_loading(monkeypatch):
    import tinyablate.models as models

    monkeypatch.setattr(models, "build_tiny_model", lambda *a, **k: pytest.fail("loaded weights"))
    monkeypatch.setattr(models, "resolve_device", lambda spec: torch.device("mps"))
    with pytest.raises(QuantizationNotSupported, match="runs on cpu and cuda only.*not on mps"):
        load_model_and_tokenizer(ModelConfig(name="tiny-qwen2", quantization="nf4"))


def test_missing_or_untested_bitsandbytes_says_what_to_install(monkeypatch):
    real = importlib.metadata.version

    def missing(name):
        if name == "bitsandbytes":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(QuantizationNotSupported, match=r"not installed: pip install 'tinyablate\[quant\]'"):
        check_supported("int8", "cpu")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.44.1" if name == "bitsandbytes" else real(name))
    with pytest.raises(QuantizationNotSupported, match="bitsandbytes 0.44.1 is installed, but only 0.50.x is tested"):
        check_supported("nf4", torch.device("cpu"))
    check_supported("none", "mps")  # nothing to check


def test_quantization_value_is_validated():
    with pytest.raises(ValueError, match="model.quantization"):
        ModelConfig(quantization="fp4").validate()


# --- what runs on CPU -----------------------------------------------------------------------------
@pytest.mark.parametrize("quantization, bound", [("nf4", 0.12), ("int8", 0.012)])
def test_quantized_base_on_cpu_and_its_error(quantization, bound):
    """Every linear layer but lm_head is quantized; the dequantized weights stay within the stated
    relative error of the originals (measured: nf4 ≈ 0.09, int8 ≈ 0.007 in Frobenius norm), and the
    model runs forward and backward to its input on CPU."""
    dense, tokenizer = tiny()
    model, _ = tiny(quantization)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(is_quantized_linear(m) for n, m in linears.items() if n != "lm_head")
    assert not is_quantized_linear(model.lm_head) and model.lm_head.weight.dtype == torch.float32
    for name, module in linears.items():
        if name != "lm_head":
            original = dense.get_submodule(name).weight
            error = (dense_weight(module).float() - original).norm() / original.norm()
            assert error < bound, (name, float(error))
    ids = tokenizer("What is 2 + 3?", return_tensors="pt")["input_ids"]
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    logits.sum().backward()
    assert torch.isfinite(logits).all() and embeds.grad is not None
    reference = dense(input_ids=ids).logits
    assert ((logits - reference).norm() / reference.norm()) < 2 * bound


def test_nf4_trains_after_an_evaluation_pass():
    """A cell evaluates (eval mode, no grad) before it trains: bitsandbytes' CPU repacking of 4-bit weights
    for inference would make the training forward fail afterwards; quantize_base turns it off."""
    model, tokenizer = tiny("nf4")
    ids = tokenizer("What is 2 + 3?", return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.train()
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    logits.sum().backward()
    assert embeds.grad is not None and torch.allclose(logits, before, atol=1e-5)


def test_base_bytes_count_packed_weights_and_statistics():
    dense, _ = tiny()
    model, _ = tiny("nf4")
    linear = [m for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    n_weights = sum(m.weight.numel() for m in linear)
    rest = base_bytes(dense) - 4 * n_weights  # embeddings, norms, lm_head: unchanged
    packed = n_weights // 2  # two 4-bit values a byte
    got = base_bytes(model) - rest
    # double quantization: one 8-bit scale per 64 weights, one fp32 scale per 256 of those, two codebooks
    assert (
        packed + n_weights // 64 <= got <= packed + n_weights // 64 + n_weights // (64 * 256) * 4 + 4096 * len(linear)
    )
    int8, _ = tiny("int8")
    rows = sum(m.weight.shape[0] for m in linear)
    assert base_bytes(int8) - rest == n_weights + 4 * rows  # one byte a weight, one fp32 scale a row


@pytest.mark.parametrize("kind", ["tinylora", "lora_xs"])
def test_svd_adapters_use_the_dequantized_weight_and_add_their_update(kind):
    model, tokenizer = tiny("nf4")
    cfg = AdapterConfig(kind=kind, r=2, u=3, tie=1)
    name = "model.layers.0.self_attn.q_proj"
    W = dense_weight(model.get_submodule(name)).double()
    adapter = apply_adapter(model, cfg, "tiny-nf4-test")
    layer = adapter.layers[name]
    U, S, Vh = torch.linalg.svd(W)
    A, B = layer.A.double(), layer.B.double()
    assert torch.allclose(A @ B, (U[:, :2] * S[:2]) @ Vh[:2], atol=1e-5)  # W's top-2 part: from the dequantized W
    x = torch.randn(3, layer.in_features)
    base_out = layer._quantized_base[0](x)
    assert torch.equal(layer(x), base_out)  # v = 0: the quantized base exactly
    with torch.no_grad():
        layer.v.normal_()
    expected = base_out.double() + x.double() @ layer.delta_weight(torch.float64).t()
    assert torch.allclose(layer(x).double(), expected, atol=1e-5)
    layer(x).sum().backward()
    assert layer.v.grad is not None and layer.v.grad.abs().sum() > 0
    with adapter.disabled():
        assert torch.equal(layer(x), base_out)
    with pytest.raises(NotImplementedError, match="re-quantize"):
        adapter.merge()


def test_qlora_uses_pefts_bitsandbytes_layers_and_exports_for_the_unquantized_base(tmp_path):
    from peft import PeftModel

    model, _ = tiny("nf4")
    adapter = apply_adapter(model, AdapterConfig(kind="lora", r=4), "tiny-nf4-test")
    layer = adapter.model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__module__ == "peft.tuners.lora.bnb" and type(layer).__name__ == "Linear4bit"
    with torch.no_grad():
        for n, p in adapter.model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    adapter.export_peft(tmp_path / "adapter")
    dense, _ = tiny()
    loaded = PeftModel.from_pretrained(dense, str(tmp_path / "adapter"))
    exported = {n: p for n, p in adapter.model.named_parameters() if "lora_" in n}
    for n, p in loaded.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, exported[n])
    assert len(exported) == 2 * 14


# --- cells ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantization, kind", [("nf4", "lora"), ("int8", "tinylora")])
def test_quantized_cell_end_to_end(tmp_path, quantization, kind):
    from tinyablate.cell import run_cell
    from tinyablate.config import AlgoConfig, CellSpec, EvalConfig, LoggerConfig, TaskConfig, cell_id

    spec = CellSpec(
        model=ModelConfig(name="tiny-qwen2", cache_dir=str(tmp_path / "cache"), quantization=quantization),
        adapter=AdapterConfig(kind=kind, r=2, u=3, tie=2),
        task=TaskConfig(name="arithmetic", max_value=9, train_size=40, eval_size=8, scorer="flexible"),
        algo=AlgoConfig(
            name="sft",
            max_steps=2,
            learning_rate=1e-2,
            prompts_per_step=4,
            micro_batch_size=2,
            max_length=96,
            save_steps=2,
        ),
        eval=EvalConfig(batch_size=8, max_new_tokens=8),
        logger=LoggerConfig(mode="disabled"),
        output_dir=str(tmp_path / "runs"),
        sweep="quant",
    )
    result = run_cell(spec)
    assert result["status"] == "completed" and result["metrics"]["train_steps"] == 2
    assert result["model"]["quantization"] == quantization and quantization in cell_id(spec)
    adapter = result["adapter"]  # adapter.precision (fp32) kept: TRL would cast a quantized model's to bf16
    assert adapter["trainable_bytes"] == 4 * adapter["trainable_params"] > 0
    dense_bytes = base_bytes(tiny()[0])
    assert 0 < result["model"]["base_bytes"] < dense_bytes
    assert result["model"]["model_id"].endswith(f"+{quantization}")
    plain = dataclasses.replace(spec, model=dataclasses.replace(spec.model, quantization="none"))
    assert cell_id(plain) != cell_id(spec) and "none" not in cell_id(plain)


def test_qlora_bench_runs_on_cpu(tmp_path):
    import json

    from benchmarks.qlora_bench import main

    report = main(
        [
            "--device",
            "cpu",
            "--shape",
            "small",
            "--layers",
            "1",
            "--seq",
            "16",
            "--batch",
            "1",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    none, nf4 = report["rows"]
    assert (none["base"], nf4["base"]) == ("none", "nf4") and nf4["base_bytes"] < none["base_bytes"]
    assert none["trainable_params"] == nf4["trainable_params"] > 0 and nf4["step_s"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["rows"][1]["base"] == "nf4"
