"""The report's figures, one set per (task, scorer): matplotlib's Agg canvas, no pyplot state.

Every panel function returns a `Plot`: the PNG written, or the reason it was skipped (an axis
that does not vary in the data gives a note, never an empty or misleading figure).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from .data import base_point, collapsed, frontier, rl_sft_gap
from .family import HALF, lora_reference

# The TinyLoRA paper (arXiv 2602.04118): Qwen2.5-7B-Instruct on GSM8K trained with GRPO.
PAPER_TASK = "gsm8k"
PAPER_POINTS = [(1, 82.0), (13, 91.8), (196, 92.2)]
PAPER_BASE = 88.2
PAPER_FULL_FT = 91.7
PAPER_LABEL = "TinyLoRA paper: Qwen2.5-7B-Instruct, GRPO"

FAMILY_COLORS = {
    "qwen2": ["#1f5fa8", "#17a2b8", "#6f42c1", "#4c9be8"],
    "llama": ["#d1495b", "#f08a24", "#8c564b", "#e377c2"],
}
OTHER_COLORS = ["#2e8b57", "#7f7f7f", "#bcbd22", "#9edae5"]
ALGO_STYLE = {"grpo": ("-", "o"), "sft": ("--", "s")}
REF_COLOR = "0.35"
COLLAPSED_STYLE = {"marker": "X", "color": "black", "s": 42, "zorder": 5}  # cells whose training collapsed
DPI = 110


@dataclass
class Plot:
    key: str  # params | bytes | sharing | rank | family | rl_sft
    title: str
    task: str
    scorer: str
    file: Optional[str] = None  # PNG name inside out_dir
    caption: str = ""
    skipped: Optional[str] = None


TITLES = {
    "params": "Accuracy vs trainable parameters",
    "bytes": "Accuracy vs trainable bytes (precision axis)",
    "sharing": "Tiled vs structured sharing",
    "rank": "Frozen rank r",
    "family": "Model families: accuracy vs trainable parameters (TinyLoRA, LoRA reference)",
    "rl_sft": "RL vs SFT: parameters SFT needs to reach GRPO's accuracy",
}


def make_plots(rows: list, settings: list, out_dir: Path, task: str, scorer: str, reference: bool) -> list:
    """All panels for one (task, scorer): `rows`/`settings` hold only that task and scorer."""
    colors = model_colors(settings)
    ctx = dict(rows=rows, settings=settings, out_dir=Path(out_dir), task=task, scorer=scorer, colors=colors)
    return [
        plot_params(reference=reference, **ctx),
        plot_bytes(**ctx),
        plot_sharing(**ctx),
        plot_rank(**ctx),
        plot_family(**ctx),
        plot_rl_sft(**ctx),
    ]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(text)).strip("-") or "x"


def file_name(key: str, task: str, scorer: str) -> str:
    return f"{key}__{slug(task)}-{slug(scorer or 'default')}.png"


def model_colors(settings: list) -> dict:
    """A colour per model: blues for Qwen, reds for Llama, others after."""
    out, used = {}, defaultdict(int)
    for family, model in sorted({(s["family"], s["model"]) for s in settings}):
        palette = FAMILY_COLORS.get(family, OTHER_COLORS)
        out[model] = palette[used[id(palette)] % len(palette)]
        used[id(palette)] += 1
    return out


def _style(algo: str) -> tuple:
    return ALGO_STYLE.get(algo, (":", "^"))


def _fmt_count(x: float) -> str:
    if x >= 1e9:
        return f"{x / 1e9:g}G"
    if x >= 1e6:
        return f"{x / 1e6:g}M"
    if x >= 1e3:
        return f"{x / 1e3:g}k"
    return f"{x:g}"


def _ylabel(scorer: str) -> str:
    return f"accuracy (%, {scorer} scorer)" if scorer else "accuracy (%)"


def _new_figure(width: float = 9.5, height: float = 5.2, ncols: int = 1, nrows: int = 1):
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Figure, out_dir: Path, name: str) -> str:
    fig.savefig(Path(out_dir) / name, dpi=DPI, bbox_inches="tight")
    return name


def _skip(key: str, task: str, scorer: str, reason: str) -> Plot:
    return Plot(key, TITLES[key], task, scorer, skipped=reason)


# -- the log-x axis with a 0 (base) position -----------------------------------------------------
def _log_x(ax, positive: list, with_base: bool, unit: str) -> Optional[float]:
    """Log x over `positive`; with_base adds a '0 (base)' slot left of a break. Returns its x."""
    lo, hi = min(positive), max(positive)
    base_x = lo / 5 if with_base else None
    left = (base_x if with_base else lo) / 2
    right = hi * 2
    ax.set_xscale("log")
    ax.set_xlim(left, right)
    ticks = [10.0**k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
    ticks = [t for t in ticks if lo / 1.5 <= t <= right]
    labels = [_fmt_count(t) for t in ticks]
    if with_base:
        brk = math.sqrt(base_x * lo)
        ax.axvspan(left, brk, color="0.93", zorder=0, lw=0)
        ax.axvline(brk, color="0.55", lw=0.8, ls=(0, (3, 2)), zorder=1)
        ticks, labels = [base_x] + ticks, ["0\n(base)"] + labels
    ax.set_xticks(ticks, labels)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(
        f"trainable {unit} (log scale; 0 = no adapter, left of the break)"
        if with_base
        else f"trainable {unit} (log scale)"
    )
    return base_x


def _draw_curve(ax, best: list, others: list, x: str, color: str, ls: str, marker: str, label: str) -> None:
    """Mean over seeds (line), 95% t-interval (band + bars), single seeds (dots), other settings (hollow)."""
    xs = [s[x] for s in best]
    means = [100 * s["accuracy_mean"] for s in best]
    lows = [100 * (s["ci_low"] if s["ci_low"] is not None else s["accuracy_mean"]) for s in best]
    highs = [100 * (s["ci_high"] if s["ci_high"] is not None else s["accuracy_mean"]) for s in best]
    ax.plot(xs, means, ls=ls, marker=marker, color=color, label=label, lw=1.8, ms=5, zorder=3)
    if any(s["ci_low"] is not None for s in best):
        if len(best) > 1:
            ax.fill_between(xs, lows, highs, color=color, alpha=0.15, lw=0, zorder=2)
        with_ci = [i for i, s in enumerate(best) if s["ci_low"] is not None]
        ax.errorbar(
            [xs[i] for i in with_ci],
            [means[i] for i in with_ci],
            yerr=[[means[i] - lows[i] for i in with_ci], [highs[i] - means[i] for i in with_ci]],
            fmt="none",
            ecolor=color,
            elinewidth=0.9,
            capsize=2.5,
            alpha=0.8,
            zorder=3,
        )
    seed_x = [s[x] for s in best for _ in s["accuracies"]]
    seed_y = [100 * a for s in best for a in s["accuracies"]]
    ax.scatter(seed_x, seed_y, s=9, color=color, alpha=0.35, lw=0, zorder=2)
    if others:
        ax.scatter(
            [s[x] for s in others],
            [100 * s["accuracy_mean"] for s in others],
            s=28,
            marker=marker,
            facecolors="none",
            edgecolors=color,
            alpha=0.7,
            zorder=2,
        )


def _draw_collapsed(ax, rows: list, x: str) -> str:
    """Each cell whose training collapsed as a black × where it ended (never in a mean); the caption's sentence."""
    cells = [r for r in collapsed(rows) if r[x]]
    if not cells:
        return ""
    label = f"collapsed in training ({len(cells)} cells; not in any mean)"
    ax.scatter([r[x] for r in cells], [100 * r["accuracy"] for r in cells], label=label, **COLLAPSED_STYLE)
    return (
        f" Black × are the {len(cells)} cells whose GRPO training collapsed, drawn where they ended and left out of "
        "every mean, band and line."
    )


