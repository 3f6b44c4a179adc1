"""Check the GPU-hour cost model (tinyablate/cost.py) against recorded GRPO step times it was not fitted on.

Run: python benchmarks/cost_check.py        (CPU, instant: it runs nothing on a GPU)

It uses measurements already recorded in benchmarks/RESULTS.md and issue 10's text, not a new run:
1. the shipped h200 fit (dp_bench, 256 completions on 1 GPU: rollout 5.74 s, training 6.50 s) predicts
   dp_bench's 128-completion step on 1 GPU (9.25 s, same day and device): another batch;
2. a fit from component measurements only (decode: issue 10's HF generate, 27.4 ms per step with the adapter,
   256 rows, 128 + 256 tokens, H200, 2026-12-02; training: adapter_bench's 104.0 ms step, 8 layers, 8 x 512
   tokens, H100, 2026-11-23) predicts dp_bench's whole 256-completion step on 1 H200 (12.26 s);
3. the h200 fit predicts the 2-GPU step (8.71 s); its training part uses the data-parallel efficiency of
   the same run, so only the rollout's independence of the number of GPUs is tested there.
It prints predicted vs measured seconds and the relative error of each.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tinyablate import cost  # noqa: E402
from tinyablate.config.model import SHAPES  # noqa: E402

QWEN7B = SHAPES["qwen2.5-7b"]


def component_fit() -> cost.DeviceThroughput:
    """Decode from issue 10's HF generate per-step time, training from adapter_bench's H100 step."""
    m = copy.deepcopy(cost.load_table().data["devices"]["h200"])
    m["decode"] = {
        "model": "qwen2.5-7b",
        "layers": 28,
        "batch": 256,
        "prompt_tokens": 128,
        "new_tokens": 256,
        "seconds": 0.0274 * 256,
    }
    m["train"] = cost.load_table().data["devices"]["h100"]["train"]
    return cost.derive("components", m)


def checks() -> list:
    """(what, predicted seconds, measured seconds)."""
    h200 = cost.load_table().device("h200")
    rows = []
    r, t = cost.grpo_step(QWEN7B, h200, 128, 128, 256)
    rows.append(("h200 fit -> dp_bench 1 GPU, 128 completions, whole step", r + t, 9.25))
    rows.append(("h200 fit -> dp_bench 1 GPU, 128 completions, training", t, 3.25))
    comp = component_fit()
    r, t = cost.grpo_step(QWEN7B, comp, 256, 128, 256)
    rows.append(("component fit -> dp_bench 1 GPU, 256 completions, whole step", r + t, 12.26))
    rows.append(("component fit -> dp_bench 1 GPU, 256 completions, rollout", r, 5.74))
    rows.append(("component fit -> dp_bench 1 GPU, 256 completions, training", t, 6.50))
    r, t = cost.grpo_step(QWEN7B, h200, 256, 128, 256, ranks=2)
    rows.append(("h200 fit -> dp_bench 2 GPUs, 256 completions, whole step", r + t, 8.71))
    rows.append(("h200 fit -> dp_bench 2 GPUs, 256 completions, rollout", r, 5.46))
    return rows


def main() -> list:
    rows = checks()
    print(f"{'check (recorded measurements, not a new run)':<66}{'model s':>9}{'measured s':>12}{'error':>9}")
    for what, predicted, measured in rows:
        print(f"{what:<66}{predicted:>9.2f}{measured:>12.2f}{(predicted - measured) / measured:>+9.1%}")
    return rows


if __name__ == "__main__":
    main()
