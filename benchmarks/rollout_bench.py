"""Rollout throughput: HF generate (dynamic cache; static cache compiled) vs tinyablate's graph engine.

Run (H200, ~5 min):  python benchmarks/rollout_bench.py --out rollout.json
Greedy evaluation of 1,319 problems, one side per call (HF's side alone takes minutes):
                     python benchmarks/rollout_bench.py --paths '' --adapters tinylora --agreement-rows 0 \\
                         --eval-problems 1319 --eval-batch-hf 256 --eval-paths hf --out eval_hf.json
Run (CPU smoke):     python benchmarks/rollout_bench.py --device cpu --shape small --layers 2 --prompts 4 \\
                         --prompt-len 16 --new-tokens 16 --paths hf,engine --eval-problems 8 --agreement-rows 4

Random weights in the real model's shape (adapter_bench.build_base, no Hub), bf16 on GPU, without and
with this project's fused TinyLoRA (r=2, u=13, tie=1 on all projections, v perturbed). prompts x
generations completions of prompt-len random tokens + each of --new-tokens, sampled at T=1, EOS off.
For each it prints tok/s, ms per decode step (wall time / new tokens, prefill included) and the share
of the roofline, where a decode step's roofline time is

    max(bytes / HBM bandwidth, FLOPs / bf16 peak),
    bytes = weights without the input embedding + KV cache at the mean context (prompt + new/2),
    FLOPs = 2 x (parameters without the input embedding) x rows.

Also: GRPO's training-rollout mismatch (|log p_engine - log p_train| of the sampled tokens, the training side a
full-sequence forward), greedy agreement in bf16 of the engine with HF generate (per row, the share of new tokens identical
up to the first divergence), the keyed sampler's throughput in the engine, and a greedy evaluation
(--eval-problems prompts of ragged lengths, --eval-new tokens, EOS off) at HF's eval batch vs the engine's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.adapter_bench import SHAPES, TARGETS, build_base, sync  # noqa: E402
from benchmarks.mismatch_check import token_mismatch  # noqa: E402
from tinyablate.engine import EngineOptions, GenerationEngine, Sampling  # noqa: E402

# The engine's settings (EngineOptions fields) side by side: the defaults, and each lever on its own.
ENGINE_VARIANTS = {
    "engine": {},
    "engine_nopack": {"pack": False},
    "engine_nocompile": {"compile_glue": False},
    "engine_sdpa": {"attention": "sdpa"},
    "engine_noshare": {"share_prompts": False},
    "engine_eager": {"compile_glue": False, "pack": False, "attention": "sdpa"},
}
HBM_BYTES_PER_S = 4.8e12  # H200
BF16_FLOPS = 790e12  # H200 dense bf16, measured on this device (KINDS.md)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", default="qwen2.5-7b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", default="256,512", help="comma list")
    p.add_argument(
        "--paths",
        default="hf,engine,hf_static",
        help="comma list of hf, hf_static and engine variants: " + ", ".join(ENGINE_VARIANTS),
    )
    p.add_argument("--adapters", default="none,tinylora", help="comma list of none,tinylora")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--agreement-rows", type=int, default=64)
    p.add_argument("--agreement-new", type=int, default=64)
    p.add_argument(
        "--mismatch-rows",
        type=int,
        default=64,
        help="rows whose sampled tokens' engine log-probs are compared to a training forward's (0: off)",
    )
    p.add_argument("--mismatch-new", type=int, default=128)
    p.add_argument("--eval-problems", type=int, default=256)
    p.add_argument("--eval-new", type=int, default=512)
    p.add_argument("--eval-batch-hf", type=int, default=32)
    p.add_argument("--eval-batch-engine", type=int, default=256)
    p.add_argument(
        "--eval-paths",
        default="engine,hf",
        help="comma list of engine,hf: the evaluation's sides to time (one at a time fits a short call)",
    )
    p.add_argument(
        "--attention",
        default=None,
        choices=["triton", "sdpa", "matmul"],
        help="the engine's decode attention (default: the engine's, triton on CUDA)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile one generation of the engine (--new-tokens' first value; with TinyLoRA if --adapters names it): kernels and gaps per decode "
        "step; then exit",
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.paths = [path for path in args.paths.split(",") if path]  # "" times no throughput row
    unknown = set(args.paths) - {"hf", "hf_static", *ENGINE_VARIANTS}
    if unknown:
        p.error(f"--paths {sorted(unknown)}: each one of hf, hf_static, " + ", ".join(ENGINE_VARIANTS))
    if args.profile and args.device != "cuda":
        p.error("--profile reads CUDA kernels: it needs --device cuda")
    if not set(args.eval_paths.split(",")) <= {"engine", "hf"}:
        p.error(f"--eval-paths {args.eval_paths!r}: a comma list of engine,hf")
    return args


def roofline_ms(cfg, rows: int, prompt_len: int, new: int) -> float:
    hd = cfg.hidden_size // cfg.num_attention_heads
    params = sum(p.numel() for n, p in cfg._model.named_parameters() if "embed_tokens" not in n)
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * hd * 2 * rows * (prompt_len + new / 2)
    return 1e3 * max((2 * params + kv) / HBM_BYTES_PER_S, 2 * params * rows / BF16_FLOPS)


def timed(fn, device, repeats):
    fn()  # warm-up (captures graphs / compiles)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hf_generate(model, ids, new, static=False, greedy=False, attention_mask=None):
    kwargs = (
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        if greedy
        else dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    )
    if static:
        from transformers import CompileConfig

        kwargs.update(
            cache_implementation="static",
            disable_compile=False,
            compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"),
        )
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, pad_token_id=0, max_new_tokens=new, min_new_tokens=new, **kwargs
        )


def throughput_rows(model, label, args, ids, news, engines):
    rows = []
    for new in news:
        ms_roof = roofline_ms(args.cfg, ids.shape[0], ids.shape[1], new)
        for path in args.paths:
            if path in engines:
                fn = lambda: engines[path].generate(ids.tolist(), new, Sampling(temperature=1.0))  # noqa: E731
            elif path == "hf_static" and new != news[0]:
                continue  # compiling costs minutes: once per adapter setting, at the first length
            else:
                fn = lambda: hf_generate(model, ids, new, static=path == "hf_static")  # noqa: E731
            try:
                seconds = timed(fn, args.device, args.repeats)
            except Exception as err:  # noqa: BLE001 - a path that fails is reported, the others still run
                print(f"{label:<9}{path:<10}{new:>5}  failed: {type(err).__name__}: {err}", flush=True)
                continue
            row = dict(
                adapter=label,
                path=path,
                new_tokens=new,
                rows=ids.shape[0],
                seconds=seconds,
                tok_s=ids.shape[0] * new / seconds,
                ms_per_step=1e3 * seconds / new,
                roofline_ms=ms_roof,
            )
            row["of_roofline"] = row["roofline_ms"] / row["ms_per_step"]
            rows.append(row)
            print(
                f"{label:<9}{path:<10}{new:>5}{row['tok_s']:>10.0f} tok/s{row['ms_per_step']:>8.2f} ms/step"
                f"{100 * row['of_roofline']:>7.1f}% of roofline",
                flush=True,
            )
    return rows


def agreement(model, engine, ids, new) -> dict:
    """Greedy, bf16: per row, share of new tokens identical to HF generate's up to the first divergence."""
    ref = hf_generate(model, ids, new, greedy=True)[:, ids.shape[1] :].tolist()
    ours = engine.generate(ids.tolist(), new)
    shares = []
    for a, b in zip(ours, ref):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), new)
        shares.append(first / new)
    return {"mean_share": statistics.mean(shares), "rows_identical": sum(s == 1 for s in shares), "rows": len(shares)}