def _draw_base(ax, base: Optional[dict], base_x: Optional[float], color: str, label: str) -> None:
    if base is None or base_x is None:
        return
    m = 100 * base["accuracy_mean"]
    yerr = None
    if base["ci_low"] is not None:
        yerr = [[m - 100 * base["ci_low"]], [100 * base["ci_high"] - m]]
    ax.errorbar(
        [base_x],
        [m],
        yerr=yerr,
        marker="D",
        ms=7,
        mfc="white",
        mec=color,
        mew=1.8,
        color=color,
        capsize=2.5,
        ls="none",
        label=label,
        zorder=4,
    )


def _finish(fig, ax, title: str, legend_cols: int = 1) -> None:
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(
            handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, ncols=legend_cols
        )


def _task_title(task: str, scorer: str) -> str:
    return f"{task} ({scorer} scorer)" if scorer else task


def _models_with_base(settings: list, rows: list) -> dict:
    """model -> its 0-parameter point (kind=none cells, else reported base accuracy)."""
    out = {}
    for model in sorted({s["model"] for s in settings}):
        out[model] = base_point([s for s in settings if s["model"] == model], [r for r in rows if r["model"] == model])
    return out


# -- 1. accuracy vs parameters -------------------------------------------------------------------
def plot_params(rows, settings, out_dir, task, scorer, colors, reference: bool) -> Plot:
    key = "params"
    draw_ref = reference and task.lower() == PAPER_TASK
    positive = sorted({s["trainable_params"] for s in settings if s["trainable_params"] > 0})
    if len(positive) + (1 if any(s["trainable_params"] == 0 for s in settings) else 0) < 2:
        return _skip(
            key, task, scorer, f"trainable parameters take one value ({_values(settings, 'trainable_params')})"
        )
    bases = _models_with_base(settings, rows)
    fig, axes = _new_figure()
    ax = axes[0][0]
    xs = positive + ([p for p, _ in PAPER_POINTS] if draw_ref else [])
    xs += [r["trainable_params"] for r in collapsed(rows) if r["trainable_params"] > 0]
    with_base = draw_ref or any(b is not None for b in bases.values())
    base_x = _log_x(ax, xs, with_base=with_base, unit="parameters")
    for model, algo in sorted({(s["model"], s["algo"]) for s in settings}):
        line = [s for s in settings if s["model"] == model and s["algo"] == algo and s["trainable_params"] > 0]
        if not line:
            continue
        best, others = frontier(line)
        ls, marker = _style(algo)
        _draw_curve(
            ax, best, others, "trainable_params", colors[model], ls, marker, f"{line[0]['family']} · {model} · {algo}"
        )
    for model, base in bases.items():
        _draw_base(ax, base, base_x, colors[model], f"{model} base (0 params)")
    collapse_note = _draw_collapsed(ax, rows, "trainable_params")
    if draw_ref:
        ax.plot(
            [p for p, _ in PAPER_POINTS],
            [a for _, a in PAPER_POINTS],
            ls="-.",
            marker="*",
            ms=9,
            color=REF_COLOR,
            label=PAPER_LABEL,
            zorder=3,
        )
        ax.plot(
            [base_x],
            [PAPER_BASE],
            marker="*",
            ms=11,
            ls="none",
            mfc="white",
            mec=REF_COLOR,
            label=f"paper: base {PAPER_BASE}% (0 params)",
            zorder=4,
        )
        ax.axhline(PAPER_FULL_FT, ls="--", color=REF_COLOR, lw=1.2, label=f"paper: full fine-tuning {PAPER_FULL_FT}%")
    ax.set_ylabel(_ylabel(scorer))
    _finish(fig, ax, f"{TITLES[key]} — {_task_title(task, scorer)}")
    caption = (
        "Mean accuracy over seeds with a 95% t-interval (band and bars; none for a single seed). "
        "Lines join the best setting at each parameter count (colour: model, blue Qwen / red Llama; "
        "style: algorithm); hollow markers are other settings with that count; dots are single seeds. "
        "Diamonds left of the break are the base model (0 trainable parameters)."
    ) + collapse_note
    if draw_ref:
        caption += (
            " Grey stars are the TinyLoRA paper's Qwen2.5-7B-Instruct GSM8K points (0 → 88.2%, 1 → 82.0%, "
            "13 → 91.8%, 196 → 92.2%) and the dashed line its full fine-tuning (91.7%)."
        )
    return Plot(key, TITLES[key], task, scorer, _save(fig, out_dir, file_name(key, task, scorer)), caption)


