"""A decode step's kernels one by one at the Qwen2.5-7B shape: the Triton decode attention's settings, and
the matmuls as F.linear vs the transposed product. Each timed as a CUDA graph of back-to-back calls.

Run (H200, a few min):  python benchmarks/decode_kernels_bench.py
Run (fewer):            python benchmarks/decode_kernels_bench.py --parts attention,sampling --rows 256
Run (every attention setting; over 4 min a context on an H200):
                        python benchmarks/decode_kernels_bench.py --parts attention --attention-sweep full

Attention: rows x 4 kv heads x 7 query heads per kv head x 128 dims, bf16; GRPO's case (every prompt
repeated 4 times, its keys read from one row: engine/attention.py's shared prompts), left-padding-free.
For each (rows, prompt, keys used) it sweeps key slices at the default launch settings (`--attention-sweep
slices`), or also keys per block x warps x pipeline stages (`full`: each setting compiles a kernel, so it takes
minutes), checks each result against the default settings' and prints the default and the fastest, with the bytes a row
reads from its own and its prompt's rows ("logical") and the bytes of distinct keys and values ("unique") per
µs.
Sampling (`--parts sampling`): the engine's draw from softmax(logits / T) over Qwen2.5-7B's 152,064 logits
(bf16) at --rows rows, as it is (Exp(1) noise by `exponential_`, then engine/sampler.py's compiled race, one
program a row) against candidates compiled the same way: the uniforms drawn inside the kernel; the
vocabulary split into 32 slices reduced in two stages (more programs); both.
Matmuls (`--parts gemm`): q/k/v, o_proj, gate/up, down_proj and lm_head at --rows rows; the weights (up to
1.1 GB) may stay partly in L2 across the back-to-back calls, so these are upper bounds of a decode step's.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tinyablate import kernels  # noqa: E402
from tinyablate.engine.attention import decode_attention  # noqa: E402
from tinyablate.engine.sampler import exponential_race  # noqa: E402

# Qwen2.5-7B: (out features, in features) of each packed decode matmul
GEMMS = {
    "qkv": (4608, 3584),
    "o_proj": (3584, 3584),
    "gate_up": (37888, 3584),
    "down_proj": (3584, 18944),
    "lm_head": (152064, 3584),
}
KV_HEADS, GROUPS, DIM, GENERATIONS = 4, 7, 128, 4


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="attention,sampling,gemm", help="comma list of attention,sampling,gemm")
    p.add_argument("--rows", default="256", help="comma list of decode batch sizes")
    p.add_argument(
        "--contexts", default="128:256,128:384,200:400", help="comma list of prompt:keys-used pairs for the attention"
    )
    p.add_argument(
        "--attention-sweep",
        default="slices",
        choices=["slices", "full"],
        help="slices: grouping x key slices at the default launch settings; full: also keys per block x warps x stages",
    )
    return p.parse_args(argv)


def graph_time_us(fn, calls: int = 20, replays: int = 5) -> float:
    """Mean µs of one call of fn, from replays of a CUDA graph of `calls` back-to-back calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(replays):
        graph.replay()
    t1.record()
    torch.cuda.synchronize()
    return 1e3 * t0.elapsed_time(t1) / (replays * calls)


