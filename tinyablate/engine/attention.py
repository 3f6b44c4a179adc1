"""Decode attention over the engine's KV cache: one Triton kernel (flash decoding), CUDA only.

At one new token per row, attention reads every cached key and value once: memory-bound work that the
SDPA kernels torch picks for a (rows, kv heads, groups, dim) query with a boolean mask ran far below
the GPU's memory bandwidth (measured: benchmarks/RESULTS.md). Here each
program takes one (row, kv head) and one slice of the key positions: the `groups` query heads that
share the kv head are the rows of one small matrix product against each block of keys, with an online
softmax in float32; a second kernel merges the slices (split-K) when there are several.

A row's valid keys are the contiguous positions [start[row], slot]: left padding before `start`, the
slots not yet written after `slot` (the current one, read on the device, so a captured CUDA graph
replays it). This is the engine's mask exactly (left-padded prompts, every later slot
written for every row).

Shared prompts: GRPO samples several completions of one prompt, whose prompt keys and values are
identical. With `src` (per row, the cache row that holds its prompt) and `prompt_end` (the prompt
region's end), keys before `prompt_end` are read from row `src[row]`: the rows of one prompt then read
the same prompt memory, which neighbouring programs find in L2, instead of one copy each from HBM.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the engine uses SDPA there
    triton = None

BLOCK_N = 64


def available(device) -> bool:
    return triton is not None and torch.device(device).type == "cuda"


if triton is not None:

    @triton.jit
    def _partial(
        q_ptr,
        k_ptr,
        v_ptr,
        start_ptr,
        slot_ptr,
        src_ptr,
        pend_ptr,
        out_ptr,
        m_ptr,
        l_ptr,
        sq_b,
        sq_h,
        sq_g,
        sk_b,
        sk_h,
        sk_n,
        sv_b,
        sv_h,
        sv_n,
        so_b,
        so_h,
        so_s,
        so_g,
        sm_b,
        sm_h,
        sm_s,
        scale,
        CHUNK: tl.constexpr,
        KV_HEADS: tl.constexpr,
        GROUPS: tl.constexpr,
        BLOCK_G: tl.constexpr,
        D: tl.constexpr,
        BLOCK_N: tl.constexpr,
        FP32: tl.constexpr,
        DIRECT: tl.constexpr,
        SHARED: tl.constexpr,
    ):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // KV_HEADS
        h = bh % KV_HEADS
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * sq_b + h * sq_h + g[:, None] * sq_g + d[None, :], mask=g[:, None] < GROUPS, other=0.0)
        start = tl.load(start_ptr + b)
        stop = tl.load(slot_ptr) + 1
        hi = tl.minimum((split + 1) * CHUNK, stop)
        if SHARED:
            src = tl.load(src_ptr + b)
            pend = tl.load(pend_ptr)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        for i in range(0, CHUNK // BLOCK_N):  # blocks past `stop` or before `start` load nothing (masked)
            n = split * CHUNK + i * BLOCK_N + tl.arange(0, BLOCK_N)
            keep = (n >= start) & (n < hi)
            if SHARED:  # prompt keys from the row that holds this row's prompt
                row = tl.where(n < pend, src, b)[:, None]
            else:
                row = b
            k = tl.load(k_ptr + row * sk_b + h * sk_h + n[:, None] * sk_n + d[None, :], mask=keep[:, None], other=0.0)
            v = tl.load(v_ptr + row * sv_b + h * sv_h + n[:, None] * sv_n + d[None, :], mask=keep[:, None], other=0.0)
            m, l, acc = _attend_block(q, k, v, keep[None, :], scale, m, l, acc, FP32)
        if DIRECT:  # one slice: the result itself
            out = acc / l[:, None]
            tl.store(
                out_ptr + b * so_b + h * so_h + g[:, None] * so_g + d[None, :],
                out.to(out_ptr.dtype.element_ty),
                mask=g[:, None] < GROUPS,
            )
        else:
            base = b * so_b + h * so_h + split * so_s
            tl.store(out_ptr + base + g[:, None] * so_g + d[None, :], acc, mask=g[:, None] < GROUPS)
            tl.store(m_ptr + b * sm_b + h * sm_h + split * sm_s + g, m, mask=g < GROUPS)
            tl.store(l_ptr + b * sm_b + h * sm_h + split * sm_s + g, l, mask=g < GROUPS)

    @triton.jit
    def _merge(
        part_ptr,
        m_ptr,
        l_ptr,
        out_ptr,
        sp_b,
        sp_h,
        sp_s,
        sp_g,
        sm_b,
        sm_h,
        sm_s,
        so_b,
        so_h,
        so_g,
        KV_HEADS: tl.constexpr,
        GROUPS: tl.constexpr,
        SPLITS: tl.constexpr,
        BLOCK_S: tl.constexpr,
        D: tl.constexpr,
    ):
        bhg = tl.program_id(0)
        g = bhg % GROUPS
        b = bhg // (GROUPS * KV_HEADS)
        h = (bhg // GROUPS) % KV_HEADS
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, D)
        ms = tl.load(m_ptr + b * sm_b + h * sm_h + s * sm_s + g, mask=s < SPLITS, other=float("-inf"))
        ls = tl.load(l_ptr + b * sm_b + h * sm_h + s * sm_s + g, mask=s < SPLITS, other=0.0)
        big = tl.max(ms, 0)
        w = tl.where(ms == float("-inf"), 0.0, tl.exp(ms - big))
        parts = tl.load(
            part_ptr + b * sp_b + h * sp_h + s[:, None] * sp_s + g * sp_g + d[None, :],
            mask=s[:, None] < SPLITS,
            other=0.0,
        )
        out = tl.sum(parts * w[:, None], 0) / tl.sum(ls * w, 0)
        tl.store(out_ptr + b * so_b + h * so_h + g * so_g + d, out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _attend_block(q, k, v, valid, scale, m, l, acc, FP32: tl.constexpr):
        """One block of keys k and values v into the online softmax (running max m, sum l, acc) of queries q;
        valid: (queries, keys), False where a query may not see a key."""
        if FP32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(valid, s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block with no valid key: no NaN
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        if FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l, acc


def splits_for(rows: int, kv_heads: int, length: int, device) -> int:
    """Key slices per (row, kv head): enough programs for ~4 waves of the GPU, at least BLOCK_N keys each."""
    device = torch.device(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    want = -(-4 * sms // max(rows * kv_heads, 1))
    return max(1, min(want, -(-length // BLOCK_N)))


def decode_attention(
    q,
    keys,
    values,
    start,
    slot,
    scale: float,
    splits: int = 1,
    src=None,
    prompt_end=None,
    block_n: int = BLOCK_N,
    num_warps: int = 4,
    num_stages: int = 2,
):
    """softmax(q kᵀ · scale) v over each row's keys [start[row], slot].

    q: (rows, kv heads, groups, dim); keys, values: (rows, kv heads, length, dim) with unit stride in dim;
    start: (rows,) int; slot: (1,) int (both on the device). Returns (rows, kv heads, groups, dim).
    src: (rows,) int, prompt_end: (1,) int (on the device, both or neither): keys before prompt_end are
    read from row src[row] (whose prompt is identical), see the module docstring.
    splits: key slices per program (the engine's: splits_for). block_n, num_warps, num_stages: benchmark-only
    knobs, the kernel's keys per block and launch settings: the engine never passes them (the defaults were the
    fastest in benchmarks/decode_kernels_bench.py's sweep on an H200, which sets them; the interpreter test
    sets a small block_n).
    """
    if (src is None) != (prompt_end is None):
        raise ValueError("decode_attention: pass src and prompt_end together")
    rows, kv_heads, groups, dim = q.shape
    length = keys.shape[2]
    out = torch.empty_like(q)
    chunk = -(-length // splits)
    chunk = -(-chunk // block_n) * block_n
    fp32 = q.dtype == torch.float32
    shared = src is not None
    if not shared:
        src, prompt_end = start, slot  # not read
    kernel, programs = _partial, rows * kv_heads
    common = dict(
        BLOCK_G=max(16, triton.next_power_of_2(groups)),
        SHARED=shared,
        KV_HEADS=kv_heads,
        GROUPS=groups,
        D=dim,
        BLOCK_N=block_n,
        FP32=fp32,
        CHUNK=chunk,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    strides = (*q.stride()[:3], *keys.stride()[:3], *values.stride()[:3])
    if splits == 1:
        kernel[(programs, 1)](
            q,
            keys,
            values,
            start,
            slot,
            src,
            prompt_end,
            out,
            out,
            out,
            *strides,
            out.stride(0),
            out.stride(1),
            0,
            out.stride(2),
            0,
            0,
            0,
            scale,
            DIRECT=True,
            **common,
        )
        return out
    part = torch.empty(rows, kv_heads, splits, groups, dim, dtype=torch.float32, device=q.device)
    m = torch.empty(rows, kv_heads, splits, groups, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    kernel[(programs, splits)](
        q,
        keys,
        values,
        start,
        slot,
        src,
        prompt_end,
        part,
        m,
        l,
        *strides,
        *part.stride()[:4],
        *m.stride()[:3],
        scale,
        DIRECT=False,
        **common,
    )
    _merge[(rows * kv_heads * groups,)](
        part,
        m,
        l,
        out,
        *part.stride()[:4],
        *m.stride()[:3],
        *out.stride()[:3],
        KV_HEADS=kv_heads,
        GROUPS=groups,
        SPLITS=splits,
        BLOCK_S=max(2, triton.next_power_of_2(splits)),
        D=dim,
        num_warps=4,
    )
    return out
