"""python -m analysis runs/embedded [runs/other ...] --out reports/embedded [--no-reference] [--wandb offline]

Analyse sweep folders into summary tables, plots and one HTML page.

    from analysis.report import analyze
    page = analyze([Path("runs/embedded")], Path("reports/embedded"))   # -> reports/embedded/index.html

Reads only `<sweep>/<cell>/result.json`. Writes into the output folder:
  summary.csv          one row per completed cell (data.CSV_COLUMNS; collapse_step: the cell's training ended collapsed)
  summary_groups.csv   one row per setting, seeds aggregated: mean accuracy and 95% t-interval over the cells that did
                       not collapse (n_collapsed: the others; data.COLLAPSE_NOTE)
  summary.md           readable tables, GPU-hours per sweep and per axis value, skipped cells and why
  <panel>__<task>-<scorer>.png   the plots (one set per task and scorer; see plots.py)
  family.csv           the family study, when some task has LoRA and TinyLoRA cells: per model, algorithm and
                       TinyLoRA budget, the normalized gain against LoRA r=1 and the half-LoRA budget (family.py)
  transfer.csv, transfer__<model>-<algo>-<adapter>.png, task_curves__<model>.png   when cells were evaluated on
                       other tasks (eval.tasks): the transfer matrix and per-task curves (transfer.py)
  index.html           the page to open: plots, tables, notes (PNGs referenced relatively)
With `wandb_mode`, each sweep also gets a W&B summary run (wandb_summary.log_wandb_summary).
"""

from __future__ import annotations

import csv
import html
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

from tinyablate.cell_folder import COLLAPSE_REASONS

from .compare import comparisons
from .data import (
    AXES,
    COLLAPSE_NOTE,
    CSV_COLUMNS,
    GROUP_FIELDS,
    Sweeps,
    aggregate,
    collapsed,
    load_sweeps,
    matched_families,
    measured,
    rl_sft_gap,
    task_groups,
)
from .family import FAMILY_COLUMNS, family_gains, half_lora_label
from .plots import PAPER_TASK, make_plots
from .transfer import (
    TRANSFER_COLUMNS,
    has_cross_task,
    matrix_table,
    plot_task_curves,
    plot_transfer,
    transfer_matrix,
    transfer_rows,
)
from .wandb_source import results_from_wandb
from .wandb_summary import log_wandb_summary

# summary_groups.csv: what a setting keeps from its cells (data.GROUP_FIELDS), then its aggregate over seeds.
GROUP_COLUMNS = GROUP_FIELDS + [
    "n_seeds",
    "n_collapsed",
    "seeds",
    "accuracy_mean",
    "ci_low",
    "ci_high",
    "base_accuracy",
    "gpu_hours",
    "wall_s",
    "sweeps",
]


def analyze(
    sweep_dirs: list,
    out_dir: Path,
    *,
    reference: bool = True,
    wandb_mode: Optional[str] = None,
    wandb_groups: tuple = (),
) -> Path:
    """Read `sweep_dirs`, write the report into `out_dir`, return the path of index.html.

    Raises ValueError with a message naming the folder when a folder is missing or holds no
    results. Unreadable, failed and running cells are counted and listed, never fatal.
    """
    from_wandb = []
    for spec in wandb_groups:  # "entity/project:group", read through W&B's public API (online)
        path, _, group = spec.rpartition(":")
        if not path or not group:
            raise ValueError(f"--from-wandb {spec!r}: expected ENTITY/PROJECT:GROUP")
        from_wandb += results_from_wandb(path, group)
    sweeps = load_sweeps([Path(d) for d in sweep_dirs], from_wandb)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = aggregate(sweeps.rows)
    write_csv(out_dir / "summary.csv", sweeps.rows, CSV_COLUMNS)
    write_csv(out_dir / "summary_groups.csv", settings, GROUP_COLUMNS)
    plots = []
    for (task, scorer), rows in task_groups(sweeps.rows).items():
        mine = [s for s in settings if (s["task"], s["scorer"]) == (task, scorer)]
        if mine:  # (none: every cell of this task collapsed; the collapsed cells' table lists them)
            plots += make_plots(rows, mine, out_dir, task, scorer, reference)
    gap = rl_sft_gap(settings)
    matched = matched_families(settings)
    gains = family_gains(measured(sweeps.rows), settings)  # means: collapsed cells left out (data.COLLAPSE_NOTE)
    if gains:
        write_csv(out_dir / "family.csv", gains, FAMILY_COLUMNS)
    transfer = transfer_report(measured(sweeps.rows), out_dir)
    compared = comparisons(measured(sweeps.rows))
    if compared:
        write_csv(out_dir / "comparisons.csv", compared, COMPARISON_COLUMNS)
    wandb_notes = []
    if wandb_mode:
        for sweep in sorted({r["sweep"] for r in sweeps.rows}):
            path = log_wandb_summary([r for r in sweeps.rows if r["sweep"] == sweep], sweep, wandb_mode, out_dir)
            wandb_notes.append(
                f"W&B summary run for sweep {sweep!r} ({wandb_mode}): {path.parent if path else 'disabled'}"
            )
    (out_dir / "summary.md").write_text(
        summary_markdown(sweeps, settings, plots, gap, matched, reference, wandb_notes)
        + family_markdown(gains)
        + comparison_markdown(compared)
        + transfer_markdown(transfer)
    )
    page = out_dir / "index.html"
    page.write_text(
        render_html(sweeps, settings, plots, gap, matched, gains, reference, wandb_notes).replace(
            "</body></html>", comparison_html(compared) + transfer_html(transfer) + "</body></html>"
        )
    )
    return page