def _values(settings: list, field: str) -> str:
    vals = sorted({s[field] for s in settings}, key=str)
    return ", ".join(str(v) for v in vals[:6]) + (" …" if len(vals) > 6 else "")


# -- 2. accuracy vs bytes ------------------------------------------------------------------------
def plot_bytes(rows, settings, out_dir, task, scorer, colors) -> Plot:
    key = "bytes"
    positive = sorted({s["trainable_bytes"] for s in settings if s["trainable_params"] > 0 and s["trainable_bytes"]})
    n_values = len(positive) + (1 if any(s["trainable_params"] == 0 for s in settings) else 0)
    if n_values < 2:
        return _skip(key, task, scorer, f"trainable bytes take one value ({_values(settings, 'trainable_bytes')})")
    bases = _models_with_base(settings, rows)
    fig, axes = _new_figure()
    ax = axes[0][0]
    dropped = [r["trainable_bytes"] for r in collapsed(rows) if r["trainable_params"] > 0 and r["trainable_bytes"]]
    base_x = _log_x(ax, positive + dropped, with_base=any(b is not None for b in bases.values()), unit="bytes")
    bits_markers = {32: "o", 16: "s", 8: "^"}
    bits_seen = set()
    lines = defaultdict(list)
    for s in settings:
        if s["trainable_params"] > 0 and s["trainable_bytes"]:
            bits = round(s["bits_per_param"], 2)
            bits_seen.add(bits)
            lines[(s["model"], s["algo"], bits)].append(s)
    for (model, algo, bits), line in sorted(lines.items()):
        best, others = frontier(line, x="trainable_bytes")
        ls, _ = _style(algo)
        prec = "/".join(sorted({str(s["precision"]) for s in line}))
        _draw_curve(
            ax,
            best,
            others,
            "trainable_bytes",
            colors[model],
            ls,
            bits_markers.get(int(bits), "D"),
            f"{line[0]['family']} · {model} · {algo} · {bits:g} bit/param ({prec})",
        )
    for model, base in bases.items():
        _draw_base(ax, base, base_x, colors[model], f"{model} base (0 bytes)")
    collapse_note = _draw_collapsed(ax, rows, "trainable_bytes")
    ax.set_ylabel(_ylabel(scorer))
    _finish(fig, ax, f"{TITLES[key]} — {_task_title(task, scorer)}")
    bits_txt = ", ".join(f"{b:g}" for b in sorted(bits_seen))
    caption = (
        "Same cells against the bytes the trained parameters take; one line per model, algorithm and "
        f"bits per parameter (8·bytes/params; here {bits_txt}), marker by precision "
        "(○ 32-bit, □ 16-bit). Mean over seeds with a 95% t-interval."
    )
    if len(bits_seen) < 2:
        caption += " Precision takes one value in these cells, so this is the parameter plot rescaled."
    caption += collapse_note
    return Plot(key, TITLES[key], task, scorer, _save(fig, out_dir, file_name(key, task, scorer)), caption)


