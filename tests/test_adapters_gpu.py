"""GPU checks of the fused path (run on a CUDA machine: pytest -m gpu tests/test_adapters_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from tinyablate.adapters import apply_adapter
from tinyablate.config import AdapterConfig, SVDConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def model_on_gpu(dtype):
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return Qwen2ForCausalLM(cfg).to("cuda", dtype).eval()


def run(dtype, forward):
    model = model_on_gpu(dtype)
    adapter = apply_adapter(
        model, AdapterConfig(kind="tinylora", r=2, u=8, forward=forward, svd=SVDConfig(cache_dir="")), "gpu-test"
    )
    with torch.no_grad():
        for i, p in enumerate(adapter.trainable_parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(p) * 0.3)
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0)).cuda()
    logits = model(ids).logits
    logits.float().pow(2).mean().backward()
    return logits.float().detach(), torch.cat([p.grad.float().flatten() for p in adapter.trainable_parameters()])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_fused_matches_unmerged_on_gpu(dtype, tol):
    out_f, g_f = run(dtype, "fused")
    out_u, g_u = run(dtype, "unmerged")
    rel_out = ((out_f - out_u).norm() / out_u.norm()).item()
    rel_grad = ((g_f - g_u).norm() / g_u.norm()).item()
    print(f"{dtype}: relative logits diff {rel_out:.2e}, relative grad diff {rel_grad:.2e}")
    assert rel_out < tol and rel_grad < 10 * tol


def test_triton_merge_matches_float64():
    from tinyablate.adapters.triton_merge import kernel_available, merge_into

    gen = torch.Generator().manual_seed(0)
    for d, k, r in [(3584, 3584, 2), (512, 18944, 4), (1000, 777, 1), (130, 70, 16)]:
        W = torch.randn(d, k, generator=gen).to("cuda", torch.bfloat16)
        am = torch.randn(d, r, generator=gen).cuda() * 0.01
        b = torch.randn(r, k, generator=gen).cuda()
        assert kernel_available(W, r)
        out = torch.full_like(W, float("nan"))
        merge_into(out, W, am, b)
        ref = W.double() + am.double() @ b.double()
        assert not out.isnan().any()
        # fp32 accumulation, then one rounding to bf16: within half a bf16 ulp (<= 2^-8 relative)
        # of the exact value, plus fp32 accumulation error on the magnitudes of the summands
        scale = W.double().abs() + am.double().abs() @ b.double().abs()
        err = (out.double() - ref).abs()
        assert (err <= ref.abs() * 2**-8 + scale * 2**-20).all(), err.max()