COMPARISON_COLUMNS = [
    "task",
    "scorer",
    "model",
    "params",
    "axis",
    "a",
    "b",
    "n_a",
    "n_b",
    "diff",
    "low",
    "high",
    "resolved",
]
COMPARISON_NOTE = (
    "A − B in accuracy points with a 95% interval from a bootstrap over seeds and problems (paired: "
    "the same held-out problems); settings at one parameter count that differ in one axis "
    "(analysis/compare.py). Unresolved: the interval holds 0. Cells whose training collapsed are left out."
)


def comparison_table(compared: list) -> tuple:
    header = ["task", "model", "params", "axis", "A − B", "difference (points)", "95% interval", "seeds", "resolved"]
    body = [
        [
            c["task"],
            c["model"],
            f"{c['params']:,}",
            c["axis"],
            f"{c['a']} − {c['b']}",
            f"{c['diff']:+.1f}",
            f"[{c['low']:+.1f}, {c['high']:+.1f}]",
            f"{c['n_a']} / {c['n_b']}",
            "yes" if c["resolved"] else "unresolved",
        ]
        for c in compared
    ]
    return header, body


def comparison_markdown(compared: list) -> str:
    if not compared:
        return ""
    return "\n".join(["## Comparisons", "", COMPARISON_NOTE, "", _md_table(*comparison_table(compared)), "", ""])


def comparison_html(compared: list) -> str:
    if not compared:
        return ""
    return f"<h2>Comparisons</h2><p class='small'>{html.escape(COMPARISON_NOTE)}</p>" + _html_table(
        *comparison_table(compared)
    )


FAMILY_NOTE = (
    "Normalized gain = (accuracy − base) / (LoRA − base): the share of a model's LoRA gain over its base (same "
    "algorithm; LoRA at the smallest rank run, r=1 in the family study) that TinyLoRA gets at each budget (the best "
    "TinyLoRA setting at that trainable-parameter count, seeds averaged); 1 = LoRA's gain, 0 = the base. 95% "
    "interval: percentile bootstrap over seeds and problems (the held-out problems resampled together for the "
    "budget, LoRA and the base; analysis/compare.py). Half-LoRA budget: the smallest budget whose mean normalized "
    "gain is at least ½. Undefined where LoRA does not beat the base (no gain to take a share of) or a model has "
    "no LoRA cell. Per row: family.csv."
)


def family_table(gains: list) -> tuple:
    header = [
        "task",
        "scorer",
        "model",
        "algo",
        "params",
        "accuracy %",
        "seeds",
        "base %",
        "LoRA r (params)",
        "LoRA %",
        "normalized gain",
        "95% interval (bootstrap: seeds, problems)",
        "half-LoRA budget",
        "note",
    ]
    body = []
    for g in gains:
        body.append(
            [
                g["task"],
                g["scorer"],
                g["model"],
                g["algo"],
                f"{g['params']:,}",
                _pct(g["accuracy"]),
                str(g["n_seeds"]),
                _pct(g["base_accuracy"]),
                "" if g["lora_r"] is None else f"{g['lora_r']} ({g['lora_params']:,})",
                _pct(g["lora_accuracy"]),
                "undefined" if g["gain"] is None else f"{g['gain']:.2f}",
                _gain_interval(g),
                _half_budget(g),
                g["note"],
            ]
        )
    return header, body