# -- 3. tiled vs structured ----------------------------------------------------------------------
SHARING_STYLE = {"tiled": ("o", -0.14), "structured": ("s", 0.14)}


def plot_sharing(rows, settings, out_dir, task, scorer, colors) -> Plot:
    """Paired points: each setting run with both sharings (all else equal), tiled vs structured."""
    key = "sharing"
    # sharing only changes anything when 1 < tie < all (tie=1: a vector per module; all: one vector)
    shared = [
        s
        for s in settings
        if s["kind"] in ("tinylora", "lora_xs") and s["sharing"] and str(s["tie"]) not in ("1", "all", "None")
    ]
    pairs = defaultdict(dict)
    for s in shared:
        k = (s["family"], s["model"], s["algo"], s["kind"], s["r"], s["u"], str(s["tie"]), s["precision"], s["lr"])
        cur = pairs[k].get(s["sharing"])
        if cur is None or s["accuracy_mean"] > cur["accuracy_mean"]:
            pairs[k][s["sharing"]] = s
    pairs = {k: v for k, v in sorted(pairs.items()) if len(v) >= 2}
    if not pairs:
        values = sorted({s["sharing"] for s in shared})
        what = (
            "no TinyLoRA/LoRA-XS cell with 1 < tie < all"
            if not values
            else f"only {values[0]} sharing was run"
            if len(values) == 1
            else "no setting was run with both tiled and structured sharing (all else equal)"
        )
        return _skip(key, task, scorer, f"sharing does not vary ({what})")
    fig, axes = _new_figure(width=max(6.5, 2.8 + 1.3 * len(pairs)), height=5.0)
    ax = axes[0][0]
    labels = []
    for i, (k, by_sharing) in enumerate(pairs.items()):
        family, model, algo, kind, r, u, tie, precision, lr = k
        for sharing, s in sorted(by_sharing.items()):
            marker, dx = SHARING_STYLE.get(sharing, ("^", 0.0))
            m = 100 * s["accuracy_mean"]
            yerr = None if s["ci_low"] is None else [[m - 100 * s["ci_low"]], [100 * s["ci_high"] - m]]
            ax.errorbar(
                [i + dx],
                [m],
                yerr=yerr,
                marker=marker,
                ms=8,
                color=colors[model],
                capsize=3,
                mfc=colors[model] if sharing == "tiled" else "white",
                mew=1.8,
                ls="none",
                zorder=3,
            )
            ax.scatter(
                [i + dx] * len(s["accuracies"]),
                [100 * a for a in s["accuracies"]],
                s=9,
                color=colors[model],
                alpha=0.35,
                lw=0,
                zorder=2,
            )
            ax.annotate(
                _fmt_count(s["trainable_params"]),
                (i + dx, m),
                xytext=(8, -3),
                textcoords="offset points",
                ha="left",
                fontsize=7,
                color="0.35",
            )
        ax.plot(
            [i + SHARING_STYLE["tiled"][1], i + SHARING_STYLE["structured"][1]],
            [
                100 * by_sharing.get("tiled", by_sharing[next(iter(by_sharing))])["accuracy_mean"],
                100 * by_sharing.get("structured", by_sharing[next(iter(by_sharing))])["accuracy_mean"],
            ],
            color=colors[model],
            lw=1,
            alpha=0.6,
            zorder=2,
        )
        labels.append(f"{model}\n{algo} · {kind}\nr={r} u={u} tie={tie}\n{precision}")
    ax.set_xticks(range(len(pairs)), labels, fontsize=8)
    ax.set_xlim(-0.6, len(pairs) - 0.4)
    for sharing, (marker, _) in SHARING_STYLE.items():
        ax.plot(
            [],
            [],
            marker=marker,
            ls="none",
            color="0.3",
            mfc="0.3" if sharing == "tiled" else "white",
            mew=1.8,
            label=sharing,
        )
    ax.set_ylabel(_ylabel(scorer))
    _finish(fig, ax, f"{TITLES[key]} — {_task_title(task, scorer)}")
    caption = (
        "Settings run with both sharings, everything else equal (TinyLoRA/LoRA-XS with 1 < tie < all): "
        "filled = tiled (neighbouring modules in depth share a vector), hollow = structured (one module type "
        "across consecutive layers). Mean over seeds with 95% t-interval, dots are seeds, small numbers the "
        "trainable parameters of each (they can differ between the two)."
    )
    return Plot(key, TITLES[key], task, scorer, _save(fig, out_dir, file_name(key, task, scorer)), caption)


