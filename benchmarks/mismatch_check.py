"""GRPO-shaped batches through the generation engine, each sampled token's log-probability against a training
forward's: does the engine condition every row on its own prompt?

    python benchmarks/mismatch_check.py --device cuda --iterations 100      # the graph engine (GPU)
    python benchmarks/mismatch_check.py --device cpu --iterations 2         # the eager engine (CPU control)

The embedded SmolLM2-135M (bf16 on CUDA, fp32 on CPU, no adapter) and the arithmetic task's training prompts:
each iteration takes two prompts (usually of different token lengths) x 8 samples, as a GRPO step of the embedded
presets, samples 32 tokens at T=0.7 with the engine's log-probabilities, then scores the same tokens with one
full-sequence forward of the model (prompts left-padded, completions right-padded, as TRL's training batch) and
prints every iteration whose largest |log p_engine - log p_train| exceeds 2 nats, with both groups' rows.
Motivation: GRPO cells on an H200 logged steps whose mismatch reached 20-56 nats while clean steps stay below
1 (benchmarks/RESULTS.md, "GPU numerics").
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--iterations", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--samples", type=int, default=8, help="completions per prompt (the GRPO group)")
    p.add_argument("--attention", choices=["triton", "sdpa", "matmul"], help="the engine's decode attention")
    p.add_argument("--no-share", action="store_true", help="the engine without shared prompt rows")
    p.add_argument("--no-graphs", action="store_true", help="the engine without CUDA graphs")
    p.add_argument("--no-compile", action="store_true", help="the engine without compiled layers")
    p.add_argument(
        "--warm-eval",
        type=int,
        default=0,
        help="first a greedy generation of this many prompts (as a cell's base evaluation)",
    )
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"])
    args = p.parse_args(argv)

    from tinyablate.config.model import ModelConfig
    from tinyablate.config.task import TaskConfig
    from tinyablate.engine import EngineOptions, GenerationEngine, Sampling
    from tinyablate.models import load_model_and_tokenizer
    from tinyablate.tasks import load_task
    from tinyablate.train.rollouts import _prompt_ids

    model, tok, _ = load_model_and_tokenizer(
        ModelConfig(name="smollm2-135m", device=args.device, **({"dtype": args.dtype} if args.dtype else {}))
    )
    model.eval()
    task = load_task(TaskConfig(name="arithmetic"))
    prompts = [_prompt_ids(tok, row["prompt"]) for row in task.prompt_rows(task.train_problems())]
    options = EngineOptions(
        attention=args.attention, compile_glue=False if args.no_compile else None, share_prompts=not args.no_share
    )
    engine = GenerationEngine(
        model,
        tok.pad_token_id,
        [tok.eos_token_id],
        use_graphs=args.device == "cuda" and not args.no_graphs,
        options=options,
    )
    if args.warm_eval:
        engine.generate(prompts[: args.warm_eval], args.new_tokens)
    rng, worst, t0 = random.Random(0), [], time.time()
    for it in range(args.iterations):
        a, b = rng.sample(range(len(prompts)), 2)
        batch = [prompts[a]] * args.samples + [prompts[b]] * args.samples
        completions, logps = engine.generate(
            batch, args.new_tokens, Sampling(temperature=args.temperature), logprobs=True
        )
        diffs = token_mismatch(model, tok.pad_token_id, batch, completions, logps, args.temperature, args.device)
        rows = [d.max().item() if d.numel() else 0.0 for d in diffs]
        worst.append(max(rows))
        if worst[-1] > 2:
            print(
                f"iteration {it}: prompts {a} ({len(prompts[a])} tokens), {b} ({len(prompts[b])} tokens): largest "
                f"mismatch per row {[round(x, 1) for x in rows]}",
                flush=True,
            )
            explain(model, tok, batch, completions, logps, diffs, args)
    worst.sort()
    print(
        f"{len(worst)} batches in {time.time() - t0:.0f} s; largest mismatch per batch: median {worst[len(worst) // 2]:.3f},"
        f" p90 {worst[int(0.9 * len(worst))]:.3f}, max {worst[-1]:.2f} nats; batches above 2 nats: "
        f"{sum(w > 2 for w in worst)}",
        flush=True,
    )
    return 0


def explain(model, tok, batch, completions, logps, diffs, args) -> None:
    """For each row above 2 nats: where, the token, both log-probs, and the mismatch of its completion under
    the other prompt of the batch (small: the engine conditioned the row on the wrong prompt)."""
    others = [batch[-1] if p == batch[0] else batch[0] for p in batch]
    swapped = token_mismatch(model, tok.pad_token_id, others, completions, logps, args.temperature, args.device)
    for r, d in enumerate(diffs):
        if d.numel() and d.max() > 2:
            i = int(d.argmax())
            print(
                f"  row {r}: token {i} of {len(completions[r])} ({tok.decode([completions[r][i]])!r}), engine log p "
                f"{logps[r][i]:.2f}, mismatch {d[i]:.2f}; under the other prompt: max {swapped[r].max():.2f}, "
                f"mean {swapped[r].mean():.3f}; text {tok.decode(completions[r])!r}",
                flush=True,
            )


def token_mismatch(
    model, pad: int, prompts, completions, logps, temperature: float, device, micro_batch: int = 8
) -> list:
    """Per row, |log p_engine - log p_train| of each completion token (a CPU tensor), log p_train from full-sequence
    forwards of `micro_batch` rows (prompts left-padded, completions right-padded, as TRL's training batch)."""
    width, length = max(len(p) for p in prompts), max(len(c) for c in completions)
    ids = torch.full((len(prompts), width + length), pad)
    mask = torch.zeros_like(ids)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids[i, width - len(prompt) : width] = torch.tensor(prompt)
        ids[i, width : width + len(completion)] = torch.tensor(completion, dtype=torch.long)
        mask[i, width - len(prompt) : width + len(completion)] = 1
    train = []
    with torch.no_grad():
        for start in range(0, len(prompts), micro_batch):
            rows = slice(start, start + micro_batch)
            logits = model(input_ids=ids[rows].to(device), attention_mask=mask[rows].to(device)).logits[
                :, width - 1 : -1
            ]
            scaled = (logits.float() / temperature).log_softmax(-1)
            train.append(scaled.gather(-1, ids[rows, width:, None].to(device))[..., 0].cpu())
    train = torch.cat(train)
    return [(train[i, : len(c)] - torch.tensor(lp)).abs() for i, (c, lp) in enumerate(zip(completions, logps))]


if __name__ == "__main__":
    raise SystemExit(main())
