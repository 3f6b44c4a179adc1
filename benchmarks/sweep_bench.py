"""Sweep benchmark: composing + validating a 1,000-cell grid, and the per-cell overhead.

Run: python benchmarks/sweep_bench.py            (CPU; ~1-2 minutes)

1. `python launch.py -m ... dry_run=true` over a 1,000-cell grid on the Qwen2.5-7B shape
   (u x tie x r x seed = 10 x 5 x 4 x 5), and over the 4,320-cell paper_gsm8k preset: wall time of
   the whole command (Python start, Hydra, composing, validating, counting every cell's parameters).
2. Per-cell overhead: a 2-cell local sweep of tiny models; from each result.json, the time from the
   job's process start to its first training step, minus weight loading and base evaluation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GRID_1000 = [
    "model=qwen2.5-7b",
    "task=gsm8k",
    "algo=grpo",
    "adapter.u=1,2,4,8,13,32,64,128,256,1024",
    "adapter.tie=1,2,7,28,all",
    "adapter.r=1,2,4,8",
    "seed=0,1,2,3,4",
]
TINY = [
    "model=tiny-qwen2",
    "task.max_value=9",
    "task.train_size=40",
    "task.eval_size=8",
    "algo=grpo_cpu",
    "algo.max_steps=3",
    "algo.prompts_per_step=2",
    "algo.num_generations=4",
    "algo.micro_batch_size=8",
    "algo.max_completion_length=8",
    "eval.max_new_tokens=8",
    "logger=disabled",
]


def run(args, cwd):
    env = {**os.environ, "WANDB_MODE": "disabled", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    return time.perf_counter() - start, proc.stdout


def main():
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for label, args in (
            ("1,000-cell grid", ["-m", *GRID_1000]),
            ("paper_gsm8k (4,320 cells)", ["-m", "sweeps=paper_gsm8k"]),
        ):
            wall, out = run([*args, "dry_run=true", f"output_dir={tmp}/runs"], tmp)
            inner = next(line for line in out.splitlines() if line.startswith("composed and validated"))
            rows.append((label, wall, inner))
        _, out = run(
            ["-m", *TINY, "adapter.u=1,2", f"output_dir={tmp}/runs", "sweep=overhead", "hydra.launcher.max_parallel=1"],
            tmp,
        )
        overheads = []
        for path in Path(tmp, "runs", "overhead").rglob("result.json"):
            timing = json.loads(path.read_text())["timing"]
            overheads.append(
                (timing["start_to_first_step_s"], timing["model_load_s"], timing["overhead_to_first_step_s"])
            )
    print(f"\n## sweep_bench: {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs\n")
    print("| grid | dry run, whole command | inside the launcher |\n|---|---|---|")
    for label, wall, inner in rows:
        print(f"| {label} | {wall:.1f} s | {inner} |")
    print(
        "\n| cell | process start -> first step | weight loading | overhead (excl. loading, base eval) |\n|---|---|---|---|"
    )
    for i, (total, load, over) in enumerate(overheads):
        print(f"| tiny cell {i} | {total:.2f} s | {load:.2f} s | {over:.2f} s |")


if __name__ == "__main__":
    main()