# -- 4. frozen rank ------------------------------------------------------------------------------
def plot_rank(rows, settings, out_dir, task, scorer, colors) -> Plot:
    key = "rank"
    tiny = [s for s in settings if s["kind"] == "tinylora" and s["r"] is not None]
    ranks = sorted({s["r"] for s in tiny})
    if len(ranks) < 2:
        what = f"r={ranks[0]}" if ranks else "no TinyLoRA cell"
        return _skip(key, task, scorer, f"frozen rank r does not vary ({what})")
    groups = defaultdict(list)
    for s in tiny:
        groups[(s["model"], s["algo"], s["trainable_params"])].append(s)
    groups = {k: v for k, v in groups.items() if len({s["r"] for s in v}) >= 2}
    if not groups:
        return _skip(key, task, scorer, "r varies only between different parameter counts, never at a matched one")
    fig, axes = _new_figure()
    ax = axes[0][0]
    ax.set_xscale("log", base=2)
    markers = ["o", "s", "^", "v", "P", "X", "D"]
    counts = sorted({k[2] for k in groups})
    for (model, algo, params), line in sorted(groups.items()):
        best, others = frontier(line, x="r")
        ls, _ = _style(algo)
        _draw_curve(
            ax,
            best,
            others,
            "r",
            colors[model],
            ls,
            markers[counts.index(params) % len(markers)],
            f"{line[0]['family']} · {model} · {algo} · {_fmt_count(params)} params",
        )
    used = sorted({s["r"] for v in groups.values() for s in v})
    ax.set_xticks(used, [str(r) for r in used])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(min(used) / 1.4, max(used) * 1.4)
    ax.set_xlabel("frozen rank r of the SVD factors (log2 scale)")
    ax.set_ylabel(_ylabel(scorer))
    _finish(fig, ax, f"{TITLES[key]} — {_task_title(task, scorer)}")
    caption = (
        "TinyLoRA cells at matched trainable-parameter counts (one line each): accuracy as the frozen "
        "rank r changes. Mean over seeds with a 95% t-interval; best setting at each r."
    )
    return Plot(key, TITLES[key], task, scorer, _save(fig, out_dir, file_name(key, task, scorer)), caption)


