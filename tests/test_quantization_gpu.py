"""A quantized base on CUDA (run on a CUDA machine: pytest -m gpu tests/test_quantization_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tinyablate.adapters import apply_adapter
from tinyablate.config import AdapterConfig, SVDConfig
from tinyablate.quantization import base_bytes, dense_weight, is_quantized_linear, quantize_base

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
bnb = pytest.importorskip("bitsandbytes")


def bf16_model():
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16).eval().requires_grad_(False)


@pytest.mark.parametrize(
    "quantization, kind", [("nf4", "lora"), ("nf4", "tinylora"), ("int8", "lora"), ("int8", "lora_xs")]
)
def test_adapters_train_on_a_quantized_base(quantization, kind):
    reference = bf16_model()
    model = bf16_model()
    quantize_base(model, quantization)
    assert all(
        is_quantized_linear(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"
    )
    assert base_bytes(model) < base_bytes(reference)
    q = model.model.layers[0].mlp.up_proj
    original = reference.model.layers[0].mlp.up_proj.weight.float()
    assert ((dense_weight(q).float() - original).norm() / original.norm()) < (0.12 if quantization == "nf4" else 0.012)
    adapter = apply_adapter(model, AdapterConfig(kind=kind, r=4, u=8, tie=1, svd=SVDConfig(cache_dir="")), "gpu-q")
    if kind == "lora":
        layer = adapter.model.base_model.model.model.layers[0].self_attn.q_proj
        assert type(layer).__module__ == "peft.tuners.lora.bnb"
    params = adapter.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0)).cuda()
    adapter.model.train()
    losses = []
    for _ in range(5):
        loss = adapter.model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in params)  # adapter.precision kept


@pytest.mark.parametrize("quantization, kind", [("nf4", "lora"), ("nf4", "tinylora"), ("nf4", "lora_xs")])
def test_graph_engine_on_a_quantized_base_replays_what_it_runs_eagerly(quantization, kind, capsys):
    """The generation engine's CUDA graphs over bitsandbytes 4-bit layers give the eager engine's tokens.
    (int8 layers cannot be captured: `auto` picks HF generate there, tinyablate/engine/settings.py.)"""
    from tinyablate.engine import EngineOptions, GenerationEngine

    model = bf16_model()
    quantize_base(model, quantization)
    adapter = apply_adapter(model, AdapterConfig(kind=kind, r=4, u=8, tie=1, svd=SVDConfig(cache_dir="")), "gpu-q")
    with torch.no_grad():  # a non-zero update, so the adapter is in the tokens
        for p in adapter.trainable_parameters():
            p.normal_(0, 0.05)
    gen = torch.Generator().manual_seed(3)
    ps = [torch.randint(1, 512, (int(n),), generator=gen).tolist() for n in torch.randint(3, 30, (8,), generator=gen)]
    graph = GenerationEngine(adapter.model, 0, [-1], use_graphs=True, options=EngineOptions(length_bucket=32))
    eager = GenerationEngine(adapter.model, 0, [-1], use_graphs=False, options=EngineOptions(length_bucket=32))
    eager.fixed_shapes = True
    eager.reserve(8, 96)
    ours = graph.generate(ps, 48)
    assert graph.graphs.table and ours == eager.generate(ps, 48)
    with capsys.disabled():
        print(f"\nengine on {quantization} + {kind}: graphs replay the eager tokens ({len(ps)} rows x 48)")
