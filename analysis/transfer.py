"""What a tiny update costs on other tasks: the transfer matrix and per-task curves (eval.tasks).

Each completed cell carries `metrics.tasks` (result schema 2): per evaluation task its accuracy, the
base model's and the change. From those rows:

- `transfer_rows`: one row per (cell, evaluation task), written to transfer.csv;
- `transfer_matrix`: per (model, algo, adapter), training task x evaluation task: the mean change
  against the base over the cells trained on that task (every budget and seed), with a 95% interval: a
  t-interval over the cells when there are several, else the normal interval of one cell's change
  with base and trained accuracies taken as independent binomials (wider than the paired one);
- `plot_transfer` / `plot_task_curves`: the matrix as a heat map, and accuracy on each evaluation
  task against trainable parameters, one line per (training task, algo, adapter kind).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Optional

from .data import mean_ci
from .plots import _fmt_count, _new_figure, _save, slug

KIND_MARKERS = {"tinylora": "o", "lora_xs": "^", "lora": "s"}  # hollow markers: a quantized base
TRANSFER_COLUMNS = [
    "cell_id",
    "sweep",
    "model",
    "algo",
    "kind",
    "quantization",
    "trainable_params",
    "seed",
    "train_task",
    "eval_task",
    "scorer",
    "accuracy",
    "base_accuracy",
    "delta",
    "n_eval",
]


def transfer_rows(rows: list) -> list:
    """One dict per (completed cell, evaluation task) with TRANSFER_COLUMNS."""
    out = []
    for row in rows:
        for eval_task, m in (row.get("tasks") or {}).items():
            out.append(
                {
                    "cell_id": row["cell_id"],
                    "sweep": row["sweep"],
                    "model": row["model"],
                    "algo": row["algo"],
                    "kind": row["kind"],
                    "quantization": row.get("quantization") or "none",
                    "trainable_params": row["trainable_params"],
                    "seed": row["seed"],
                    "train_task": row["task"],
                    "eval_task": eval_task,
                    "scorer": m.get("scorer"),
                    "accuracy": m.get("accuracy"),
                    "base_accuracy": m.get("base_accuracy"),
                    "delta": m.get("delta"),
                    "n_eval": m.get("n_eval"),
                }
            )
    return out


def has_cross_task(rows: list) -> bool:
    """Whether any cell was evaluated on a task other than the one it trained on."""
    return any(r["eval_task"] != r["train_task"] for r in transfer_rows(rows))


def delta_interval(cells: list) -> tuple:
    """(mean change, low, high, how) over transfer rows of one matrix entry (see the module docstring)."""
    deltas = [c["delta"] for c in cells if c["delta"] is not None]
    if not deltas:
        return None, None, None, "no base accuracy"
    if len(deltas) > 1:
        mean, lo, hi = mean_ci(deltas)
        return mean, lo, hi, f"t-interval over {len(deltas)} cells"
    c = next(c for c in cells if c["delta"] is not None)
    p1, p0, n = c["accuracy"], c["base_accuracy"], max(int(c["n_eval"] or 1), 1)
    half = 1.96 * math.sqrt(p1 * (1 - p1) / n + p0 * (1 - p0) / n)
    return c["delta"], c["delta"] - half, c["delta"] + half, f"one cell, binomial (n={n})"


def adapter_label(kind: str, quantization: str) -> str:
    """An adapter as the transfer matrices name it: its kind, and the quantized base if any (lora+nf4 = QLoRA)."""
    return kind if quantization in (None, "none") else f"{kind}+{quantization}"


def transfer_matrix(rows: list) -> list:
    """One dict per (model, algo, adapter): {"model", "algo", "adapter", "train_tasks", "eval_tasks",
    "entries": {(train, eval): {"mean", "low", "high", "how", "n_cells", "base"}}}."""
    groups = defaultdict(lambda: defaultdict(list))
    for t in transfer_rows(rows):
        key = (t["model"], t["algo"], adapter_label(t["kind"], t["quantization"]))
        groups[key][(t["train_task"], t["eval_task"])].append(t)
    out = []
    for (model, algo, adapter), entries in sorted(groups.items()):
        matrix = {}
        for key, cells in entries.items():
            mean, lo, hi, how = delta_interval(cells)
            bases = [c["base_accuracy"] for c in cells if c["base_accuracy"] is not None]
            matrix[key] = {
                "mean": mean,
                "low": lo,
                "high": hi,
                "how": how,
                "n_cells": len(cells),
                "base": sum(bases) / len(bases) if bases else None,
            }
        out.append(
            {
                "model": model,
                "algo": algo,
                "adapter": adapter,
                "entries": matrix,
                "train_tasks": sorted({k[0] for k in matrix}),
                "eval_tasks": sorted({k[1] for k in matrix}),
            }
        )
    return out


def matrix_table(m: dict) -> tuple:
    """(header, rows) of one matrix: change in points, with its interval and number of cells."""
    header = ["trained on \\ evaluated on"] + m["eval_tasks"]
    body = []
    for train in m["train_tasks"]:
        line = [train]
        for ev in m["eval_tasks"]:
            e = m["entries"].get((train, ev))
            line.append("" if e is None else _fmt_entry(e))
        body.append(line)
    return header, body


def _fmt_entry(e: dict) -> str:
    if e["mean"] is None:
        return "n/a"
    interval = "" if e["low"] is None else f" [{100 * e['low']:+.1f}, {100 * e['high']:+.1f}]"
    return f"{100 * e['mean']:+.1f}{interval} (n={e['n_cells']})"


def plot_transfer(m: dict, out_dir: Path) -> Optional[str]:
    """The matrix of one (model, algo, adapter) as a heat map of the change in points; the PNG's name."""
    if not m["train_tasks"] or not m["eval_tasks"]:
        return None
    fig, axes = _new_figure(1.9 * len(m["eval_tasks"]) + 3.0, 1.2 * len(m["train_tasks"]) + 1.8)
    ax = axes[0][0]
    values = [[(m["entries"].get((t, e)) or {}).get("mean") for e in m["eval_tasks"]] for t in m["train_tasks"]]
    finite = [abs(v) for line in values for v in line if v is not None]
    scale = max(finite + [1e-3]) * 100
    grid = [[float("nan") if v is None else 100 * v for v in line] for line in values]
    image = ax.imshow(grid, cmap="RdBu", vmin=-scale, vmax=scale, aspect="auto")
    for i, t in enumerate(m["train_tasks"]):
        for j, e in enumerate(m["eval_tasks"]):
            entry = m["entries"].get((t, e))
            if entry is not None:
                dark = entry["mean"] is not None and abs(100 * entry["mean"]) > 0.6 * scale
                ax.text(
                    j,
                    i,
                    _fmt_entry(entry).replace(" [", "\n["),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                )
    ax.set_xticks(range(len(m["eval_tasks"])), m["eval_tasks"])
    ax.set_yticks(range(len(m["train_tasks"])), m["train_tasks"])
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("trained on")
    ax.set_title(f"Change against the base (points), {m['model']}, {m['algo']}, {m['adapter']}")
    fig.colorbar(image, ax=ax, label="accuracy change (points)")
    return _save(fig, out_dir, f"transfer__{slug(m['model'])}-{slug(m['algo'])}-{slug(m['adapter'])}.png")