# -- 5. the family view --------------------------------------------------------------------------
FAMILY_KINDS = ("tinylora", "lora")
FAMILY_PARTS = ["TinyLoRA", "LoRA", "base (0 params)", "½ of LoRA's gain"]  # a model's legend entries, in order


def plot_family(rows, settings, out_dir, task, scorer, colors) -> Plot:
    """Accuracy vs trainable parameters per model, one panel per algorithm (family.py's numbers drawn)."""
    key = "family"
    families = sorted({s["family"] for s in settings})
    if len(families) < 2:
        return _skip(key, task, scorer, f"one model family only ({families[0]})")
    if not any(s["kind"] in FAMILY_KINDS and s["trainable_params"] > 0 for s in settings):
        return _skip(key, task, scorer, "no TinyLoRA or LoRA cell")
    fig = family_figure(rows, settings, task, scorer, colors)
    caption = (
        "One panel per algorithm, one colour per model (blue Qwen, red Llama). Circles joined by a line: "
        "TinyLoRA, the mean accuracy over seeds of the best setting at each trainable-parameter count (with "
        "tie=all the count is u on every model), band and bars its 95% t-interval over seeds, dots single "
        "seeds. Stars: LoRA, annotated with its rank; the smallest rank run (r=1 in the family study) is each "
        "model's reference budget, and its parameter count differs per model. Diamonds left of the break: "
        "the base model (0 trainable parameters). Dotted lines: half of each model's LoRA gain over its base, "
        "base + ½·(LoRA − base); the table below gives the normalized gain at each budget."
    )
    return Plot(key, TITLES[key], task, scorer, _save(fig, out_dir, file_name(key, task, scorer)), caption)


