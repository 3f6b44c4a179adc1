"""The family study: the share of LoRA's gain that TinyLoRA gets at each budget, per model and algorithm.

For one task, scorer, model and algorithm: the base B is the model's 0-parameter accuracy (data.base_point:
its kind=none cells, else the base accuracy its trained cells report); the reference L is its LoRA setting of
the smallest rank run (r=1 in the family study; the best of them when several); each budget T is the best
TinyLoRA setting at one trainable-parameter count (data.frontier; with tie=all the count is u on every model).
The normalized gain is (T − B) / (L − B), 1 = LoRA's gain, with a 95% interval from compare.py's bootstrap over
seeds and problems. It is undefined, and the row says why, when L − B <= 0 (LoRA does not beat the base: nothing
to normalize by), when the model has no LoRA cell for that algorithm, or no base accuracy. The half-LoRA budget
is the smallest budget run whose mean normalized gain is at least ½ (None: not reached).

    from analysis.family import family_gains
    for g in family_gains(rows, aggregate(rows)): print(g["model"], g["algo"], g["params"], g["gain"])
"""

from __future__ import annotations

from typing import Optional

from .compare import normalized_gain, seed_scores
from .data import base_point, frontier, task_groups

HALF = 0.5
# family.csv: one row per task, scorer, model, algorithm and TinyLoRA budget.
FAMILY_COLUMNS = [
    "task",
    "scorer",
    "family",
    "model",
    "algo",
    "params",
    "n_seeds",
    "accuracy",
    "base_accuracy",
    "lora_r",
    "lora_params",
    "lora_accuracy",
    "gain",
    "gain_low",
    "gain_high",
    "half_lora_params",
    "note",
]


def family_gains(rows: list, settings: list) -> list:
    """FAMILY_COLUMNS dicts for every task and scorer with LoRA cells, per model (by family), algorithm and
    TinyLoRA budget; `rows` the completed cells, `settings` their aggregate (data.aggregate)."""
    out = []
    for (task, scorer), mine in task_groups(rows).items():
        here = [s for s in settings if (s["task"], s["scorer"]) == (task, scorer)]
        if not any(s["kind"] == "lora" for s in here):
            continue
        for family, model in sorted({(s["family"], s["model"]) for s in here}):
            cells = [r for r in mine if r["model"] == model]
            ours = [s for s in here if s["model"] == model]
            base = base_point(ours, cells)
            for algo in sorted({s["algo"] for s in ours if s["kind"] == "tinylora"}):
                out += model_gains([s for s in ours if s["algo"] == algo], cells, base)
    return out


def lora_reference(settings: list) -> Optional[dict]:
    """The LoRA setting of the smallest rank among `settings` (the best mean when several), or None."""
    lora = [s for s in settings if s["kind"] == "lora"]
    if not lora:
        return None
    r = min(s["r"] for s in lora)
    return max((s for s in lora if s["r"] == r), key=lambda s: s["accuracy_mean"])


def model_gains(settings: list, cells: list, base: Optional[dict]) -> list:
    """The rows of one model and algorithm: `settings` its settings, `cells` the model's completed cells (this
    task), `base` its data.base_point."""
    lora = lora_reference(settings)
    budgets, _ = frontier([s for s in settings if s["kind"] == "tinylora"])
    why = undefined_because(base, lora)
    out = []
    for s in budgets:
        g = {
            "task": s["task"],
            "scorer": s["scorer"],
            "family": s["family"],
            "model": s["model"],
            "algo": s["algo"],
            "params": s["trainable_params"],
            "n_seeds": s["n_seeds"],
            "accuracy": s["accuracy_mean"],
            "base_accuracy": None if base is None else base["accuracy_mean"],
            "lora_r": None if lora is None else lora["r"],
            "lora_params": None if lora is None else lora["trainable_params"],
            "lora_accuracy": None if lora is None else lora["accuracy_mean"],
            "gain": None,
            "gain_low": None,
            "gain_high": None,
            "note": why or "",
        }
        if why is None:
            _add_gain(g, s, lora, cells, base)
        out.append(g)
    half = half_lora_budget(out)
    for g in out:
        g["half_lora_params"] = half
    return out


def _add_gain(g: dict, tiny: dict, lora: dict, cells: list, base: dict) -> None:
    """Fill g's gain and interval from the per-problem scores of the TinyLoRA and LoRA settings and the base."""
    try:
        scores = (_setting_scores(tiny, cells), _setting_scores(lora, cells), _base_scores(cells, base))
        g["gain"], g["gain_low"], g["gain_high"] = normalized_gain(*scores)
    except ValueError as err:  # a cell with neither per-problem records nor n_eval
        g["note"] = f"undefined: {err}"
        return
    if g["gain_low"] is None:
        g["note"] = "interval unbounded: the interval of LoRA's own gain over the base reaches 0"


def undefined_because(base: Optional[dict], lora: Optional[dict]) -> Optional[str]:
    """Why the normalized gain is undefined for a model and algorithm; None when it is defined."""
    if base is None:
        return "undefined: no base accuracy (no kind=none cell, no reported base accuracy)"
    if lora is None:
        return "undefined: no LoRA cell of this model and algorithm"
    lift = lora["accuracy_mean"] - base["accuracy_mean"]
    if lift <= 0:
        return (
            f"undefined: LoRA r={lora['r']} gains {100 * lift:+.1f} points over the base (<= 0), "
            "so there is no gain to take a share of"
        )
    return None


def half_lora_budget(gains: list) -> Optional[int]:
    """The smallest budget whose mean normalized gain is at least ½; None when none is (or none defined)."""
    reached = [g["params"] for g in gains if g["gain"] is not None and g["gain"] >= HALF]
    return min(reached) if reached else None


def half_lora_label(g: dict):
    """A row's half-LoRA budget: the count, "not reached", or "undefined" (no normalized gain to read)."""
    if g["half_lora_params"] is not None:
        return g["half_lora_params"]
    return "undefined" if g["gain"] is None else "not reached"


def _setting_scores(setting: dict, cells: list) -> list:
    return seed_scores([c for c in cells if c["config_key"] == setting["config_key"]])


def _base_scores(cells: list, base: dict) -> list:
    """Per-problem base scores: the kind=none cells' records, else n_eval outcomes at the reported base accuracy
    (one row: the base is not seeded)."""
    none = [c for c in cells if c["trainable_params"] == 0]
    if none:
        return seed_scores(none)
    n = max(int(c.get("n_eval") or 0) for c in cells)
    hits = round(base["accuracy_mean"] * n)
    return [[1.0] * hits + [0.0] * (n - hits)]
