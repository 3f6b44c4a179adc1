"""Data-parallel scaling of a GRPO step: 1 vs N ranks with the same global batch, side by side.

Run (N GPUs, Qwen2.5-7B shape, 8 layers): python benchmarks/dp_bench.py --device cuda --world-sizes 1,2
Run (CPU, gloo, small shape, ~1 min):      python benchmarks/dp_bench.py --device cpu --shape small --layers 2
Run (1 GPU, rollouts by HF generate vs the graph engine, training's glue eager vs compiled):
    python benchmarks/dp_bench.py --device cuda --layers 28 --world-sizes 1 --engines hf,graph \\
        --train-kernels eager,compiled
Refresh the cost model's table (tinyablate/throughput.json) from a GPU run: add --throughput tinyablate/throughput.json

Random weights in the real model's shapes (no Hub), TinyLoRA r=2 u=13 tie=1 on every linear layer,
bf16 base on GPU. One step is what a GRPO step computes, without TRL's bookkeeping: each rank samples
its share of the step's prompts x generations (`--engines`: HF generate and/or tinyablate's engine,
"graph" on CUDA, "eager" on CPU; `--samplers torch` or `keyed`), then runs
forward + backward over those sequences in micro-batches with an advantage-weighted log-likelihood
loss over the completion's logits (`--train-kernels`, algo.train_kernels: HF's modules as they are, or with the RMSNorms and
SiLU x up compiled as a cell does on CUDA), DDP all-reduces v's gradient, and AdamW steps. For each world size it prints the step time,
rollout tokens/s (all ranks), training time, and speed-up / scaling efficiency against 1 rank; with
`--samplers torch,keyed` also keyed sampling's rollout throughput relative to torch's. With `--throughput
FILE` the 1-rank torch-sampler rollout and training times (and the 2-rank training time) replace the
`decode`, `train` and `data_parallel` measurements of this device kind in the cost model's table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.adapter_bench import SHAPES, TARGETS, build_base  # noqa: E402
from tinyablate import cost, distributed  # noqa: E402

ENGINES = ("hf", "graph", "eager")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--world-sizes", default="1,2")
    p.add_argument("--samplers", default="torch", help="comma list of torch,keyed")
    p.add_argument("--engines", default="hf", help="comma list of " + ",".join(ENGINES) + " (rollout generator)")
    p.add_argument(
        "--train-kernels",
        "--train-glue",
        dest="train_kernels",
        default="eager",
        help="comma list of eager,compiled (training's RMSNorm and SiLU x up: tinyablate/train/glue.py)",
    )
    p.add_argument(
        "--runs",
        help="comma list of engine:glue pairs to run instead of every --engines x --train-kernels "
        "pair, e.g. hf:eager,graph:eager,graph:compiled",
    )
    p.add_argument("--prompts", type=int, default=16, help="prompts per step (global)")
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", type=Path)
    p.add_argument("--throughput", type=Path, help="the cost model's table to update (tinyablate/throughput.json)")
    args = p.parse_args(argv)
    engines, glues = args.engines.split(","), args.train_kernels.split(",")
    args.pairs = (
        [tuple(r.split(":")) for r in args.runs.split(",")] if args.runs else list(itertools.product(engines, glues))
    )
    for pair in args.pairs:
        if len(pair) != 2 or pair[0] not in ENGINES or pair[1] not in ("eager", "compiled"):
            p.error(f"run {':'.join(pair)!r}: engine:glue with engine {'|'.join(ENGINES)} and glue eager|compiled")
    return args


def build(args, device):
    """adapter_bench's random model in the shape (bf16 on GPU), with TinyLoRA applied."""
    from types import SimpleNamespace

    from tinyablate.adapters import apply_adapter
    from tinyablate.config import AdapterConfig, SVDConfig

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_base(SimpleNamespace(shape=args.shape, layers=args.layers, device=str(device), dtype=dtype))
    adapter_cfg = AdapterConfig(
        kind="tinylora", r=2, u=13, tie=1, target_modules=list(TARGETS), svd=SVDConfig(cache_dir=args.svd_cache)
    )
    with distributed.main_first():
        adapter = apply_adapter(model, adapter_cfg, f"random:{args.shape}:{args.layers}")
    return adapter.model, SHAPES[args.shape]["vocab_size"]