def family_figure(rows, settings, task, scorer, colors) -> Figure:
    """The family view's figure: a panel per algorithm (title = algo), TinyLoRA curve, LoRA stars and base per model."""
    trained = [s for s in settings if s["kind"] in FAMILY_KINDS and s["trainable_params"] > 0]
    algos = sorted({s["algo"] for s in trained})
    models = sorted({(s["family"], s["model"]) for s in trained})
    bases = _models_with_base(settings, rows)
    positive = sorted({s["trainable_params"] for s in trained})
    fig = Figure(figsize=(2.5 + 4.6 * len(algos), 4.8), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(algos), squeeze=False, sharey=True)
    for ax, algo in zip(axes[0], algos):
        base_x = _log_x(ax, positive, with_base=any(b is not None for b in bases.values()), unit="parameters")
        for family, model in models:
            mine = [s for s in trained if s["model"] == model and s["algo"] == algo]
            _draw_family_model(ax, mine, bases.get(model), base_x, colors[model], f"{family} · {model}")
        ax.set_title(algo, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel(_ylabel(scorer))
    handles = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    labels = sorted(handles, key=lambda lb: (lb.rsplit(" · ", 1)[0], FAMILY_PARTS.index(lb.rsplit(" · ", 1)[1])))
    fig.legend(
        [handles[lb] for lb in labels], labels, loc="upper left", bbox_to_anchor=(1.0, 0.92), fontsize=8, frameon=False
    )
    fig.suptitle(f"{TITLES['family']} — {_task_title(task, scorer)}", fontsize=11)
    return fig


def _draw_family_model(ax, settings: list, base: Optional[dict], base_x, color: str, label: str) -> None:
    """One model in one panel: its TinyLoRA curve, its LoRA stars, its base and the half-LoRA-gain line."""
    best, others = frontier([s for s in settings if s["kind"] == "tinylora"])
    if best:
        _draw_curve(ax, best, others, "trainable_params", color, "-", "o", f"{label} · TinyLoRA")
    for s in sorted((s for s in settings if s["kind"] == "lora"), key=lambda s: s["r"]):
        m = 100 * s["accuracy_mean"]
        yerr = None if s["ci_low"] is None else [[m - 100 * s["ci_low"]], [100 * s["ci_high"] - m]]
        ax.errorbar(
            [s["trainable_params"]],
            [m],
            yerr=yerr,
            marker="*",
            ms=13,
            color=color,
            mec="black",
            mew=0.7,
            capsize=2.5,
            ls="none",
            label=f"{label} · LoRA",
            zorder=4,
        )
        ax.annotate(
            f"r={s['r']}",
            (s["trainable_params"], m),
            xytext=(7, -3),
            textcoords="offset points",
            fontsize=7,
            color="0.3",
        )
    _draw_base(ax, base, base_x, color, f"{label} · base (0 params)")
    lora = lora_reference(settings)
    if base is not None and lora is not None and lora["accuracy_mean"] > base["accuracy_mean"]:
        half = 100 * (base["accuracy_mean"] + HALF * (lora["accuracy_mean"] - base["accuracy_mean"]))
        ax.axhline(half, color=color, ls=":", lw=1.1, label=f"{label} · ½ of LoRA's gain", zorder=1)


# -- 6. RL vs SFT --------------------------------------------------------------------------------
def plot_rl_sft(rows, settings, out_dir, task, scorer, colors) -> Plot:
    key = "rl_sft"
    gap = rl_sft_gap(settings)
    if not gap:
        algos = ", ".join(sorted({s["algo"] for s in settings}))
        return _skip(key, task, scorer, f"needs GRPO and SFT cells of one model (algorithms here: {algos})")
    models = sorted({g["model"] for g in gap})
    fig, axes = _new_figure(height=4.4 * len(models), nrows=len(models))
    for ax, model in zip(axes[:, 0], models):
        mine = [s for s in settings if s["model"] == model and s["trainable_params"] > 0]
        pts = [g for g in gap if g["model"] == model]
        xs = [s["trainable_params"] for s in mine] + [g["params_sft"] for g in pts if g["params_sft"]]
        hi = max(xs) * 4
        _log_x(ax, xs + [hi], with_base=False, unit="parameters")
        for algo in ("grpo", "sft"):
            line = [s for s in mine if s["algo"] == algo]
            best, others = frontier(line)
            ls, marker = _style(algo)
            _draw_curve(
                ax,
                best,
                [],
                "trainable_params",
                colors[model] if algo == "grpo" else "0.3",
                ls,
                marker,
                f"{model} · {algo} (best setting per count)",
            )
        for g in pts:
            y = 100 * g["accuracy"]
            end = g["params_sft"] if g["params_sft"] is not None else hi
            if end > g["params_rl"] * 1.05:
                ax.annotate(
                    "",
                    xy=(end, y),
                    xytext=(g["params_rl"], y),
                    arrowprops={
                        "arrowstyle": "->",
                        "color": "0.35",
                        "lw": 1.0,
                        "ls": "-" if g["params_sft"] is not None else ":",
                    },
                )
            text = "SFT: not reached" if g["params_sft"] is None else f"×{g['ratio']:.3g}"
            mid = math.sqrt(g["params_rl"] * max(end, g["params_rl"]))
            ax.annotate(
                text,
                xy=(mid, y),
                xytext=(0, 3),
                textcoords="offset points",
                fontsize=8,
                color="0.2",
                ha="center",
                va="bottom",
            )
        ax.set_ylabel(_ylabel(scorer))
        _finish(fig, ax, f"{model}: SFT parameters needed for each GRPO accuracy — {_task_title(task, scorer)}")
    caption = (
        "For each accuracy GRPO reaches (its best setting at each count, seeds averaged), the arrow runs to "
        "the parameter count at which SFT's curve first reaches it, interpolating accuracy linearly on "
        "the log-parameter axis; ×N is SFT params / GRPO params, 'not reached' means SFT never gets "
        "there in these cells. Numbers are in the table below."
    )
    return Plot(key, TITLES[key], task, scorer, _save(fig, out_dir, file_name(key, task, scorer)), caption)