def attention(rows: int, prompt: int, used: int, full: bool) -> None:
    kv_len = -(-used // 64) * 64  # the engine's key-length bucket
    k = torch.randn(rows, KV_HEADS, kv_len, DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(rows, KV_HEADS, GROUPS, DIM, device="cuda", dtype=torch.bfloat16)
    start = torch.zeros(rows, dtype=torch.long, device="cuda")
    slot = torch.tensor([used - 1], device="cuda")
    src = torch.arange(rows, device="cuda") // GENERATIONS * GENERATIONS
    prompt_end = torch.tensor([prompt], device="cuda")
    ref = decode_attention(q, k, v, start, slot, DIM**-0.5, 1, src, prompt_end)
    row_bytes = KV_HEADS * DIM * 2 * 2  # a key and a value of every kv head, bf16
    logical = rows * used * row_bytes
    unique = (rows // GENERATIONS * prompt + rows * (used - prompt)) * row_bytes
    print(
        f"attention, {rows} rows, {prompt}-token prompts x {GENERATIONS}, {used} keys used: "
        f"logical {logical / 1e6:.0f} MB, unique {unique / 1e6:.0f} MB",
        flush=True,
    )
    results = []
    launch = itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3)) if full else [(64, 4, 2)]
    sweep = [(*settings, splits) for settings, splits in itertools.product(launch, (1, 2, 4))]
    for block_n, warps, stages, splits in sweep:
        if -(-kv_len // splits) < block_n:
            continue
        settings = dict(block_n=block_n, num_warps=warps, num_stages=stages)
        call = lambda: decode_attention(
            q,
            k,
            v,
            start,
            slot,
            DIM**-0.5,
            splits,
            src,  # noqa: E731
            prompt_end,
            **settings,
        )
        err = (call().float() - ref.float()).abs().max().item()
        results.append((graph_time_us(call), block_n, warps, stages, splits, err))
    results.sort()
    default = next(r for r in results if r[1:5] == (64, 4, 2, 1))
    for us, block_n, warps, stages, splits, err in [default] + results[:6]:
        mark = "default" if (block_n, warps, stages, splits) == (64, 4, 2, 1) else "setting"
        print(
            f"  {mark} {us:6.1f} µs  logical {logical / us / 1e6:4.2f} TB/s  unique {unique / us / 1e6:4.2f} TB/s  "
            f"block {block_n} warps {warps} stages {stages} slices {splits}  max |diff| {err:.1e}",
            flush=True,
        )


VOCAB, SLICES = 152064, 32


def split_argmax(scores):
    """argmax(-1) of (rows, V) scores in two stages over SLICES slices of the vocabulary (the first maximum,
    as argmax)."""
    rows, vocab = scores.shape
    best, where = scores.view(rows, SLICES, vocab // SLICES).max(-1)
    slice_ = best.argmax(-1, keepdim=True)
    return where.gather(-1, slice_).squeeze(-1) + slice_.squeeze(-1) * (vocab // SLICES)


def race_split(logits, noise, temperature: float):
    return split_argmax(logits.float() / temperature - noise.log())


def gumbel_rand(logits, temperature: float):
    u = torch.rand(logits.shape, dtype=torch.float32, device=logits.device)
    return (logits.float() / temperature - torch.log(-torch.log(u))).argmax(-1)


def gumbel_rand_split(logits, temperature: float):
    u = torch.rand(logits.shape, dtype=torch.float32, device=logits.device)
    return split_argmax(logits.float() / temperature - torch.log(-torch.log(u)))


def sampling(rows: int) -> None:
    logits = torch.randn(rows, VOCAB, device="cuda").to(torch.bfloat16)
    race, split = kernels.compiled(exponential_race, "bench"), kernels.compiled(race_split, "bench")
    rand, rand_split = kernels.compiled(gumbel_rand, "bench"), kernels.compiled(gumbel_rand_split, "bench")
    noise = torch.empty(rows, VOCAB, device="cuda").exponential_()
    assert torch.equal(race(logits, noise, 1.0)[0], split(logits, noise, 1.0))  # same draw from the same noise
    candidates = {
        "as it is: exponential_ noise, then the race": lambda: race(
            logits, torch.empty_like(noise).exponential_(), 1.0
        ),
        "the noise alone (exponential_)": lambda: torch.empty_like(noise).exponential_(),
        "the race alone (noise given)": lambda: race(logits, noise, 1.0),
        "exponential_ noise, race in 32 slices": lambda: split(logits, torch.empty_like(noise).exponential_(), 1.0),
        "uniforms in the kernel": lambda: rand(logits, 1.0),
        "uniforms in the kernel, 32 slices": lambda: rand_split(logits, 1.0),
    }
    print(f"sampling, {rows} rows x {VOCAB} logits (bf16):", flush=True)
    for name, call in candidates.items():
        print(f"  {graph_time_us(call):7.1f} µs  {name}", flush=True)


def gemm(rows: int) -> None:
    for name, (n, k) in GEMMS.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        xt = x.t().contiguous()
        flops = 2 * rows * n * k
        linear = graph_time_us(lambda: F.linear(x, w))
        swapped = graph_time_us(lambda: torch.mm(w, xt))
        print(
            f"{name:<10} {rows} x {k} -> {n}: F.linear {linear:7.1f} µs ({flops / linear / 1e6:4.0f} TFLOP/s), "
            f"W @ xᵀ {swapped:7.1f} µs ({flops / swapped / 1e6:4.0f} TFLOP/s)",
            flush=True,
        )


def main(argv=None) -> None:
    args = parse(argv)
    if not torch.cuda.is_available():
        sys.exit("decode_kernels_bench.py needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    parts = args.parts.split(",")
    for rows in (int(r) for r in args.rows.split(",")):
        if "attention" in parts:
            for pair in args.contexts.split(","):
                prompt, used = (int(x) for x in pair.split(":"))
                attention(rows, prompt, used, args.attention_sweep == "full")
        if "sampling" in parts:
            sampling(rows)
        if "gemm" in parts:
            gemm(rows)


if __name__ == "__main__":
    main()
