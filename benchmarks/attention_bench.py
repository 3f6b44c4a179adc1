"""The cuDNN attention fault and what avoiding it costs: which SDPA backends give non-finite gradients on which
inputs, and a TinyLoRA training step (forward + backward, padded batches) with torch's default backends against
the backends the attention check keeps (tinyablate/train/attention_check.py), side by side in one run.

Run (GPU): python benchmarks/attention_bench.py [--models qwen2.5-7b:8,smollm2-135m,qwen2.5-coder-0.5b] [--out FILE]

Part 1 prints, per backend and key length, whether the check's cases (low log-sum-exp rows under a mask; left
padding) give finite gradients close to the float32 reference. Part 2 times a step per model: a name with
`:N` is that model's shape with random weights and N layers (qwen2.5-7b:8); a registry name loads the real
model (embedded ones from their packages). Batches: 16 sequences of lengths drawn in 160..448, left-padded to 448
(so transformers passes a mask, and the key length is 64 mod 128), TinyLoRA u=16 tie=all on every linear module; times are medians of 10 steps
after 3, the two settings alternated step by step; the ratio is checked / default.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tinyablate.adapters import apply_adapter  # noqa: E402
from tinyablate.config import AdapterConfig, ModelConfig  # noqa: E402
from tinyablate.config.model import SHAPES  # noqa: E402
from tinyablate.kernels import head_dim  # noqa: E402
from tinyablate.train import attention_check as A  # noqa: E402

LENGTHS = (64, 128, 192, 256, 320, 448, 576, 704, 768, 1088)
BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION)


def fault_matrix(dtype, head_size: int) -> dict:
    """backend -> case -> length -> "ok" | "unsupported" | the problem."""
    out = {}
    for backend in BACKENDS:
        out[backend.name] = {}
        for name, case in A.CASES.items():
            row = {}
            for length in LENGTHS:
                q, k, v, mask, grad_out, rows = case("cuda", dtype, head_size, length)
                try:
                    with sdpa_kernel([backend]):
                        got = A._forward_backward(q, k, v, mask, grad_out)
                except RuntimeError:
                    row[length] = "unsupported"
                    continue
                want = A._forward_backward(*(t.float() for t in (q, k, v)), mask, grad_out.float(), reference=True)
                row[length] = A._compare(got, want, rows, A._TOLERANCE[dtype], shifted=case is A._low_lse_rows) or "ok"
            out[backend.name][name] = row
    return out


def build(spec: str):
    """A frozen bf16 model on the GPU with TinyLoRA u=16 tie=all: `name:N` random in that shape, else the real one."""
    if ":" in spec:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        name, layers = spec.split(":")
        s = SHAPES[name]
        cfg = Qwen2Config(
            hidden_size=s.hidden,
            intermediate_size=s.intermediate,
            num_attention_heads=s.heads,
            num_key_value_heads=s.kv_heads,
            vocab_size=s.vocab,
            num_hidden_layers=int(layers),
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        )
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
        model.requires_grad_(False)
    else:
        from tinyablate.models import load_model_and_tokenizer

        model, _, _ = load_model_and_tokenizer(ModelConfig(name=spec, device="cuda"))
    apply_adapter(model, AdapterConfig(kind="tinylora", r=2, u=16, tie="all"), spec)
    model.train()
    return model


def batch(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(160, 449, (16,), generator=g)
    lengths[0] = width = 448  # 64 mod 128: the key length of the cuDNN fault

    ids = torch.randint(0, vocab, (16, width), generator=g)
    mask = torch.arange(width)[None, :] >= (width - lengths)[:, None]  # left padding
    labels = ids.masked_fill(~mask, -100)
    return {k: t.cuda() for k, t in dict(input_ids=ids, attention_mask=mask.long(), labels=labels).items()}


def step_times(model, inputs: dict, kept: list, iters: int = 10, warmup: int = 3) -> tuple:
    """Median seconds of a forward + backward with torch's default backends and with `kept`, alternated."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        loss = model(**inputs, use_cache=False).loss
        loss.backward()
        for p in params:
            p.grad = None
        return loss

    times = {"default": [], "checked": []}
    for i in range(warmup + iters):
        for label in ("default", "checked"):
            ctx = sdpa_kernel(kept) if label == "checked" else torch.enable_grad()
            with ctx:
                torch.cuda.synchronize()
                start = time.perf_counter()
                loss = step()
                torch.cuda.synchronize()
                if i >= warmup:
                    times[label].append(time.perf_counter() - start)
                if not torch.isfinite(loss):
                    times.setdefault(f"{label}_nonfinite_loss", 0)
                    times[f"{label}_nonfinite_loss"] += 1
    return statistics.median(times["default"]), statistics.median(times["checked"]), times


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="qwen2.5-7b:8,smollm2-135m,qwen2.5-coder-0.5b")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    report = {
        "device": A._device_name(torch.device("cuda")),
        "date": time.strftime("%Y-%m-%d"),
        "faults": {f"bfloat16, head size {hd}": fault_matrix(torch.bfloat16, hd) for hd in (64, 128)},
    }
    for setting, backends in report["faults"].items():
        for backend, cases in backends.items():
            for case, row in cases.items():
                bad = [f"{n}: {r}" for n, r in row.items() if r not in ("ok", "unsupported")]
                print(f"{setting:22s} {backend:20s} {case:36s} " + ("; ".join(bad) or "all lengths ok or unsupported"))
    report["steps"] = {}
    for spec in args.models.split(","):
        model = build(spec)
        check = A.check_attention(torch.device("cuda"), torch.bfloat16, head_dim(model.config))
        kept = [getattr(SDPBackend, name.upper()) for name in check.kept]
        default, checked, raw = step_times(model, batch(model.config.vocab_size), kept)
        report["steps"][spec] = {
            "default_s": default,
            "checked_s": checked,
            "ratio": checked / default,
            "kept": check.kept,
            "failed": check.failed,
            "nonfinite": {k: v for k, v in raw.items() if k.endswith("nonfinite_loss")},
        }
        print(
            f"{spec:22s} step default {1000 * default:.1f} ms | checked {1000 * checked:.1f} ms "
            f"({checked / default:.3f}x) | kept {','.join(check.kept)} | {report['steps'][spec]['nonfinite']}"
        )
        del model
        torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