def mismatch(model, engine, ids, new, temperature: float = 1.0) -> dict:
    """GRPO's training-rollout mismatch: |log p_engine - log p_train| over the sampled tokens, where log p_train
    comes from full-sequence forwards of the model in training's micro-batches of 8 (mismatch_check.py)."""
    prompts = ids.tolist()
    completions, logps = engine.generate(prompts, new, Sampling(temperature=temperature), logprobs=True)
    d = torch.cat(token_mismatch(model, 0, prompts, completions, logps, temperature, ids.device))
    return {
        "rows": len(prompts),
        "new_tokens": new,
        "temperature": temperature,
        "mean": d.mean().item(),
        "max": d.max().item(),
        "p99": d.quantile(0.99).item(),
    }


def eval_rows(model, engine, args, vocab) -> dict:
    """Greedy evaluation of ragged prompts: HF generate in evaluation's batches vs the engine's batches."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(80, 220, (args.eval_problems,), generator=gen).tolist()
    prompts = [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])

    def hf(batch):
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=args.device)
        hf_generate(model, ids, args.eval_new, greedy=True, attention_mask=mask)

    sides = {
        "engine": (lambda batch: engine.generate(batch, args.eval_new), args.eval_batch_engine),
        "hf": (hf, args.eval_batch_hf),
    }
    out = {}
    for name in args.eval_paths.split(","):
        generate, size = sides[name]
        batches = [[prompts[i] for i in order[s : s + size]] for s in range(0, len(order), size)]
        sync(args.device)
        t0 = time.perf_counter()
        if name == "engine":  # as tinyablate/evaluation/generation.py: the cache for the whole evaluation first
            engine.reserve(min(size, len(prompts)), max(lengths) + args.eval_new)
        for k, batch in enumerate(batches):
            generate(batch)
            sync(args.device)  # progress, so a run cut short still says how far this side got
            print(f"eval {name}: batch {k + 1}/{len(batches)} done at {time.perf_counter() - t0:.1f} s", flush=True)
        out[f"{name}_s"] = time.perf_counter() - t0
        print(
            f"eval {name}: {out[f'{name}_s']:.1f} s for {len(prompts)} problems x {args.eval_new} tokens "
            f"(batches of {size})",
            flush=True,
        )
    if "hf_s" in out and "engine_s" in out:
        out["speedup"] = out["hf_s"] / out["engine_s"]
    return out


def main(argv=None) -> dict:
    args = parse(argv)
    news = [int(n) for n in args.new_tokens.split(",")]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build_base(SimpleNamespace(shape=args.shape, layers=args.layers, device=args.device, dtype=dtype))
    args.cfg = model.config
    args.cfg._model = model
    vocab = SHAPES[args.shape]["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, vocab, (args.prompts, args.prompt_len), generator=gen)
    ids = prompts.repeat_interleave(args.generations, 0).to(args.device)
    print(
        f"roofline per decode step = max(bytes / {HBM_BYTES_PER_S:.1e} B/s, FLOPs / {BF16_FLOPS:.1e} FLOP/s); "
        "bytes = weights without input embedding + KV cache at prompt + new/2; FLOPs = 2 x params x rows",
        flush=True,
    )
    if args.profile:
        return profile_decode(model, ids, args)
    report = {
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "argv": sys.argv[1:] if argv is None else argv,
        "torch": torch.__version__,
        "rows": [],
    }
    for label in args.adapters.split(","):
        if label == "tinylora":
            apply_tinylora(model, args)
        options = EngineOptions(log=print, attention=args.attention)
        engine = GenerationEngine(model, pad_token_id=0, eos_token_ids=[], options=options)
        engines = {"engine": engine}
        for path in args.paths:
            if path in ENGINE_VARIANTS and path != "engine":
                variant = replace(options, **ENGINE_VARIANTS[path])
                engines[path] = GenerationEngine(model, pad_token_id=0, eos_token_ids=[], options=variant)
        report["rows"] += throughput_rows(model, label, args, ids, news, engines)
        for other in list(engines.values())[1:]:
            other.release()
        if label == "tinylora":
            keyed = lambda: engine.generate(
                ids.tolist(),
                news[0],
                Sampling(temperature=1.0, keyed=True),  # noqa: E731
                keys=list(range(ids.shape[0])),
            )
            try:
                seconds = timed(keyed, args.device, args.repeats)
                report["keyed_tok_s"] = ids.shape[0] * news[0] / seconds
                print(f"engine keyed sampler at {news[0]}: {report['keyed_tok_s']:.0f} tok/s", flush=True)
            except Exception as err:  # noqa: BLE001
                print(f"engine keyed sampler failed: {type(err).__name__}: {err}", flush=True)
            n = min(args.mismatch_rows, ids.shape[0])
            if n:
                report["mismatch"] = mismatch(model, engine, ids[:n], args.mismatch_new)
                print(
                    f"training-rollout mismatch ({n} rows x {args.mismatch_new} tokens, T=1): {report['mismatch']}",
                    flush=True,
                )
            n = min(args.agreement_rows, ids.shape[0])
            if n:
                report["agreement"] = agreement(model, engine, prompts[:n].to(args.device), args.agreement_new)
                print(
                    f"greedy agreement with HF generate ({n} rows x {args.agreement_new} tokens): "
                    f"{report['agreement']}",
                    flush=True,
                )
            engine.release()
            if args.eval_problems:
                eval_engine = GenerationEngine(
                    model, pad_token_id=0, eos_token_ids=[], options=EngineOptions(log=print)
                )
                save(args, report)  # what is measured so far, should the evaluation be cut short
                report["eval"] = eval_rows(model, eval_engine, args, vocab)
                eval_engine.release()
        engine = None  # its cache and graphs go before the next adapter's engine
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print_table(report)
    save(args, report)
    return report


def save(args, report) -> None:
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


def apply_tinylora(model, args) -> None:
    """This project's fused TinyLoRA on every projection (r=2, u=13, tie=1), v perturbed so it changes the model."""
    from tinyablate.adapters import apply_adapter
    from tinyablate.config import AdapterConfig, SVDConfig

    cfg = AdapterConfig(kind="tinylora", r=2, u=13, tie=1, target_modules=list(TARGETS), svd=SVDConfig(cache_dir=""))
    adapter = apply_adapter(model, cfg, f"random:{args.shape}:{args.layers}")
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.normal_(0, 1e-3)


