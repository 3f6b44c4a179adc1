"""Which of torch's attention kernels (SDPA backends) training may use on this GPU: checked once per process.

    with checked_attention(model, device) as report:   # around trainer.train(); report.line says what it kept
        trainer.train()

Why: on H100/H200 with torch 2.11 and cuDNN 9.19 (benchmarks/RESULTS.md, "cuDNN attention"), the cuDNN SDPA
backward returns NaN in the query gradient when an explicit attention mask is passed (transformers passes one
whenever a batch is padded), the key length is 64 modulo 128, and a query row's log-sum-exp is below
-ln(FLT_MAX) ~ -88.7: the padded half of its last 128-key tile is scored 0 instead of -inf and exp(0 - lse)
overflows (pytorch/pytorch#196678, a fix in later cuDNN). Qwen2.5's "massive activation" heads give such rows,
so every Qwen SFT cell failed at step 1; a fully masked row (left padding) has lse = -inf and fails the same way.

So before training on CUDA, every SDPA backend this process has enabled runs a tiny forward and backward (bf16 or
the model's dtype, its head size) on the patterns known to break one — rows of log-sum-exp ~ -120 under a mask,
left-padded rows — at key lengths 64 mod 128 and a multiple of 128, against a float32 reference. A backend whose
gradients are non-finite or off is disabled for the training that follows (`torch.nn.attention.sdpa_kernel`),
and the cell says so once; a backend that cannot take an input (flash with a mask) is no failure: the
dispatcher skips it for such inputs too. The same check serves any torch and cuDNN a user has: a fixed
library passes and keeps its kernels. ``TINYABLATE_ATTENTION_CHECK=off`` skips it (benchmarks and
reproductions of the failure only).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config.algo import ATTENTION_CHECK_ENV, attention_check_on
from ..kernels import head_dim

# The backends checked, by the flag that enables each in this process (torch.backends.cuda).
_BACKENDS = {
    SDPBackend.CUDNN_ATTENTION: "cudnn_sdp_enabled",
    SDPBackend.FLASH_ATTENTION: "flash_sdp_enabled",
    SDPBackend.EFFICIENT_ATTENTION: "mem_efficient_sdp_enabled",
}
_KEY_LENGTHS = (192, 256)  # 64 mod 128 (the cuDNN bug) and a multiple of 128
_LOW_LSE_LOGIT = -120.0  # every scaled logit of a low row: its log-sum-exp is far below -88.7
_TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 6e-2, torch.float16: 2e-2}  # max |err| / max |reference|


@dataclass
class AttentionReport:
    """What the check found: the backends kept, and each dropped one with the case that failed it."""

    device: str
    kept: list = field(default_factory=list)  # backend names training may use (math always)
    failed: dict = field(default_factory=dict)  # backend name -> "case: what went wrong"
    skipped: bool = False  # TINYABLATE_ATTENTION_CHECK=off

    @property
    def line(self) -> str:
        if self.skipped:
            return (
                f"attention check skipped ({ATTENTION_CHECK_ENV}=off): training uses torch's SDPA backends as enabled"
            )
        if not self.failed:
            return f"attention check on {self.device}: every enabled SDPA backend passed ({', '.join(self.kept)})"
        why = "; ".join(f"{name} ({reason})" for name, reason in self.failed.items())
        return f"attention check on {self.device}: training runs without {why}; kept: {', '.join(self.kept)}"

    def as_dict(self) -> dict:
        return {"device": self.device, "kept": self.kept, "failed": self.failed, "skipped": self.skipped}


_REPORTS: dict = {}  # (device, dtype, head_size) -> AttentionReport: one check per process and setting


def check_attention(device: torch.device, dtype: torch.dtype, head_size: int, log=None) -> AttentionReport:
    """Run (once per process for this device, dtype and head size) the backward check of every enabled backend;
    `log` is told its verdict the time it runs."""
    key = (str(device), dtype, head_size)
    if key not in _REPORTS:
        _REPORTS[key] = _run_check(device, dtype, head_size)
        if log is not None:
            log(_REPORTS[key].line)
    return _REPORTS[key]


def _run_check(device: torch.device, dtype: torch.dtype, head_size: int) -> AttentionReport:
    report = AttentionReport(device=_device_name(device))
    if not attention_check_on():
        report.skipped = True
        return report
    for backend, flag in _BACKENDS.items():
        if not getattr(torch.backends.cuda, flag)():
            continue  # disabled in this process already: not ours to judge
        problem = backend_problem(backend, device, dtype, head_size)
        if problem:
            report.failed[backend.name.lower()] = problem
        else:
            report.kept.append(backend.name.lower())
    report.kept.append("math")
    return report


def backend_problem(backend: SDPBackend, device, dtype, head_size: int) -> Optional[str]:
    """None when `backend` gives finite gradients close to the float32 reference on every case it accepts."""
    for name, case in CASES.items():
        for length in _KEY_LENGTHS:
            q, k, v, mask, grad_out, rows = case(device, dtype, head_size, length)
            try:
                with sdpa_kernel([backend]):
                    got = _forward_backward(q, k, v, mask, grad_out)
            except RuntimeError:  # no kernel of this backend takes these inputs: the dispatcher skips it too
                continue
            want = _forward_backward(*(t.float() for t in (q, k, v)), mask, grad_out.float(), reference=True)
            problem = _compare(got, want, rows, _TOLERANCE.get(dtype, 6e-2), shifted=case is _low_lse_rows)
            if problem:
                return f"{name}, key length {length}: {problem}"
    return None


def _forward_backward(q, k, v, mask, grad_out, reference: bool = False) -> tuple:
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    if reference:  # plain float32 attention; a masked logit is a large finite negative (no NaN on a fully masked row)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        out = torch.softmax(scores.masked_fill(~mask, -1e30), dim=-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def _compare(got: tuple, want: tuple, rows: torch.Tensor, tolerance: float, shifted: bool = False) -> Optional[str]:
    """Outputs and query gradients on the valid rows, key and value gradients everywhere, all finite and close.
    `shifted` (the low log-sum-exp case): the query gradient's first coordinate is checked for finiteness only:
    it is -120 x (the sum of a row's score gradients, 0 in exact arithmetic), so any bf16 rounding is magnified
    120-fold there, for every kernel alike."""
    for label, a, b, valid_only in zip(("output", "grad_q", "grad_k", "grad_v"), got, want, (True, True, False, False)):
        a = a.float()
        if valid_only:
            a, b = a[rows], b[rows]
        if not torch.isfinite(a).all():
            return f"{int((~torch.isfinite(a)).sum())} non-finite values in {label}"
        if shifted and label == "grad_q":
            a, b = a[..., 1:], b[..., 1:]
        scale = b.abs().max().clamp_min(1e-6)
        err = ((a - b).abs().max() / scale).item()
        if err > tolerance:
            return f"{label} off by {err:.2g} of its scale (tolerance {tolerance:g})"
    return None


def _low_lse_rows(device, dtype, head_size: int, length: int) -> tuple:
    """Every query anti-aligned with every key (scaled logits ~ -120): each row's log-sum-exp is ~ -115;
    a causal mask passed as a tensor, as transformers does."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, 2, length, head_size, generator=g) * 0.1
    k = torch.randn(1, 2, length, head_size, generator=g) * 0.1
    q[..., 0], k[..., 0] = 1.0, _LOW_LSE_LOGIT * math.sqrt(head_size)
    v = torch.randn(1, 2, length, head_size, generator=g)
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    grad_out = torch.randn(1, 2, length, head_size, generator=g)
    rows = torch.ones(1, 2, length, dtype=torch.bool)
    return (*(t.to(device, dtype) for t in (q, k, v)), mask.to(device), grad_out.to(device, dtype), rows.to(device))


def _left_padded_rows(device, dtype, head_size: int, length: int) -> tuple:
    """Two sequences, the second left-padded by a third of the length: its pad queries see no key (fully masked
    rows, log-sum-exp = -inf), as in a left-padded GRPO batch; their output gradient is zero, as in training."""
    g = torch.Generator(device="cpu").manual_seed(1)
    q, k, v, grad_out = (torch.randn(2, 2, length, head_size, generator=g) for _ in range(4))
    pad = length // 3
    keys = torch.ones(2, length, dtype=torch.bool)
    keys[1, :pad] = False
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & keys[:, None, None, :]
    rows = keys[:, None, :].expand(2, 2, length)
    grad_out = grad_out * rows[..., None]
    return (*(t.to(device, dtype) for t in (q, k, v)), mask.to(device), grad_out.to(device, dtype), rows.to(device))


CASES: dict[str, Callable] = {"low log-sum-exp rows under a mask": _low_lse_rows, "left padding": _left_padded_rows}


@contextlib.contextmanager
def checked_attention(model, device: torch.device, log: Callable[[str], None] = print) -> Iterator:
    """Training's attention on `device` restricted to the SDPA backends that pass the check (said once per
    process); on a CPU nothing changes. Yields the report (None on a CPU)."""
    if device.type != "cuda":
        yield None
        return
    report = check_attention(device, next(model.parameters()).dtype, head_dim(model.config), log)
    if report.skipped or not report.failed:
        yield report
        return
    with sdpa_kernel([getattr(SDPBackend, name.upper()) for name in report.kept]):
        yield report


def _device_name(device: torch.device) -> str:
    props = torch.cuda.get_device_properties(device)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return f"{props.name} (torch {torch.__version__}, cuDNN {cudnn})"
