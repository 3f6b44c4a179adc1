"""QLoRA against LoRA on the unquantized (bf16) base at the same r: training-step time and peak GPU memory, side by side.

Run (GPU, full Qwen2.5-7B shape, ~3 min): python benchmarks/qlora_bench.py --device cuda
Run (CPU, small shape, ~20 s):            python benchmarks/qlora_bench.py --device cpu --shape small --layers 2

Random weights in the real model's shapes (no Hub), bf16 on a GPU (fp32 on CPU). For each base
(`--bases`: model.quantization values, default none and nf4, through tinyablate.quantization) it builds the model, puts LoRA at
rank r on every linear layer of every block (tinyablate.adapters, PEFT underneath: QLoRA on nf4), and
times a training step: forward + backward over `--batch` sequences of `--seq` random tokens and an
AdamW step on the LoRA weights (fp32, as adapter.precision=fp32). It prints, per base: the frozen
base's bytes (quantization.base_bytes), memory allocated once built, peak memory during the steps,
and the median step time; then each quantized base's ratios to the unquantized one. `--json PATH` writes the same numbers.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.adapter_bench import SHAPES, build_base, timed  # noqa: E402
from tinyablate.adapters import apply_adapter  # noqa: E402
from tinyablate.config import AdapterConfig  # noqa: E402
from tinyablate.quantization import base_bytes, quantize_base  # noqa: E402

GIB = 1024**3


def measure(base: str, args) -> dict:
    """Build one base with LoRA on it and time its training step."""
    model = build_base(args)
    quantize_base(model, base)  # "none": nothing
    adapter = apply_adapter(model, AdapterConfig(kind="lora", r=args.r, lora_alpha=2.0 * args.r), f"bench:{base}")
    model = adapter.model
    model.train()
    gc.collect()
    out = {"base": base, "base_bytes": base_bytes(model), "trainable_params": adapter.trainable_params}
    if args.device == "cuda":
        torch.cuda.empty_cache()
        out["built_gib"] = torch.cuda.memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(
        0,
        model.config.vocab_size,
        (args.batch, args.seq),
        device=args.device,
        generator=torch.Generator(args.device).manual_seed(0),
    )

    losses = []

    def step():
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    out["step_s"] = timed(step, args.device, args.warmup, args.iters)
    out["loss_first"], out["loss_last"] = float(losses[0]), float(losses[-1])  # it trains: the same batch again
    if args.device == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    model = adapter = opt = params = None  # freed before the next configuration
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="qwen2.5-7b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=28, help="decoder blocks (Qwen2.5-7B has 28)")
    parser.add_argument("--bases", default="none,nf4", help="comma list of none, nf4, int8")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    started = time.time()
    rows = [measure(base, args) for base in args.bases.split(",")]
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {
        "device": device,
        "torch": torch.__version__,
        "shape": args.shape,
        "layers": args.layers,
        "r": args.r,
        "batch": args.batch,
        "seq": args.seq,
        "iters": args.iters,
        "rows": rows,
        "wall_s": time.time() - started,
    }
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


def print_table(report: dict) -> None:
    print(
        f"{report['device']}, torch {report['torch']}, {report['shape']} x {report['layers']} layers, LoRA r={report['r']}, "
        f"batch {report['batch']} x {report['seq']} tokens, median of {report['iters']} steps"
    )
    print(f"{'base':<6} {'base GiB':>9} {'built GiB':>10} {'peak GiB':>9} {'step s':>8} {'trainable':>12} {'loss':>15}")
    for r in report["rows"]:
        print(
            f"{r['base']:<6} {r['base_bytes'] / GIB:>9.2f} {r.get('built_gib', float('nan')):>10.2f} "
            f"{r.get('peak_gib', float('nan')):>9.2f} {r['step_s']:>8.3f} {r['trainable_params']:>12,} "
            f"{r['loss_first']:>7.3f}->{r['loss_last']:.3f}"
        )
    by = {r["base"]: r for r in report["rows"]}
    for base in by:
        if base != "none" and "none" in by:
            ref = by["none"]
            ratios = [
                f"step time {by[base]['step_s'] / ref['step_s']:.2f}x",
                f"base bytes {by[base]['base_bytes'] / ref['base_bytes']:.3f}x",
            ]
            if "peak_gib" in by[base]:
                ratios.append(f"peak memory {by[base]['peak_gib'] / ref['peak_gib']:.2f}x")
            print(f"{base} vs none ({'bf16' if report['device'] != 'cpu' else 'fp32'}): " + ", ".join(ratios))


if __name__ == "__main__":
    main()
