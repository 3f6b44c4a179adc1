"""Differences between settings, each with a 95% interval over seeds and problems: what a sweep resolves.

A comparison is two settings (seeds aggregated) of one task, scorer, model and trainable-parameter count that
differ in exactly one axis of COMPARED (algorithm, adapter kind, frozen rank, sharing, precision of v, learning
rate); a sharing comparison may also differ in u and tie (tiled vs structured at the same parameter count).
Its difference is A's mean accuracy minus B's, in points, with a percentile interval from a two-level bootstrap:
each draw resamples the seeds of each setting and the evaluation problems (once for both settings: every cell
evaluates the same held-out problems, so the comparison is paired). A comparison whose interval excludes zero is
resolved; one whose interval holds zero is reported as unresolved, never dropped. Cells whose per-problem records
are not on disk (results read from W&B) resample their problems as n_eval Bernoulli draws at their accuracy.
The same bootstrap gives `normalized_gain`'s interval: a setting's share (T − B) / (L − B) of a reference's gain
over the base (analysis/family.py).

    from analysis.compare import comparisons
    for c in comparisons(rows): print(c["text"])     # e.g. "algo grpo − sft at 16 params: +21.0 points [14.0, 28.0]"
"""

from __future__ import annotations

import json
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Optional

import numpy as np

COMPARED = ("algo", "kind", "r", "sharing", "precision", "lr")
AXES = (*COMPARED, "u", "tie", "quantization")
SHARING_ALSO = {"u", "tie"}  # tiled vs structured at one parameter count: their u and tie differ too


def difference(a: list, b: list, level: float = 0.95, draws: int = 4000, seed: int = 0) -> tuple:
    """(mean of A − mean of B, low, high) in accuracy units; `a`, `b`: one list of per-problem scores (0/1) per
    seed. Problems are paired (resampled together) when both settings scored the same number of them."""
    A, B = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if A.ndim != 2 or B.ndim != 2 or 0 in A.shape or 0 in B.shape:
        raise ValueError("difference: each setting needs at least one seed with at least one problem")
    rng = np.random.default_rng(seed)
    point = A.mean() - B.mean()
    paired = A.shape[1] == B.shape[1]
    prob_a = rng.integers(0, A.shape[1], (draws, A.shape[1]))
    prob_b = prob_a if paired else rng.integers(0, B.shape[1], (draws, B.shape[1]))
    boot = _resampled(A, prob_a, rng) - _resampled(B, prob_b, rng)
    tail = (1 - level) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    return float(point), float(low), float(high)


def normalized_gain(tiny: list, lora: list, base: list, level: float = 0.95, draws: int = 4000, seed: int = 0) -> tuple:
    """((T − B) / (L − B), low, high): the share of LoRA's gain over the base that a setting T gets, with a
    percentile interval from the same bootstrap as `difference` (seeds of each setting and problems resampled,
    problems shared by all three when they scored the same number). Each argument: per seed, the per-problem
    scores. ValueError when L − B <= 0 (nothing to normalize by); low and high are None when L − B's own
    interval reaches 0 (the ratio is unbounded there)."""
    T, L, B = (np.asarray(x, dtype=float) for x in (tiny, lora, base))
    if any(S.ndim != 2 or 0 in S.shape for S in (T, L, B)):
        raise ValueError("normalized_gain: each setting needs at least one seed with at least one problem")
    if L.mean() - B.mean() <= 0:
        raise ValueError(f"normalized_gain: LoRA's gain over the base is {L.mean() - B.mean():+.4f} (<= 0)")
    rng = np.random.default_rng(seed)
    point = (T.mean() - B.mean()) / (L.mean() - B.mean())
    shared = rng.integers(0, T.shape[1], (draws, T.shape[1]))
    paired = L.shape[1] == B.shape[1] == T.shape[1]
    t, l, b = (
        _resampled(S, shared if paired else rng.integers(0, S.shape[1], (draws, S.shape[1])), rng) for S in (T, L, B)
    )
    tail = (1 - level) / 2
    if np.quantile(l - b, tail) <= 0:
        return float(point), None, None
    ratio = np.where(l - b > 0, (t - b) / np.where(l - b > 0, l - b, 1.0), np.copysign(np.inf, t - b))
    low, high = np.quantile(ratio, [tail, 1 - tail], method="inverted_cdf")
    return float(point), float(low), float(high)


