"""Cells per hour on one GPU: the embedded sweep's cells packed N at a time, each job a warm bundle.

    python benchmarks/pack_bench.py --out /tmp/pack --n 1,4,8,16          # one GPU; ~10 minutes on an H200
    python benchmarks/pack_bench.py --out /tmp/pack --n 2 --seeds-per-n 1 -- gpus=0 algo.max_steps=2   # a CPU try

For each N: `python launch.py -m` of the embedded sweep (SmolLM2-135M, arithmetic, TinyLoRA u = 1, 16, 256 by
GRPO and SFT, 30 steps) over enough seeds that every one of the N slots runs a bundle of several cells
(`hydra.launcher.cells_per_gpu=N max_parallel=N cells_per_job=ceil(cells / N)`), in a fresh output folder.
Prints, per N: cells, wall time of the whole command, cells per hour, each cell's peak GPU memory
(timing.gpu_peak_gib: torch's reserved memory; add ~0.5 GiB of CUDA context per process), the cost model's
estimate per cell, start to first step of each bundle's first cell and of its later cells, and the mean
accuracy of the completed cells (the packing must not change what the cells learn); failed cells are counted. Writes <out>/pack.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", default="1,4,8,16", help="cells at once on the GPU, comma-separated")
    p.add_argument(
        "--seeds-per-n",
        type=float,
        default=0.4,
        help="seeds (x 6 cells each) per slot: 0.4 gives every slot 2-3 cells one after another",
    )
    p.add_argument("overrides", nargs="*", help="more overrides for every cell (after --)")
    args = p.parse_args(argv)
    rows = []
    for n in [int(x) for x in args.n.split(",")]:
        seeds = max(1, math.ceil(args.seeds_per_n * n))
        rows.append(run(n, seeds, args.out / f"n{n}", args.overrides))
        print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pack.json").write_text(json.dumps(rows, indent=1))
    print(
        "\n| cells at once | cells | wall (s) | cells / hour | peak GPU GiB per cell (max) | modelled GiB | "
        "start to first step: bundle's first / later cells (median s) | mean accuracy |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']} | {r['cells']} | {r['wall_s']:.0f} | {r['cells_per_hour']:.0f} | {r['peak_gib_max']} | "
            f"{r['model_gib']:.1f} | {r['first_s']} / {r['later_s']} | {r['accuracy_mean']:.3f} |"
        )
    return 0


def run(n: int, seeds: int, out: Path, overrides: list) -> dict:
    cells = 6 * seeds
    per_job = math.ceil(cells / n)
    cmd = [
        sys.executable,
        str(REPO / "launch.py"),
        "-m",
        "logger=disabled",
        f"output_dir={out}",
        f"seed={','.join(map(str, range(seeds)))}",
        f"hydra.launcher.cells_per_gpu={n}",
        f"hydra.launcher.max_parallel={n}",
        f"hydra.launcher.cells_per_job={per_job}",
        *overrides,
    ]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - start
    results = [json.loads(p.read_text()) for p in out.rglob("result.json")]
    if proc.returncode not in (0, 1) or not results:  # 1: the sweep ran and some cell failed (counted below)
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    failed = [r for r in results if r["status"] != "completed"]
    results = [r for r in results if r["status"] == "completed"]
    first, later = _starts(out, results)
    peaks = [r["timing"].get("gpu_peak_gib") for r in results if r["timing"].get("gpu_peak_gib") is not None]
    return {
        "n": n,
        "cells": len(results) + len(failed),
        "failed": len(failed),
        "per_job": per_job,
        "wall_s": wall,
        "cells_per_hour": 3600 * (len(results) + len(failed)) / wall,
        "peak_gib_max": round(max(peaks), 2) if peaks else None,
        "peak_gib_median": round(statistics.median(peaks), 2) if peaks else None,
        "model_gib": _modelled_gib(results),
        "first_s": first,
        "later_s": later,
        "accuracy_mean": statistics.mean(r["metrics"]["accuracy"] for r in results),
        "failures": sorted({f"{r['cell_id']}: {r['error']['type']}" for r in failed}),
    }


def _starts(out: Path, results: list) -> tuple:
    """Median start-to-first-step of the first cell of each job, and of the cells after it (launch.json: job ids)."""
    by_job: dict = {}
    for r in results:
        launch = json.loads((out / r["sweep"] / r["cell_id"] / "launch.json").read_text())
        by_job.setdefault(launch["job_id"], []).append(r)
    first, later = [], []
    for cells in by_job.values():
        starts = sorted(
            c["timing"]["start_to_first_step_s"] for c in cells if c["timing"].get("start_to_first_step_s") is not None
        )
        if starts:  # the bundle's first cell counts from its process's start: the largest
            first.append(starts[-1])
            later += starts[:-1]
    med = lambda xs: round(statistics.median(xs), 1) if xs else None  # noqa: E731
    return med(first), med(later)


def _modelled_gib(results: list) -> float:
    from tinyablate.config import spec_from_dict
    from tinyablate.cost import cell_memory_bytes

    return max(cell_memory_bytes(spec_from_dict(r["config"])) for r in results) / 2**30


if __name__ == "__main__":
    raise SystemExit(main())
