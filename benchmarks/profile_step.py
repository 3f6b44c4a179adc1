"""Where the fused TinyLoRA training step spends its time over the frozen floor.

Run (GPU): python benchmarks/profile_step.py --layers 8

Prints, for the Qwen2.5-7B shape with random weights: floor forward+backward, fused forward+backward
with v unchanged (no re-merge), the merge of every adapted module (addmm vs the Triton kernel when
available), and the top CUDA kernels of one fused step (torch.profiler).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import adapter_bench as bench  # noqa: E402

from tinyablate.adapters import apply_adapter  # noqa: E402


def fwd_bwd(model, ids, scale=None):
    def run():
        if scale is not None:
            loss = model(inputs_embeds=model.get_input_embeddings()(ids) * scale, labels=ids, use_cache=False).loss
        else:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()

    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--shape", default="qwen2.5-7b")
    args = p.parse_args()
    ns = argparse.Namespace(device="cuda", shape=args.shape, layers=args.layers, dtype=torch.bfloat16, r=2, u=13, tie=1)
    base = bench.build_base(ns)
    ids = torch.randint(0, base.config.vocab_size, (8, 512), device="cuda")
    scale = torch.ones((), device="cuda", requires_grad=True)
    t_floor = bench.timed(fwd_bwd(base, ids, scale), "cuda", 3, 10)
    model = copy.deepcopy(base)
    adapter = apply_adapter(model, bench.ours_config(ns, ""), "profile")
    t_fused = bench.timed(fwd_bwd(model, ids), "cuda", 3, 10)
    layers = list(adapter.layers.values())

    def merge_all():
        for layer in layers:
            layer._w_eff_version = -1
            layer._merged_weight()

    t_merge = bench.timed(merge_all, "cuda", 2, 10)
    print(
        f"floor fwd+bwd {1000 * t_floor:.1f} ms | fused fwd+bwd (no re-merge) {1000 * t_fused:.1f} ms "
        f"({t_fused / t_floor:.3f}x) | merge all {len(layers)} modules {1000 * t_merge:.2f} ms"
    )
    n_bytes = sum(4 * layer.weight.numel() for layer in layers)
    print(f"merge moves >= {n_bytes / 1e9:.2f} GB: {n_bytes / t_merge / 1e12:.2f} TB/s achieved")

    opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-4)

    def step():
        fwd_bwd(model, ids)()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