def rank_main(args, world: int, sampler: str, out: str, engine: str = "hf", glue: str = "eager") -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from tinyablate.sampling import sequence_key
    from tinyablate.train.common import ignore_frozen_in_ddp
    from tinyablate.train.glue import compiled_glue

    with distributed.process_group(world if args.device == "cuda" else 0) as ranks:
        device = torch.device("cuda", ranks.local_rank) if args.device == "cuda" else torch.device("cpu")
        model, vocab = build(args, device)
        ignore_frozen_in_ddp(model)
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        gen = torch.Generator(device="cpu").manual_seed(0)
        rollout = _rollout_fn(model, engine, sampler, args)
        prompts = torch.randint(0, vocab, (args.prompts, args.prompt_len), generator=gen)
        rows = distributed.shard(list(range(args.prompts * args.generations)), ranks)
        times = []
        for step in range(args.warmup + args.steps):
            ids = prompts[[r // args.generations for r in rows]].to(device)
            sync(device)
            t0 = time.perf_counter()
            keys = [sequence_key(0, step, r // args.generations, r % args.generations) for r in rows]
            seqs = rollout(ids, keys)
            sync(device)
            t1 = time.perf_counter()
            model.train()
            advantages = torch.randn(len(rows), generator=gen).to(device)
            chunks = range(0, len(rows), args.micro_batch)
            for i, start in enumerate(chunks):
                batch, adv = seqs[start : start + args.micro_batch], advantages[start : start + args.micro_batch]
                last = i == len(chunks) - 1
                context = ddp.no_sync() if world > 1 and not last else nullcontext()
                with context, compiled_glue(model, enabled=glue == "compiled"):
                    # the completion's logits only, as TRL's GRPO loss (logits_to_keep)
                    logits = ddp(input_ids=batch, logits_to_keep=args.new_tokens + 1).logits[:, :-1].float()
                    logp = logits.log_softmax(-1).gather(-1, batch[:, args.prompt_len :, None]).squeeze(-1)
                    loss = -(adv[:, None] * logp).mean() / len(chunks)
                    loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            t2 = time.perf_counter()
            if step >= args.warmup:
                times.append((t2 - t0, t1 - t0, t2 - t1, len(rows) * args.new_tokens))
        del ddp, model, params, opt, seqs  # before the process group goes (see distributed.process_group)
        all_times = distributed.gather_to_all(times)
        if ranks.is_main:
            step = [max(t[i][0] for t in all_times) for i in range(len(times))]
            rollout = [max(t[i][1] for t in all_times) for i in range(len(times))]
            train = [max(t[i][2] for t in all_times) for i in range(len(times))]
            tokens = sum(t[0][3] for t in all_times)
            Path(out).write_text(
                json.dumps(
                    {
                        "world_size": world,
                        "sampler": sampler,
                        "engine": engine,
                        "glue": glue,
                        "step_s": statistics.median(step),
                        "rollout_s": statistics.median(rollout),
                        "train_s": statistics.median(train),
                        "rollout_tokens_per_s": tokens / statistics.median(rollout),
                    }
                )
            )


def _rollout_fn(model, engine: str, sampler: str, args):
    """ids (rows x prompt_len), keys -> rows x (prompt_len + new_tokens): every completion full length (no EOS)."""
    from transformers import LogitsProcessorList

    from tinyablate.engine import GenerationEngine, Sampling
    from tinyablate.sampling import KeyedGumbelSampler

    if engine != "hf":
        gen = GenerationEngine(model, pad_token_id=0, eos_token_ids=[], use_graphs=engine != "eager")

    def rollout(ids, keys):
        if engine != "hf":
            sampling = Sampling(temperature=1.0, keyed=sampler == "keyed")
            new = gen.generate(ids.tolist(), args.new_tokens, sampling, keys=keys if sampling.keyed else None)
            return torch.cat([ids, torch.tensor(new, device=ids.device)], dim=1)
        model.eval()
        kwargs = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
        if sampler == "keyed":
            kwargs = dict(
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                logits_processor=LogitsProcessorList([KeyedGumbelSampler(keys, 1.0)]),
            )
        with torch.no_grad():
            return model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pad_token_id=0,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                **kwargs,
            )

    return rollout


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> dict:
    args = parse(argv)
    worlds = [int(w) for w in args.world_sizes.split(",")]
    samplers = args.samplers.split(",")
    visible = torch.cuda.device_count() if args.device == "cuda" else None
    rows, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        args.svd_cache = str(Path(tmp) / "svd")
        for (engine, glue), sampler, world in itertools.product(args.pairs, samplers, worlds):
            if visible is not None and world > visible:
                skipped.append(f"{world} ranks ({visible} GPU(s) visible)")
                continue
            out = Path(tmp) / f"{engine}-{glue}-{sampler}-{world}.json"
            distributed.spawn_ranks(world, rank_main, args, world, sampler, str(out), engine, glue)
            rows.append(json.loads(out.read_text()))
    report = {
        "device": _device_name(args.device),
        "date": time.strftime("%Y-%m-%d"),
        "argv": sys.argv[1:] if argv is None else argv,
        "rows": rows,
        "skipped": sorted(set(skipped)),
    }
    print_table(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    if args.throughput and args.device == "cuda":
        kind = cost.device_kind(report["device"])
        for name, m in throughput_entries(report, args).items():
            cost.record_measurement(args.throughput, kind, name, m)
        print(f"updated {', '.join(throughput_entries(report, args))} of {kind} in {args.throughput}")
    return report


def throughput_entries(report: dict, args) -> dict:
    """The cost model's measurements (tinyablate/cost.py `derive`) from this run's torch-sampler rows: HF
    generate's rollouts ("decode"), the graph engine's ("decode_engine"), training, data parallelism."""
    torch_rows = [r for r in report["rows"] if r["sampler"] == "torch"]
    glues = {r.get("glue", "eager") for r in torch_rows}  # the cell's default on CUDA is compiled glue
    torch_rows = [r for r in torch_rows if r.get("glue", "eager") == ("compiled" if "compiled" in glues else "eager")]
    rows = {r["world_size"]: r for r in torch_rows if r.get("engine", "hf") == "hf"}
    graph = {r["world_size"]: r for r in torch_rows if r.get("engine") == "graph"}
    if 1 not in rows:
        return {}
    common = {
        "device": report["device"],
        "date": report["date"],
        "model": args.shape,
        "layers": args.layers,
        "command": "python benchmarks/dp_bench.py " + " ".join(report["argv"]),
    }
    seqs = args.prompts * args.generations
    out = {
        "decode": {
            **common,
            "batch": seqs,
            "prompt_tokens": args.prompt_len,
            "new_tokens": args.new_tokens,
            "seconds": rows[1]["rollout_s"],
            "source": "dp_bench.py: 1 GPU, torch sampler, rollout (HF generate)",
        },
        "train": {
            **common,
            "sequences": seqs,
            "tokens_per_sequence": args.prompt_len + args.new_tokens,
            "seconds": rows[1]["train_s"],
            "source": "dp_bench.py: 1 GPU, torch sampler, training",
        },
    }
    if 1 in graph:
        out["decode_engine"] = {
            **out["decode"],
            "seconds": graph[1]["rollout_s"],
            "source": "dp_bench.py: 1 GPU, torch sampler, rollout (tinyablate's graph engine)",
        }
    many = [w for w in rows if w > 1]
    if many:
        n = max(many)
        out["data_parallel"] = {
            **common,
            "gpus": n,
            "train_s_1": rows[1]["train_s"],
            "train_s_n": rows[n]["train_s"],
            "source": f"dp_bench.py: training on 1 vs {n} GPUs, torch sampler",
        }
    return out


def print_table(report: dict) -> None:
    rows = report["rows"]
    key = lambda r: (r.get("engine", "hf"), r.get("glue", "eager"), r["sampler"], r["world_size"])  # noqa: E731
    by = {key(r): r for r in rows}
    print(f"device: {report['device']}")
    wide = max(map(len, ENGINES)) + 2  # the engine column fits every engine's name
    print(
        f"{'engine':<{wide}}{'glue':<10}{'sampler':<8}{'ranks':>6}{'step s':>10}{'rollout s':>11}{'train s':>10}"
        f"{'rollout tok/s':>15}{'speed-up':>10}{'efficiency':>12}"
    )
    for r in rows:
        engine, glue, sampler, world = key(r)
        base = by.get((engine, glue, sampler, 1))
        speedup = base["step_s"] / r["step_s"] if base else float("nan")
        print(
            f"{engine:<{wide}}{glue:<10}{sampler:<8}{world:>6}{r['step_s']:>10.3f}{r['rollout_s']:>11.3f}"
            f"{r['train_s']:>10.3f}{r['rollout_tokens_per_s']:>15.0f}{speedup:>10.2f}{speedup / world:>12.2f}"
        )
    for r in rows:
        engine, glue, sampler, world = key(r)
        torch_row = by.get((engine, glue, "torch", world))
        if sampler == "keyed" and torch_row:
            ratio = r["rollout_tokens_per_s"] / torch_row["rollout_tokens_per_s"]
            print(f"{engine}: keyed / torch rollout tokens/s at {world} rank(s): {ratio:.3f}")
        before = by.get(("hf", "eager", sampler, world))  # HF generate rollouts, HF's eager modules in training
        if (engine, glue) != ("hf", "eager") and before:
            print(
                f"{engine} rollouts + {glue} glue vs hf + eager, {sampler} sampler, {world} rank(s): step "
                f"{before['step_s'] / r['step_s']:.2f}x faster, rollout {before['rollout_s'] / r['rollout_s']:.2f}x, "
                f"training {before['train_s'] / r['train_s']:.2f}x"
            )
    for s in report["skipped"]:
        print(f"not run: {s}")


def _device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


if __name__ == "__main__":
    main()
