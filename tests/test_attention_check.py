"""The attention check (tinyablate/train/attention_check.py) on CPU: its cases and float32 reference agree with
torch's math kernel, a backend with the cuDNN fault (NaN query gradient at key lengths 64 mod 128 under a mask,
on low log-sum-exp rows) is caught, and training then runs without it; on the GPU: tests/test_cell_gpu.py."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from tinyablate.train import attention_check as A


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_the_math_kernel_passes_every_case(dtype, head_dim):
    assert A.backend_problem(SDPBackend.MATH, torch.device("cpu"), dtype, head_dim) is None


def test_the_low_lse_case_really_has_rows_below_the_overflow_threshold():
    q, k, _, mask, _, _ = A._low_lse_rows("cpu", torch.float32, 64, 192)
    scores = (q @ k.transpose(-1, -2) / 8).masked_fill(~mask, float("-inf"))
    assert torch.logsumexp(scores, dim=-1).max() < -88.7


def _cudnn_fault(q, k, v, attn_mask=None, **kw):
    """SDPA with the cuDNN bug's signature: a NaN query gradient when a mask is passed, the key length is
    64 mod 128 and a row's log-sum-exp is below -88.7."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **kw)
    scores = (q @ k.transpose(-1, -2)).float() / q.shape[-1] ** 0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    low = torch.logsumexp(scores, dim=-1) < -88.7
    if attn_mask is None or k.shape[-2] % 128 != 64 or not low.any():
        return out
    return out + _nan_grad(q, low)  # the output is right; the query gradient of the low rows is NaN


def _nan_grad(q, low):
    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return torch.zeros_like(x)

        @staticmethod
        def backward(ctx, g):
            return torch.where(low[..., None], torch.full_like(g, float("nan")), torch.zeros_like(g))

    return NanGrad.apply(q)


def test_a_backend_with_the_cudnn_fault_is_caught_naming_case_and_length(monkeypatch):
    monkeypatch.setattr(A, "F", types.SimpleNamespace(scaled_dot_product_attention=_cudnn_fault))
    problem = A.backend_problem(SDPBackend.MATH, torch.device("cpu"), torch.bfloat16, 64)
    assert problem.startswith("low log-sum-exp rows under a mask, key length 192: ")
    assert "non-finite values in grad_q" in problem


def test_fully_masked_rows_that_poison_the_gradients_are_caught(monkeypatch):
    def nan_on_empty_rows(q, k, v, attn_mask=None, **kw):  # softmax over no key, as an unguarded kernel does
        scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        return torch.softmax(scores.masked_fill(~attn_mask, float("-inf")), dim=-1) @ v

    monkeypatch.setattr(A, "F", types.SimpleNamespace(scaled_dot_product_attention=nan_on_empty_rows))
    problem = A.backend_problem(SDPBackend.MATH, torch.device("cpu"), torch.float32, 64)
    assert problem.startswith("left padding, key length 192: ") and "non-finite" in problem


def test_training_runs_without_a_failing_backend_and_says_so_once(monkeypatch):
    monkeypatch.setattr(A, "_REPORTS", {})
    monkeypatch.setattr(A, "_device_name", lambda device: "FakeGPU")
    fails = {SDPBackend.CUDNN_ATTENTION: "left padding, key length 192: 3 non-finite values in grad_q"}
    monkeypatch.setattr(A, "backend_problem", lambda backend, *a: fails.get(backend))
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    model.config = types.SimpleNamespace(hidden_size=128, num_attention_heads=2)
    lines = []
    assert torch.backends.cuda.cudnn_sdp_enabled()
    for _ in range(2):
        with A.checked_attention(model, torch.device("cuda"), lines.append) as report:
            assert not torch.backends.cuda.cudnn_sdp_enabled()
            assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after training
    assert report.failed == {"cudnn_attention": fails[SDPBackend.CUDNN_ATTENTION]}
    assert report.kept == ["flash_attention", "efficient_attention", "math"]
    assert lines == [
        "attention check on FakeGPU: training runs without cudnn_attention (left padding, key length 192: "
        "3 non-finite values in grad_q); kept: flash_attention, efficient_attention, math"
    ]


def test_the_check_can_be_switched_off_and_is_a_no_op_on_cpu(monkeypatch):
    monkeypatch.setattr(A, "_REPORTS", {})
    monkeypatch.setattr(A, "_device_name", lambda device: "FakeGPU")
    monkeypatch.setenv(A.ATTENTION_CHECK_ENV, "off")
    model = torch.nn.Linear(2, 2)
    model.config = types.SimpleNamespace(hidden_size=128, num_attention_heads=2, head_dim=64)
    with A.checked_attention(model, torch.device("cuda"), print) as report:
        assert report.skipped and torch.backends.cuda.cudnn_sdp_enabled()
    with A.checked_attention(model, torch.device("cpu"), print) as report:
        assert report is None


def test_an_unknown_switch_value_is_refused_before_anything_loads(monkeypatch, tmp_path):
    from tinyablate.config import CellSpec, ConfigError
    from tinyablate.preflight import preflight

    monkeypatch.setenv(A.ATTENTION_CHECK_ENV, "of")
    spec = CellSpec(output_dir=str(tmp_path / "runs"), gpus=0)
    with pytest.raises(ConfigError, match="TINYABLATE_ATTENTION_CHECK='of' is invalid: expected 'on' or 'off'"):
        preflight(spec)