def _gain_interval(g: dict) -> str:
    if g["gain"] is None:
        return ""
    return "unbounded" if g["gain_low"] is None else f"[{g['gain_low']:.2f}, {g['gain_high']:.2f}]"


def _half_budget(g: dict) -> str:
    half = half_lora_label(g)
    return half if isinstance(half, str) else f"{half:,}"


def family_markdown(gains: list) -> str:
    if not gains:
        return ""
    return "\n".join(
        ["## Family study: share of LoRA's gain", "", FAMILY_NOTE, "", _md_table(*family_table(gains)), "", ""]
    )


def family_html(gains: list) -> str:
    if not gains:
        return ""
    return f"<h3>Share of LoRA's gain per budget</h3><p class='small'>{html.escape(FAMILY_NOTE)}</p>" + _html_table(
        *family_table(gains)
    )


def transfer_report(rows: list, out_dir: Path) -> Optional[dict]:
    """transfer.csv, the matrices and per-task curves, when some cell was evaluated on another task."""
    if not has_cross_task(rows):
        return None
    write_csv(out_dir / "transfer.csv", transfer_rows(rows), TRANSFER_COLUMNS)
    matrices = transfer_matrix(rows)
    for m in matrices:
        m["file"] = plot_transfer(m, out_dir)
    curves = {model: plot_task_curves(rows, model, out_dir) for model in sorted({r["model"] for r in rows})}
    return {"matrices": matrices, "curves": curves}


TRANSFER_NOTE = (
    "Change of accuracy against the base model, in points, on each evaluation task (columns) for the "
    "cells trained on each task (rows), one matrix per model, algorithm and adapter (lora+nf4 is QLoRA), "
    "all budgets and seeds together; [95% interval] is a "
    "t-interval over the cells, or for a single cell the binomial interval of its change; n = cells. "
    "Per cell: transfer.csv. Cells whose training collapsed are left out."
)


def transfer_markdown(transfer: Optional[dict]) -> str:
    if transfer is None:
        return ""
    out = ["## Transfer: training task x evaluation task", "", TRANSFER_NOTE, ""]
    for m in transfer["matrices"]:
        out += [f"### {m['model']}, {m['algo']}, {m['adapter']}", "", _md_table(*matrix_table(m)), ""]
        if m["file"]:
            out += [f"`{m['file']}`", ""]
    out += [
        f"- Accuracy on each evaluation task vs trainable parameters, {model}: `{f}`"
        for model, f in transfer["curves"].items()
        if f
    ] + [""]
    return "\n".join(out)


def transfer_html(transfer: Optional[dict]) -> str:
    if transfer is None:
        return ""
    e = html.escape
    parts = ["<h2>Transfer: training task × evaluation task</h2>", f"<p class='small'>{e(TRANSFER_NOTE)}</p>"]
    for m in transfer["matrices"]:
        parts.append(f"<h3>{e(m['model'])}, {e(m['algo'])}, {e(m['adapter'])}</h3>" + _html_table(*matrix_table(m)))
        if m["file"]:
            parts.append(f"<figure><img src='{e(m['file'])}' alt='transfer matrix'></figure>")
    for model, f in transfer["curves"].items():
        if f:
            parts.append(
                f"<figure><h3>Accuracy on each evaluation task vs trainable parameters, {e(model)}</h3>"
                f"<img src='{e(f)}' alt='per-task curves'></figure>"
            )
    return "\n".join(parts)


# -- CSV -----------------------------------------------------------------------------------------
def write_csv(path: Path, rows: list, columns: list) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_value(row.get(c)) for c in columns])


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, list):
        return ";".join(map(str, v))
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


# -- numbers -------------------------------------------------------------------------------------
def _pct(v: Optional[float]) -> str:
    return "" if v is None else f"{100 * v:.1f}"


def _acc_ci(s: dict) -> str:
    if s["ci_low"] is None:
        return f"{100 * s['accuracy_mean']:.1f}"
    return f"{100 * s['accuracy_mean']:.1f} ± {100 * (s['ci_high'] - s['accuracy_mean']):.1f}"