def plot_task_curves(rows: list, model: str, out_dir: Path) -> Optional[str]:
    """Accuracy on every evaluation task against trainable parameters (one panel per evaluation task),
    one line per (training task, algo, adapter kind), seeds averaged; the base as a dotted line."""
    mine = [t for t in transfer_rows(rows) if t["model"] == model and t["accuracy"] is not None]
    eval_tasks = sorted({t["eval_task"] for t in mine})
    if not eval_tasks:
        return None
    fig, axes = _new_figure(4.6 * len(eval_tasks), 4.4, ncols=len(eval_tasks))
    colors = dict(
        zip(sorted({t["train_task"] for t in mine}), ["#1f5fa8", "#d1495b", "#2e8b57", "#f08a24", "#6f42c1"] * 3)
    )
    for ax, ev in zip(axes[0], eval_tasks):
        series = defaultdict(lambda: defaultdict(list))
        for t in mine:
            if t["eval_task"] == ev and t["trainable_params"] > 0:
                label = (t["train_task"], t["algo"], t["kind"], t["quantization"])
                series[label][t["trainable_params"]].append(t["accuracy"])
        for (train, algo, kind, quant), points in sorted(series.items()):
            xs = sorted(points)
            ys = [100 * sum(points[x]) / len(points[x]) for x in xs]
            ax.plot(
                xs,
                ys,
                ls="-" if algo == "grpo" else "--",
                marker=KIND_MARKERS.get(kind, "D"),
                color=colors[train],
                markerfacecolor="white" if quant != "none" else colors[train],
                label=f"trained on {train}, {algo}, {kind}" + ("" if quant == "none" else f" ({quant} base)"),
            )
        bases = [t["base_accuracy"] for t in mine if t["eval_task"] == ev and t["base_accuracy"] is not None]
        if bases:
            ax.axhline(100 * sum(bases) / len(bases), color="0.35", ls=":", label="base")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(lambda x, _: _fmt_count(x))
        scorer = next((t["scorer"] for t in mine if t["eval_task"] == ev), "")
        ax.set_title(f"evaluated on {ev}")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(f"accuracy (%, {scorer})")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"Accuracy on each evaluation task vs trainable parameters, {model}")
    return _save(fig, out_dir, f"task_curves__{slug(model)}.png")
