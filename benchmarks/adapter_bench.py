"""Adapter benchmark: tinyablate's TinyLoRA against PEFT's TinyLoraConfig and the frozen floor.

Run (CPU, small shapes, ~1 min):     python benchmarks/adapter_bench.py --device cpu
Run (GPU, Qwen2.5-7B shape, 8 layers): python benchmarks/adapter_bench.py --device cuda --shape qwen2.5-7b --layers 8
Init alone (cold/warm/PEFT):          python benchmarks/adapter_bench.py --device cuda --only init

Random weights in the real model's shapes (no Hub). In one run, side by side, it prints:
- adapter init time per module: ours cold (empty SVD cache), ours warm (cache filled), PEFT;
- training-step time (forward + backward + AdamW step, bf16 base on GPU) as a ratio to the frozen
  floor: the same model, frozen, with one trainable scalar scaling the input embeddings;
- greedy generation tokens/s with the adapter active, as a ratio to the base model's HF generate.
Results go to stdout as a table and, with --out, to a JSON file.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tinyablate.adapters import apply_adapter  # noqa: E402
from tinyablate.config import AdapterConfig, SVDConfig  # noqa: E402

SHAPES = {
    # Qwen2.5-7B-Instruct's config.json (hidden, intermediate, heads, kv heads, vocab)
    "qwen2.5-7b": dict(
        hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064
    ),
    "small": dict(
        hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2, vocab_size=2048
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(args):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        **SHAPES[args.shape],
        num_hidden_layers=args.layers,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        use_cache=True,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(args.device):
        model = Qwen2ForCausalLM(cfg).to(args.dtype)
    model.eval()
    model.generation_config.pad_token_id = 0
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warmup, iters):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- init ------------------------------------------------------------------------------------
def ours_config(args, cache_dir, forward="fused"):
    return AdapterConfig(
        kind="tinylora", r=args.r, u=args.u, tie=args.tie, forward=forward, svd=SVDConfig(cache_dir=cache_dir)
    )


def peft_config(args):
    from peft import TinyLoraConfig

    tying = 1.0 if args.tie == "all" else (0.0 if int(args.tie) == 1 else None)
    if tying is None:
        raise SystemExit("--tie must be 1 or all to match PEFT's weight_tying")
    return TinyLoraConfig(r=args.r, u=args.u, weight_tying=tying, target_modules=TARGETS)


def bench_init(base, args, cache_dir):
    n = 7 * args.layers
    out = {}
    for label in ("ours_cold", "ours_warm"):
        model = copy.deepcopy(base)
        sync(args.device)
        start = time.perf_counter()
        apply_adapter(model, ours_config(args, cache_dir), f"bench:{args.shape}")
        sync(args.device)
        out[label] = 1000 * (time.perf_counter() - start) / n
        del model
    if not args.no_peft:
        from peft import get_peft_model

        model = copy.deepcopy(base)
        sync(args.device)
        start = time.perf_counter()
        get_peft_model(model, peft_config(args))
        sync(args.device)
        out["peft"] = 1000 * (time.perf_counter() - start) / n
        del model
    return out


# -- training step ---------------------------------------------------------------------------
def step_fn(model, params, ids, floor_scale=None):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        if floor_scale is not None:
            embeds = model.get_input_embeddings()(ids) * floor_scale
            loss = model(inputs_embeds=embeds, labels=ids, use_cache=False).loss
        else:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_steps(base, args, cache_dir, ids):
    res = {}
    scale = torch.ones((), device=args.device, dtype=torch.float32, requires_grad=True)
    res["floor"] = timed(step_fn(base, [scale], ids, scale), args.device, args.warmup, args.iters)
    for forward in ("fused", "unmerged"):
        model = copy.deepcopy(base)
        adapter = apply_adapter(model, ours_config(args, cache_dir, forward), f"bench:{args.shape}")
        res[f"ours_{forward}"] = timed(
            step_fn(model, adapter.trainable_parameters(), ids), args.device, args.warmup, args.iters
        )
        del model, adapter
    if not args.no_peft:
        from peft import LoraConfig, get_peft_model

        for label, pcfg in (
            ("peft_tinylora", peft_config(args)),
            ("peft_lora_r1", LoraConfig(r=1, lora_alpha=1, target_modules=TARGETS)),
        ):
            model = get_peft_model(copy.deepcopy(base), pcfg)
            params = [p for p in model.parameters() if p.requires_grad]
            res[label] = timed(step_fn(model, params, ids), args.device, args.warmup, args.iters)
            del model
    return {k: 1000 * v for k, v in res.items()}


# -- generation ------------------------------------------------------------------------------
def gen_fn(model, prompt, new_tokens):
    def run():
        with torch.no_grad():
            model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
            )

    return run


def perturb(params):
    with torch.no_grad():
        for p in params:
            p.normal_(0, 1e-3)


def bench_generate(base, args, cache_dir, prompt):
    """Tokens/s of each variant; rounds interleave the variants so drifts hit all of them alike."""
    variants = {"base": base}
    model = copy.deepcopy(base)
    adapter = apply_adapter(model, ours_config(args, cache_dir), f"bench:{args.shape}")
    perturb(adapter.trainable_parameters())
    variants["ours_fused"] = model
    if not args.no_peft:
        from peft import get_peft_model

        for label in ("peft_unmerged", "peft_merged"):
            peft_model = get_peft_model(copy.deepcopy(base), peft_config(args))
            perturb([p for p in peft_model.parameters() if p.requires_grad])
            if label == "peft_merged":
                peft_model.merge_adapter()
            variants[label] = peft_model
    runs = {label: gen_fn(m, prompt, args.gen_tokens) for label, m in variants.items()}
    for run in runs.values():
        run()  # warm-up
    times = {label: [] for label in runs}
    for _ in range(args.gen_iters):
        for label, run in runs.items():
            times[label].append(timed(run, args.device, 0, 1))
    n_tokens = prompt.shape[0] * args.gen_tokens
    return {label: n_tokens / statistics.median(t) for label, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--r", type=int, default=2)
    p.add_argument("--u", type=int, default=13)
    p.add_argument("--tie", default="1")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--gen-batch", type=int, default=None)
    p.add_argument("--gen-tokens", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--gen-iters", type=int, default=5)
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--only", default=None, choices=["init"], help="measure adapter init alone")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.shape = args.shape or ("qwen2.5-7b" if gpu else "small")
    args.layers = args.layers or (8 if gpu else 2)
    args.batch, args.seq = args.batch or (8 if gpu else 2), args.seq or (512 if gpu else 64)
    args.gen_batch, args.gen_tokens = args.gen_batch or (64 if gpu else 4), args.gen_tokens or (128 if gpu else 16)
    args.dtype = torch.bfloat16 if gpu else torch.float32
    if args.tie != "all":
        args.tie = int(args.tie)

    base = build_base(args)
    gen = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(args.device)
    prompt = torch.randint(1, vocab, (args.gen_batch, args.prompt_len), generator=gen).to(args.device)
    with tempfile.TemporaryDirectory() as cache_dir:
        init = bench_init(base, args, cache_dir)
        steps = {} if args.only else bench_steps(base, args, cache_dir, ids)
        gen_tps = {} if args.only else bench_generate(base, args, cache_dir, prompt)
    device_name = torch.cuda.get_device_name() if gpu else "cpu"
    report = {
        "device": device_name,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "args": {k: (str(v) if k == "dtype" else v) for k, v in vars(args).items()},
        "init_ms_per_module": init,
        "step_ms": steps,
        "generate_tokens_per_s": gen_tps,
    }
    print_table(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


def print_table(rep):
    a = rep["args"]
    print(f"\n## adapter_bench: {rep['device']}, {rep['date']}, torch {rep['torch']}")
    print(
        f"shape {a['shape']} x {a['layers']} layers, r={a['r']} u={a['u']} tie={a['tie']}, "
        f"step batch {a['batch']}x{a['seq']}, generate batch {a['gen_batch']} x {a['gen_tokens']} new tokens\n"
    )
    print("| measure | value | ratio |\n|---|---|---|")
    for k, v in rep["init_ms_per_module"].items():
        print(f"| init {k} | {v:.2f} ms/module | |")
    for k, v in rep["step_ms"].items():
        print(f"| train step {k} | {v:.1f} ms | {v / rep['step_ms']['floor']:.3f}x floor |")
    for k, v in rep["generate_tokens_per_s"].items():
        print(f"| generate {k} | {v:,.0f} tok/s | {v / rep['generate_tokens_per_s']['base']:.3f}x base |")


if __name__ == "__main__":
    main()