def _count(v: Optional[float]) -> str:
    if v is None:
        return ""
    return f"{v:,.0f}" if v >= 10 or float(v).is_integer() else f"{v:.3g}"


def _opt(v) -> str:
    return "" if v is None else str(v)


def gpu_hours_tables(sweeps: Sweeps) -> dict:
    """{"sweep": [(value, n_cells, gpu_hours, wall_hours)], axis: [...] for each axis of data.AXES}."""
    out = {}
    for axis in ["sweep"] + AXES:
        acc = defaultdict(lambda: [0, 0.0, 0.0])
        for r in sweeps.rows:
            a = acc[_opt(r[axis]) or "—"]
            a[0] += 1
            a[1] += r["gpu_hours"]
            a[2] += r["wall_s"] / 3600
        out[axis] = sorted(((k, *v) for k, v in acc.items()), key=lambda t: _natural(t[0]))
    return out


def _natural(value: str) -> tuple:
    """Numbers first in numeric order, then text ("—", "all") alphabetically."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def setting_table(settings: list) -> tuple:
    """(header, rows) of the per-setting table, accuracies in %."""
    header = [
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
        "params",
        "bytes",
        "bits/param",
        "accuracy % (±95% CI)",
        "seeds",
        "collapsed",
        "base %",
        "GPU-h",
    ]
    body = []
    for s in settings:
        body.append(
            [
                s["task"],
                s["scorer"],
                s["model"],
                s["algo"],
                s["kind"],
                _opt(s["r"]),
                _opt(s["u"]),
                _opt(s["tie"]),
                _opt(s["sharing"]),
                _opt(s["precision"]),
                f"{s['trainable_params']:,}",
                f"{s['trainable_bytes']:,}",
                "" if s["bits_per_param"] is None else f"{s['bits_per_param']:g}",
                _acc_ci(s),
                str(s["n_seeds"]),
                str(s["n_collapsed"] or ""),
                _pct(s["base_accuracy"]),
                f"{s['gpu_hours']:.3g}",
            ]
        )
    return header, body


def collapsed_table(rows: list) -> tuple:
    """(header, rows) of the completed cells whose training ended collapsed (data.COLLAPSE_NOTE)."""
    header = ["sweep", "cell", "accuracy %", "collapsed since step", "named at step", "why", "training"]
    body = [
        [
            r["sweep"],
            r["cell_id"],
            _pct(r["accuracy"]),
            str(r["collapse"]["step"]),
            str(r["collapse"]["detected_step"]),
            COLLAPSE_REASONS.get(r["collapse"]["reason"], r["collapse"]["reason"]),
            "stopped there" if r["collapse"].get("stopped") else "ran on",
        ]
        for r in collapsed(rows)
    ]
    return header, body


def _counts(counts: dict) -> list:
    """(number, words) per state for the page's head: the completed cells first, with how many of them collapsed."""
    done = " completed"
    if counts.get("collapsed"):
        done += f" ({counts['collapsed']} of them collapsed, left out of the means)"
    others = ("failed", "running", "interrupted", "pending", "unreadable")
    return [(counts.get("completed", 0), done)] + [(counts.get(k, 0), f" {k}") for k in others]


def gap_table(gap: list) -> tuple:
    header = ["task", "scorer", "model", "GRPO params", "GRPO accuracy %", "SFT params needed", "SFT / GRPO", "how"]
    body = []
    for g in gap:
        need = "not reached" if g["params_sft"] is None else _count(g["params_sft"])
        if g["how"].startswith("at or below"):
            need = "≤ " + need
        ratio = "not reached" if g["ratio"] is None else f"{g['ratio']:.3g}×"
        how = g["how"] if g["params_sft"] is not None else f"SFT's best is {_pct(g['sft_max_accuracy'])}%"
        body.append([g["task"], g["scorer"], g["model"], f"{g['params_rl']:,}", _pct(g["accuracy"]), need, ratio, how])
    return header, body