def _resampled(scores: np.ndarray, problems: np.ndarray, rng) -> np.ndarray:
    """Per draw: the mean over resampled seeds of the mean over `problems` (draws x n indices)."""
    seeds = rng.integers(0, scores.shape[0], (problems.shape[0], scores.shape[0]))
    per_problem = scores[seeds].mean(axis=1)  # draws x n: each problem's score averaged over the drawn seeds
    return np.take_along_axis(per_problem, problems, axis=1).mean(axis=1)


def comparisons(rows: list, level: float = 0.95) -> list:
    """Every one-axis comparison among the completed cells `rows` (analysis/data.py's rows), as dicts: axis, a, b
    (the two values), task, scorer, model, params, n_a, n_b (seeds), diff, low, high (points), resolved, text."""
    by_setting = defaultdict(list)
    for row in rows:
        by_setting[row["config_key"]].append(row)
    settings = list(by_setting.values())
    groups = defaultdict(list)
    for cells in settings:
        first = cells[0]
        groups[(first["task"], first["scorer"], first["model"], first["trainable_params"])].append(cells)
    out = []
    for (task, scorer, model, params), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        for x, y in combinations(members, 2):
            axis = _one_axis(x[0], y[0])
            if axis is None:
                continue
            if str(x[0][axis]) > str(y[0][axis]):
                x, y = y, x
            diff, low, high = difference(seed_scores(x), seed_scores(y), level)
            resolved = low > 0 or high < 0
            text = (
                f"{axis} {x[0][axis]} − {y[0][axis]} at {params:,} params ({task}, {model}): "
                f"{100 * diff:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}]"
                + ("" if resolved else ", unresolved (the interval holds 0)")
            )
            out.append(
                {
                    "axis": axis,
                    "a": x[0][axis],
                    "b": y[0][axis],
                    "task": task,
                    "scorer": scorer,
                    "model": model,
                    "params": params,
                    "n_a": len(x),
                    "n_b": len(y),
                    "diff": 100 * diff,
                    "low": 100 * low,
                    "high": 100 * high,
                    "resolved": resolved,
                    "text": text,
                }
            )
    return out


def _one_axis(a: dict, b: dict) -> Optional[str]:
    """The compared axis two settings differ in, if they differ in exactly one (sharing: u and tie may differ too)."""
    differ = {k for k in AXES if a.get(k) != b.get(k)}
    compared = differ & set(COMPARED)
    if len(compared) != 1:
        return None
    (axis,) = compared
    rest = differ - compared
    return axis if not rest or (axis == "sharing" and rest <= SHARING_ALSO) else None


def seed_scores(cells: list) -> list:
    """Per seed, the per-problem scores (0/1) by the task's scorer, in problem-id order."""
    return [_problem_scores(c) for c in sorted(cells, key=lambda c: str(c["seed"]))]


def _problem_scores(row: dict) -> list:
    path = row.get("samples_path")
    key = "strict" if row["scorer"] == "strict" else "flexible"
    if path and Path(path).exists():
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        if records and all(key in r for r in records):
            return [float(r[key]) for r in sorted(records, key=lambda r: _natural(str(r.get("id"))))]
    n = int(row.get("n_eval") or 0)
    if n <= 0:
        raise ValueError(f"cell {row['cell_id']}: no per-problem records and no n_eval")
    hits = round(row["accuracy"] * n)  # the same accuracy as n Bernoulli outcomes
    return [1.0] * hits + [0.0] * (n - hits)


def _natural(text: str) -> tuple:
    head, _, tail = text.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (text, 0)
