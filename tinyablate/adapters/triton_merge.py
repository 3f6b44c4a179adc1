"""The merge W_eff = W + (A M) B as one pass over W.

On CUDA with Triton (shipped with CUDA builds of torch) a small kernel reads W once and writes W_eff
once, accumulating the rank-r update in fp32: memory-bound at close to the copy bandwidth. cuBLAS's
addmm with an inner dimension of r=2 reaches about a third of that (measured on an H100, see
benchmarks/RESULTS.md). Elsewhere, or for large r, addmm is used.
"""

from __future__ import annotations

import torch

try:  # pragma: no cover - depends on the install
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # noqa: BLE001 - any import failure means "no Triton"
    _HAVE_TRITON = False

MAX_KERNEL_RANK = 16

if _HAVE_TRITON:

    @triton.jit
    def _merge_kernel(
        w_ptr, am_ptr, b_ptr, out_ptr, D, K, R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr
    ):
        pid_d = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        row_ok = rows < D
        col_ok = cols < K
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * K + cols[None, :]
        acc = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        for r in tl.static_range(R):
            a = tl.load(am_ptr + rows * R + r, mask=row_ok, other=0.0)
            b = tl.load(b_ptr + r * K + cols, mask=col_ok, other=0.0)
            acc += a[:, None] * b[None, :]
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def kernel_available(weight: torch.Tensor, r: int) -> bool:
    return _HAVE_TRITON and weight.is_cuda and weight.is_contiguous() and r <= MAX_KERNEL_RANK


def merge_into(out: torch.Tensor, weight: torch.Tensor, am: torch.Tensor, b: torch.Tensor) -> None:
    """out = weight + am @ b, with am (d × r) and b (r × k); rounding once to out's dtype."""
    r = am.shape[1]
    if kernel_available(weight, r) and out.is_contiguous():
        am32 = am.float().contiguous()
        b32 = b.float().contiguous()
        d, k = weight.shape
        grid = (triton.cdiv(d, 32), triton.cdiv(k, 256))
        _merge_kernel[grid](weight, am32, b32, out, d, k, R=r, BLOCK_D=32, BLOCK_K=256, num_warps=4)
        return
    # One GEMM with the base as its C operand, accumulated in fp32 by the BLAS and rounded once.
    torch.addmm(weight, am.to(weight.dtype), b.to(weight.dtype), out=out)