def matched_table(matched: list) -> tuple:
    header = ["task", "scorer", "algo", "params", "accuracy % (±95% CI) per model", "difference (pp)"]
    body = []
    for m in matched:
        pts = list(m["points"].values())
        per = "; ".join(f"{s['family']} {s['model']}: {_acc_ci(s)}" for s in pts)
        by_family = defaultdict(list)
        for s in pts:
            by_family[s["family"]].append(s["accuracy_mean"])
        fams = sorted(by_family)
        diff = ""
        if len(fams) == 2:
            a, b = (max(by_family[f]) for f in fams)
            diff = f"{fams[0]} − {fams[1]}: {100 * (a - b):+.1f}"
        body.append([m["task"], m["scorer"], m["algo"], f"{m['params']:,}", per, diff])
    return header, body


# -- markdown ------------------------------------------------------------------------------------
def _md_table(header: list, body: list) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in body]
    return "\n".join(lines)


def summary_markdown(
    sweeps: Sweeps, settings: list, plots: list, gap: list, matched: list, reference: bool, wandb_notes: list
) -> str:
    counts = sweeps.counts()
    out = [
        "# tinyablate analysis",
        "",
        f"Sources: {', '.join(f'`{d}`' for d in sweeps.dirs)} — generated {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        "Cells: " + ", ".join(f"{n}{words}" for n, words in _counts(counts)),
        "",
        "## Accuracy per setting (seeds aggregated: mean ± half-width of the 95% t-interval)",
        "",
        _md_table(*setting_table(settings)),
        "",
        "Per-cell numbers: `summary.csv`; per-setting numbers with interval bounds: `summary_groups.csv`.",
        "",
    ]
    tables = gpu_hours_tables(sweeps)
    out += [
        "## GPU-hours",
        "",
        "Per sweep:",
        "",
        _md_table(
            ["sweep", "cells", "GPU-hours", "wall-hours"],
            [[v, n, f"{g:.3g}", f"{w:.3g}"] for v, n, g, w in tables["sweep"]],
        ),
        "",
        "Per axis value (completed cells):",
        "",
        _md_table(
            ["axis", "value", "cells", "GPU-hours", "wall-hours"],
            [[axis, v, n, f"{g:.3g}", f"{w:.3g}"] for axis in AXES for v, n, g, w in tables[axis]],
        ),
        "",
    ]
    failed_wall = sum(s.wall_s or 0 for s in sweeps.skipped if s.state == "failed")
    if failed_wall:
        out += [f"Failed cells ran {failed_wall / 3600:.3g} wall-hours in addition.", ""]
    if gap:
        out += [
            "## RL vs SFT: parameters SFT needs to reach each GRPO accuracy",
            "",
            "SFT's curve (best setting per parameter count, seeds averaged) is interpolated linearly in accuracy "
            "on the log-parameter axis; 'not reached' means no SFT cell gets there.",
            "",
            _md_table(*gap_table(gap)),
            "",
        ]
    if matched:
        out += ["## Qwen vs Llama at matched parameter counts", "", _md_table(*matched_table(matched)), ""]
    out += ["## Plots", ""]
    for p in plots:
        where = f"`{p.file}`" if p.file else f"skipped: {p.skipped}"
        out.append(f"- {p.title} — {p.task}/{p.scorer}: {where}")
    if reference and not any(t == PAPER_TASK for t, _ in task_groups(sweeps.rows)):
        out.append(
            f"- The TinyLoRA paper's reference points are for {PAPER_TASK} only: not drawn (no {PAPER_TASK} cells)."
        )
    out.append("")
    if counts["collapsed"]:
        out += ["## Collapsed cells (left out of the means)", "", COLLAPSE_NOTE, ""]
        out += [_md_table(*collapsed_table(sweeps.rows)), ""]
    if sweeps.skipped:
        out += [
            "## Cells without a result",
            "",
            _md_table(
                ["state", "sweep", "cell", "reason"], [[s.state, s.sweep, s.cell_id, s.reason] for s in sweeps.skipped]
            ),
            "",
        ]
    out += [n for n in wandb_notes] + ([""] if wandb_notes else [])
    return "\n".join(out)


