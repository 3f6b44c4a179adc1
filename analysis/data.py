"""Read sweep folders into flat rows, aggregate seeds, and compute the curves the report draws.

Only `result.json` files are read (never logs or stdout), through tinyablate.cell_folder (the result
schema). A cell folder is one holding `result.json`, `spec.json` or `running.json`; hidden folders
(`.submitit`, `.hydra`) are skipped. A folder given may be a sweep folder (cells inside) or the output
root (sweep folders inside). A completed cell whose training ended collapsed stays in the rows (summary.csv's
collapse_step) but in no mean (`aggregate`, `measured`: COLLAPSE_NOTE).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from scipy.stats import t as student_t

from tinyablate.cell_folder import CellFolder, Result, ResultError, eval_samples_file, sweep_cell_folders
from tinyablate.config import ConfigError, identity_dict, spec_from_dict

# One row per completed cell, in this order, in summary.csv.
CSV_COLUMNS = [
    "cell_id",
    "sweep",
    "task",
    "scorer",
    "model",
    "family",
    "size",
    "algo",
    "kind",
    "r",
    "u",
    "tie",
    "sharing",
    "precision",
    "seed",
    "trainable_params",
    "trainable_bytes",
    "bits_per_param",
    "accuracy",
    "accuracy_strict",
    "accuracy_flexible",
    "base_accuracy",
    "n_eval",
    "train_steps",
    "gpu_hours",
    "wall_s",
    "quantization",
    "base_bytes",
    "collapse_step",
]
# Axes whose values get a GPU-hours line in summary.md.
AXES = ["task", "model", "family", "algo", "kind", "r", "u", "tie", "sharing", "precision", "quantization", "seed"]


@dataclass
class Skipped:
    """A cell folder that gives no accuracy: failed, running, pending or unreadable."""

    state: str  # failed | running | pending | unreadable
    sweep: str
    cell_id: str
    path: Path
    reason: str
    wall_s: Optional[float] = None


@dataclass
class Sweeps:
    """Everything read from the folders given."""

    dirs: list
    rows: list = field(default_factory=list)  # completed cells, dicts with CSV_COLUMNS (+ config_key, lr)
    skipped: list = field(default_factory=list)  # Skipped

    def counts(self) -> dict:
        """Cells per state; "collapsed": the completed cells whose training collapsed (is_collapsed)."""
        out = {"completed": len(self.rows), "collapsed": len(collapsed(self.rows))}
        for s in self.skipped:
            out[s.state] = out.get(s.state, 0) + 1
        return out


# -- collapsed cells: drawn and counted, never averaged ------------------------------------------
COLLAPSE_NOTE = (
    "A cell whose GRPO training ended collapsed (result.json's metrics.collapse: for algo.collapse_steps steps in a "
    "row every group's rewards were equal, or every completion was empty or cut at the length cap) is left out of "
    "every mean, interval, curve and comparison here; the plots draw it as a black ×, the tables count it."
)


def is_collapsed(row: dict) -> bool:
    """A completed cell whose training ended collapsed (its collapse did not recover): never averaged."""
    return row.get("collapse_step") is not None


def measured(rows: list) -> list:
    """The rows the means are taken over: every completed cell that did not end collapsed."""
    return [r for r in rows if not is_collapsed(r)]


def collapsed(rows: list) -> list:
    """The completed cells whose training ended collapsed: drawn, listed and counted apart."""
    return [r for r in rows if is_collapsed(r)]


# -- reading -------------------------------------------------------------------------------------
def load_sweeps(sweep_dirs: Iterable[Path], results: Iterable[dict] = ()) -> Sweeps:
    """Read every cell folder under `sweep_dirs`, plus completed `results` from elsewhere (W&B).

    Raises ValueError (naming the folder) when a folder does not exist or holds no cell folder,
    and when no cell at all has completed. A cell found in a folder wins over the same cell in
    `results`.
    """
    dirs, seen = [], set()
    for d in sweep_dirs:
        d = Path(d)
        if d.resolve() not in seen:
            seen.add(d.resolve())
            dirs.append(d)
    results = list(results)
    if not dirs and not results:
        raise ValueError("no sweep folder given")
    out = Sweeps(dirs=dirs)
    seen_cells = set()
    for d in dirs:
        if not d.is_dir():
            raise ValueError(f"{d}: no such sweep folder")
        cells = sweep_cell_folders(d)
        if not cells:
            raise ValueError(
                f"{d}: no results - it holds no cell folder (a folder with result.json, "
                "spec.json or running.json); pass a sweep folder such as runs/<sweep>"
            )
        for cell in cells:
            if cell.path.resolve() in seen_cells:
                continue
            seen_cells.add(cell.path.resolve())
            _read_cell(cell, out)
    _add_results(results, out)
    if not out.rows:
        counts = ", ".join(f"{n} {state}" for state, n in sorted(out.counts().items()) if n)
        raise ValueError(f"{', '.join(map(str, dirs))}: no completed results ({counts}); nothing to analyse")
    return out


def _add_results(results: list, out: Sweeps) -> None:
    """Completed results read elsewhere (W&B), for the cells no folder holds."""
    local = {row["cell_id"] for row in out.rows}
    for raw in results:
        try:
            result = Result.parse(raw, f"the W&B run of cell {raw.get('cell_id')}")
        except ResultError as err:
            out.skipped.append(
                Skipped(
                    "unreadable",
                    str(raw.get("sweep") or "wandb"),
                    str(raw.get("cell_id")),
                    Path("wandb"),
                    _short(err, 200),
                )
            )
            continue
        if result.cell_id not in local:
            local.add(result.cell_id)
            out.rows.append(result_row(result, str(result.sweep or "wandb")))


def _read_cell(cell: CellFolder, out: Sweeps) -> None:
    sweep_guess = cell.path.parent.name
    try:
        result = cell.read_result()
    except ResultError as err:
        out.skipped.append(Skipped("unreadable", sweep_guess, cell.name, cell.path, _short(err, 200)))
        return
    if result is None:
        spec = cell.read_spec() or {}
        state = cell.state()
        reason = {
            "running": "a live process holds the cell (in progress)",
            "interrupted": "started, then killed without a result (a re-run resumes it)",
        }.get(state, "spec.json only (not started)")
        out.skipped.append(Skipped(state, sweep_guess, str(spec.get("cell_id", cell.name)), cell.path, reason))
        return
    sweep, wall = str(result.sweep or sweep_guess), result.timing.wall_s if result.timing else None
    if result.status == "failed":
        reason = f"{result.error.type}: {result.error.message}".strip()
        out.skipped.append(Skipped("failed", sweep, result.cell_id, cell.path, _short(reason, 200), wall))
        return
    try:
        row = result_row(result, sweep)
        row["samples_path"] = str(cell.file(eval_samples_file(None)))  # per-problem records (analysis/compare.py)
        out.rows.append(row)
    except ValueError as err:
        out.skipped.append(Skipped("unreadable", sweep, result.cell_id, cell.path, _short(err), wall))


def result_row(result: Result, sweep: str) -> dict:
    """The flat row of a completed result (ValueError when its accuracy is not a number)."""
    model, adapter, metrics, task, algo = result.model, result.adapter, result.metrics, result.task, result.algo
    config = result.config or {}
    gpu_hours, wall_s = (result.timing.gpu_hours, result.timing.wall_s) if result.timing else (None, None)
    params, nbytes = adapter.trainable_params, adapter.trainable_bytes or 0
    accuracy = _num(metrics.accuracy)
    if accuracy is None:
        raise ValueError("metrics.accuracy is not a number")
    kind = adapter.kind or "none"
    row = {
        "cell_id": result.cell_id,
        "sweep": sweep,
        "task": task.name,
        "scorer": task.scorer or "",
        "model": model.name,
        "family": model.family or "?",
        "size": model.size,
        "algo": algo.name,
        "kind": kind,
        "r": adapter.r if kind != "none" else None,
        "u": adapter.u if kind == "tinylora" else None,
        "tie": adapter.tie if kind in ("tinylora", "lora_xs") else None,
        "sharing": adapter.sharing if kind in ("tinylora", "lora_xs") else None,
        "precision": adapter.precision if kind != "none" else None,
        "seed": config.get("seed", 0),
        "trainable_params": params,
        "trainable_bytes": nbytes,
        "bits_per_param": 8 * nbytes / params if params > 0 else None,
        "accuracy": accuracy,
        "accuracy_strict": _num(metrics.accuracy_strict),
        "accuracy_flexible": _num(metrics.accuracy_flexible),
        "base_accuracy": _num(metrics.base_accuracy),
        "n_eval": metrics.n_eval,
        "train_steps": metrics.train_steps,
        "gpu_hours": _num(gpu_hours) or 0.0,
        "wall_s": _num(wall_s) or 0.0,
        "lr": algo.learning_rate,
        "quantization": model.quantization or (config.get("model") or {}).get("quantization") or "none",
        "base_bytes": model.base_bytes,  # the frozen base as stored (schema 2)
        # the step a collapse that lasted to the end of training began (None: none, or it recovered)
        "collapse_step": metrics.collapse.step if result.collapsed else None,
        "collapse": metrics.collapse.to_dict() if result.collapsed else None,  # not a CSV column
        # per evaluation task, as plain dicts (analysis/transfer.py); not a CSV column
        "tasks": {name: m.to_dict() for name, m in result.task_metrics().items()},
    }
    row["config_key"] = config_key(config, row)
    return row


def config_key(config: dict, row: dict) -> str:
    """What defines a cell's result except its seed: cells with one key are seeds of one setting.

    The identity is tinyablate.config.identity_dict (the one behind cell_id), minus the seed, so the
    report groups exactly the cells the launcher would call seeds of one setting.
    """
    ident = None
    if config:
        try:
            ident = identity_dict(spec_from_dict(config))
            ident.pop("seed", None)
        except (TypeError, ValueError, ConfigError):  # a config from another version: fall back to the row's axes
            ident = None
    if ident is None:
        ident = {
            k: row[k]
            for k in (
                "task",
                "scorer",
                "model",
                "algo",
                "kind",
                "r",
                "u",
                "tie",
                "sharing",
                "precision",
                "trainable_params",
                "trainable_bytes",
            )
        }
        # e.g. the randomized SVD retired on 2026-12-02: another basis, never a seed of the current one
        ident["svd"] = ((config or {}).get("adapter") or {}).get("svd")
    return json.dumps(ident, sort_keys=True, default=str)


def _num(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _short(text: Any, n: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


# -- statistics ----------------------------------------------------------------------------------
def mean_ci(values: list, level: float = 0.95) -> tuple:
    """(mean, low, high) with a t-interval over `values`; low/high are None for a single value."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci of no values")
    mean = sum(values) / n
    if n == 1:
        return mean, None, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(student_t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


# Fields a setting (seeds aggregated) keeps from its cells.
GROUP_FIELDS = [
    "task",
    "scorer",
    "model",
    "family",
    "size",
    "algo",
    "kind",
    "r",
    "u",
    "tie",
    "sharing",
    "precision",
    "quantization",
    "lr",
    "trainable_params",
    "trainable_bytes",
    "bits_per_param",
]


def aggregate(rows: list) -> list:
    """One dict per setting (cells with the same config_key): mean accuracy and its 95% interval over the cells that
    did not collapse (`n_collapsed` counts the others; a setting whose every cell collapsed has no mean: left out)."""
    groups = defaultdict(list)
    for row in rows:
        groups[row["config_key"]].append(row)
    out = []
    for key, every in groups.items():
        cells = sorted(measured(every), key=lambda r: str(r["seed"]))
        if not cells:
            continue
        mean, lo, hi = mean_ci([c["accuracy"] for c in cells])
        g = {f: cells[0].get(f) for f in GROUP_FIELDS}
        g.update(
            config_key=key,
            n_seeds=len(cells),
            n_collapsed=len(every) - len(cells),
            seeds=[c["seed"] for c in cells],
            accuracies=[c["accuracy"] for c in cells],
            accuracy_mean=mean,
            ci_low=lo,
            ci_high=hi,
            base_accuracy=_mean([c["base_accuracy"] for c in cells if c["base_accuracy"] is not None]),
            gpu_hours=sum(c["gpu_hours"] for c in every),  # what the setting cost, collapsed seeds included
            wall_s=sum(c["wall_s"] for c in every),
            sweeps=sorted({c["sweep"] for c in every}),
        )
        out.append(g)
    out.sort(
        key=lambda g: (
            g["task"],
            g["scorer"],
            g["family"],
            g["model"],
            g["algo"],
            g["trainable_params"],
            g["kind"],
            str(g["r"]),
            str(g["u"]),
            str(g["tie"]),
            str(g["sharing"]),
            str(g["precision"]),
            str(g["lr"]),
        )
    )
    return out


def _mean(values: list) -> Optional[float]:
    return sum(values) / len(values) if values else None


def task_groups(rows: list) -> dict:
    """(task, scorer) -> rows: accuracies under different tasks or scorers never share a curve."""
    out = defaultdict(list)
    for row in rows:
        out[(row["task"], row["scorer"])].append(row)
    return dict(sorted(out.items()))


def frontier(settings: list, x: str = "trainable_params") -> tuple:
    """Split settings of one curve into (best, others): best = highest mean at each x value (> 0)."""
    by_x = defaultdict(list)
    for s in settings:
        if s[x] and s[x] > 0:
            by_x[s[x]].append(s)
    best, others = [], []
    for value in sorted(by_x):
        ranked = sorted(by_x[value], key=lambda s: -s["accuracy_mean"])
        best.append(ranked[0])
        others += ranked[1:]
    return best, others


def base_point(settings: list, rows: list) -> Optional[dict]:
    """The 0-parameter point of a model: its kind=none cells, else the base accuracy its cells report."""
    none = [s for s in settings if s["trainable_params"] == 0]
    if none:
        accs = [a for s in none for a in s["accuracies"]]
        mean, lo, hi = mean_ci(accs)
        return {"accuracy_mean": mean, "ci_low": lo, "ci_high": hi, "n": len(accs), "source": "kind=none cells"}
    base = [r["base_accuracy"] for r in rows if r["base_accuracy"] is not None]
    if not base:
        return None
    return {
        "accuracy_mean": sum(base) / len(base),
        "ci_low": None,
        "ci_high": None,
        "n": len(base),
        "source": "base_accuracy of the trained cells",
    }


# -- RL vs SFT -----------------------------------------------------------------------------------
def params_to_reach(curve: list, level: float) -> tuple:
    """Smallest parameter count at which a curve [(params > 0, accuracy)] reaches `level`.

    Linear interpolation of accuracy on the log-parameter axis between measured points.
    Returns (params, how): how is "interpolated", "at or below the smallest count run" (reached at
    the first point already) or "not reached" (params None).
    """
    pts = sorted((float(p), float(a)) for p, a in curve if p > 0)
    if not pts:
        return None, "not reached"
    if pts[0][1] >= level:
        return pts[0][0], "at or below the smallest count run"
    for (p0, a0), (p1, a1) in zip(pts, pts[1:]):
        if a0 < level <= a1:
            frac = (level - a0) / (a1 - a0)
            return math.exp(math.log(p0) + frac * (math.log(p1) - math.log(p0))), "interpolated"
    return None, "not reached"


def rl_sft_gap(settings: list, rl: str = "grpo", sft: str = "sft") -> list:
    """For each accuracy level GRPO reaches, the parameters SFT needs for it (same task, scorer, model).

    Both curves are the best setting at each parameter count (seeds averaged); 0-parameter cells
    are left out. One dict per GRPO point: params_rl, accuracy, params_sft (None: not reached),
    ratio = params_sft / params_rl, how.
    """
    curves = defaultdict(dict)
    for s in settings:
        if s["algo"] in (rl, sft):
            curves[(s["task"], s["scorer"], s["family"], s["model"])].setdefault(s["algo"], []).append(s)
    out = []
    for (task, scorer, family, model), by_algo in sorted(curves.items()):
        if rl not in by_algo or sft not in by_algo:
            continue
        rl_best, _ = frontier(by_algo[rl])
        sft_best, _ = frontier(by_algo[sft])
        sft_curve = [(s["trainable_params"], s["accuracy_mean"]) for s in sft_best]
        for s in rl_best:
            need, how = params_to_reach(sft_curve, s["accuracy_mean"])
            out.append(
                {
                    "task": task,
                    "scorer": scorer,
                    "family": family,
                    "model": model,
                    "params_rl": s["trainable_params"],
                    "accuracy": s["accuracy_mean"],
                    "params_sft": need,
                    "ratio": None if need is None else need / s["trainable_params"],
                    "how": how,
                    "sft_max_accuracy": max((a for _, a in sft_curve), default=None),
                }
            )
    return out


def matched_families(settings: list) -> list:
    """Parameter counts run on at least two families (same task, scorer, algo): best setting of each.

    One dict per (task, scorer, algo, params): {"points": {model: setting}}.
    """
    table = defaultdict(dict)
    for s in settings:
        if s["trainable_params"] > 0:
            key = (s["task"], s["scorer"], s["algo"], s["trainable_params"])
            cur = table[key].get(s["model"])
            if cur is None or s["accuracy_mean"] > cur["accuracy_mean"]:
                table[key][s["model"]] = s
    out = []
    for (task, scorer, algo, params), points in sorted(table.items()):
        if len({p["family"] for p in points.values()}) >= 2:
            out.append(
                {
                    "task": task,
                    "scorer": scorer,
                    "algo": algo,
                    "params": params,
                    "points": dict(sorted(points.items(), key=lambda kv: (kv[1]["family"], kv[0]))),
                }
            )
    return out