def profile_decode(model, ids, args):
    """The default engine's generation of --new-tokens (its first value) under torch.profiler: refresh_weights'
    host time, wall time of a 1-token and a whole generation, GPU busy / idle time, and per decode step (the
    second half of the generation: decode only) the kernels, their count and the gaps between them."""
    from torch.profiler import ProfilerActivity, profile

    if "tinylora" in args.adapters.split(","):
        apply_tinylora(model, args)
    engine = GenerationEngine(model, pad_token_id=0, eos_token_ids=[], options=EngineOptions(attention=args.attention))
    sampling, new = Sampling(temperature=1.0), int(args.new_tokens.split(",")[0])
    prompts = ids.tolist()
    engine.generate(prompts, new, sampling)  # compiles and captures
    for _ in range(2):
        sync(args.device)
        t0 = time.perf_counter()
        engine.refresh_weights()
        sync(args.device)
        print(f"refresh_weights: {1e3 * (time.perf_counter() - t0):.2f} ms", flush=True)
    for n in (1, new):
        sync(args.device)
        t0 = time.perf_counter()
        engine.generate(prompts, n, sampling)
        sync(args.device)
        print(f"generate {n} new tokens: {1e3 * (time.perf_counter() - t0):.1f} ms", flush=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.generate(prompts, new, sampling)
        sync(args.device)
    kernel_report([e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA], new)
    return {}


def kernel_report(events, new: int) -> None:
    """GPU busy / idle time of one generation's kernels (profiler events), and per decode step (its second
    half) the kernels by name and the gaps between them."""
    import collections

    kernels = sorted(events, key=lambda e: e.time_range.start)
    begin, end = kernels[0].time_range.start, max(e.time_range.end for e in kernels)
    busy, run_start, run_end, gaps = 0.0, begin, kernels[0].time_range.end, []
    for e in kernels[1:]:  # merge overlapping kernels; a gap is time with no kernel running
        if e.time_range.start > run_end:
            busy += run_end - run_start
            gaps.append((e.time_range.start, e.time_range.start - run_end))
            run_start = e.time_range.start
        run_end = max(run_end, e.time_range.end)
    busy += run_end - run_start
    print(
        f"one generation of {new} tokens: {len(kernels)} kernels over {(end - begin) / 1e3:.1f} ms, "
        f"GPU busy {busy / 1e3:.1f} ms, idle {(end - begin - busy) / 1e3:.1f} ms"
    )
    middle, steps = (begin + end) / 2, new / 2  # the second half: decode steps only
    decode_gaps = [g for t, g in gaps if t > middle]
    print(
        f"decode (second half, ~{steps:.0f} steps): {sum(decode_gaps) / steps:.0f} µs of gaps a step, "
        f"largest {max(decode_gaps, default=0):.0f} µs"
    )
    per_name = collections.defaultdict(lambda: [0, 0.0])
    for e in kernels:
        if e.time_range.start > middle:
            per_name[e.name][0] += 1
            per_name[e.name][1] += e.time_range.elapsed_us()
    total = sum(us for _, us in per_name.values())
    print(f"kernels a decode step: {sum(n for n, _ in per_name.values()) / steps:.0f}, {total / steps:.0f} µs")
    for name, (n, us) in sorted(per_name.items(), key=lambda kv: -kv[1][1])[:24]:
        print(f"  {us / steps:8.1f} µs/step {n / steps:6.1f}/step {us / n:7.1f} µs each  {name[:90]}")


def print_table(report):
    rows = report["rows"]
    print(f"\ndevice: {report['device']} ({report['date']}, torch {report['torch']})")
    for r in rows:
        hf = next(
            (
                h
                for h in rows
                if h["path"] == "hf" and h["adapter"] == r["adapter"] and h["new_tokens"] == r["new_tokens"]
            ),
            None,
        )
        vs = f"{r['tok_s'] / hf['tok_s']:.2f}x HF" if hf else ""
        print(
            f"| {r['adapter']} | {r['path']} | {r['new_tokens']} | {r['tok_s']:,.0f} | {r['ms_per_step']:.2f} | "
            f"{100 * r['of_roofline']:.1f}% | {vs} |"
        )


if __name__ == "__main__":
    main()