# -- HTML ----------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:24px auto;padding:0 16px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}h3{font-size:1.05em}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
figure{margin:12px 0 28px}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#444;max-width:900px}
.note{color:#8a5a00;background:#fff8e6;border-left:3px solid #e0a800;padding:4px 10px;margin:6px 0;font-size:14px}
.counts span{margin-right:14px}.small{font-size:12px;color:#666}
"""


def _html_table(header: list, body: list) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def render_html(
    sweeps: Sweeps,
    settings: list,
    plots: list,
    gap: list,
    matched: list,
    gains: list,
    reference: bool,
    wandb_notes: list,
) -> str:
    e = html.escape
    counts = sweeps.counts()
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>tinyablate analysis</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>tinyablate analysis</h1>",
        f"<p class='small'>Sources: {e(', '.join(map(str, sweeps.dirs)))} — generated "
        f"{e(time.strftime('%Y-%m-%d %H:%M'))}. Files: <a href='summary.csv'>summary.csv</a> (per cell), "
        "<a href='summary_groups.csv'>summary_groups.csv</a> (per setting), <a href='summary.md'>summary.md</a>.</p>",
        "<p class='counts'>" + "".join(f"<span><b>{n}</b>{e(words)}</span>" for n, words in _counts(counts)) + "</p>",
    ]
    if counts["collapsed"]:
        parts.append(
            f"<p class='note'>{counts['collapsed']} completed cell(s) collapsed in training: {e(COLLAPSE_NOTE)} See "
            "<a href='#collapsed'>collapsed cells</a>.</p>"
        )
    n_skipped = len(sweeps.skipped)
    if n_skipped:
        parts.append(
            f"<p class='note'>{n_skipped} cell folder(s) have no usable result and are left out of every "
            "plot and table: see <a href='#skipped'>cells without a result</a>.</p>"
        )
    if reference and not any(t == PAPER_TASK for t, _ in task_groups(sweeps.rows)):
        parts.append(
            f"<p class='note'>The TinyLoRA paper's Qwen2.5-7B-Instruct points are GSM8K results and are "
            f"drawn only on {PAPER_TASK} panels; these sweeps have no {PAPER_TASK} cells.</p>"
        )
    groups = defaultdict(list)
    for p in plots:
        groups[(p.task, p.scorer)].append(p)
    for (task, scorer), mine in groups.items():
        parts.append(f"<h2>Task {e(task)} — scorer {e(scorer)}</h2>")
        for p in mine:
            if p.file:
                parts.append(
                    f"<figure><h3>{e(p.title)}</h3><img src='{e(p.file)}' alt='{e(p.title)}'>"
                    f"<figcaption>{e(p.caption)}</figcaption></figure>"
                )
            else:
                parts.append(f"<p class='note'><b>{e(p.title)}</b>: not drawn — {e(p.skipped)}.</p>")
            if p.key == "rl_sft" and p.file:
                rows = [g for g in gap if (g["task"], g["scorer"]) == (task, scorer)]
                parts.append(_html_table(*gap_table(rows)))
            if p.key == "family" and p.file:
                rows = [m for m in matched if (m["task"], m["scorer"]) == (task, scorer)]
                if rows:
                    parts.append(_html_table(*matched_table(rows)))
            if p.key == "family":  # the gains stand without the figure (one family): a model against its LoRA
                parts.append(family_html([g for g in gains if (g["task"], g["scorer"]) == (task, scorer)]))
    parts += [
        "<h2>Accuracy per setting</h2>",
        "<p class='small'>Seeds aggregated: mean ± half-width of the 95% t-interval (a single seed has no "
        "interval). Accuracies in %.</p>",
        _html_table(*setting_table(settings)),
    ]
    tables = gpu_hours_tables(sweeps)
    parts += [
        "<h2>GPU-hours</h2>",
        _html_table(
            ["sweep", "cells", "GPU-hours", "wall-hours"],
            [[v, n, f"{g:.3g}", f"{w:.3g}"] for v, n, g, w in tables["sweep"]],
        ),
        _html_table(
            ["axis", "value", "cells", "GPU-hours", "wall-hours"],
            [[a, v, n, f"{g:.3g}", f"{w:.3g}"] for a in AXES for v, n, g, w in tables[a]],
        ),
    ]
    if counts["collapsed"]:
        parts += [
            "<h2 id='collapsed'>Collapsed cells (left out of the means)</h2>",
            _html_table(*collapsed_table(sweeps.rows)),
        ]
    if sweeps.skipped:
        parts += [
            "<h2 id='skipped'>Cells without a result</h2>",
            _html_table(
                ["state", "sweep", "cell", "reason", "folder"],
                [[s.state, s.sweep, s.cell_id, s.reason, str(s.path)] for s in sweeps.skipped],
            ),
        ]
    for n in wandb_notes:
        parts.append(f"<p class='small'>{e(n)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
