"""A W&B summary run per sweep: every cell in one table, and accuracy-vs-parameters charts.

The run joins the sweep's group (the cells' runs use the sweep as group) with job_type
"analysis", so the sweep's dashboard gets the table and charts next to the cell runs. No API key
is read or written here: online mode uses whatever `wandb login` set up.
"""

from __future__ import annotations

import math
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Optional

from tinyablate.wandb_files import wait_for_exit_record

from .data import CSV_COLUMNS, aggregate, collapsed, measured
from .family import FAMILY_COLUMNS, family_gains, half_lora_label
from .plots import model_colors, plot_family
from .transfer import TRANSFER_COLUMNS, has_cross_task, transfer_rows

PROJECT = "tinyablate"
JOB_TYPE = "analysis"
MODES = ("offline", "online", "disabled")
FINISH_TIMEOUT_S = 30.0


def table_columns() -> list:
    return CSV_COLUMNS + ["line", "log10_params"]


# Columns whose values mix types across adapter kinds (tie: 2 or "all"): logged as strings.
_STRING_COLUMNS = {"tie", "size", "sharing", "precision", "seed", "quantization"}


def _cell(column: str, value):
    """A table value: None stays None (W&B columns are nullable), mixed-type columns become strings."""
    if value is None:
        return None
    return str(value) if column in _STRING_COLUMNS else value


def _log_family(log: dict, summary: dict, prefix: str, rows: list, settings: list, media: Path) -> None:
    """The family view of one task and scorer (`rows`, `settings`): its figure, gain table and half-LoRA budgets."""
    import wandb

    task, scorer = rows[0]["task"], rows[0]["scorer"]
    plot = plot_family(rows, settings, media, task, scorer, model_colors(settings))
    if plot.file:
        log[f"{prefix}/family"] = wandb.Image(str(media / plot.file), caption=plot.caption)
    gains = family_gains(measured(rows), settings)  # collapsed cells in no mean
    if not gains:
        return
    log[f"{prefix}/family_gain"] = wandb.Table(
        columns=FAMILY_COLUMNS, data=[[g[c] for c in FAMILY_COLUMNS] for g in gains]
    )
    for g in gains:
        summary[f"half_lora/{prefix}/{g['model']} · {g['algo']}"] = half_lora_label(g)


def log_wandb_summary(
    rows: list, sweep: str, mode: str, out_dir: Path, *, project: str = PROJECT, entity: Optional[str] = None
) -> Optional[Path]:
    """Log the sweep's summary run; returns its `.wandb` file (None in disabled mode).

    Logged: `cells` (a wandb.Table of every completed cell, CSV columns plus `line` =
    "family · algo" and log10_params), and per task/scorer `<task>/acc_vs_params` (a line series of
    mean accuracy vs log10 trainable parameters, one line per family · model · algo; collapsed cells are in no
    mean) plus
    `<task>/scatter/<family>-<algo>` (accuracy of every cell vs log10 parameters), and the family view where
    the report has it: `<task>/family` (the report's figure, an image) and `<task>/family_gain` (family.csv's
    table: the normalized gain against LoRA per model, algorithm and budget). Summary values: n_cells,
    n_collapsed, gpu_hours, the best mean accuracy per line under `best/<task>/<line>` and the half-LoRA budget per model and
    algorithm under `half_lora/<task>/<model> · <algo>` (a count, "not reached" or "undefined"). When cells
    were evaluated on other tasks (eval.tasks), `transfer`: a table of every (cell, evaluation task).
    """
    import wandb  # only when a summary run is asked for: importing it costs ~0.5 s

    if mode not in MODES:
        raise ValueError(f"wandb mode={mode!r} is invalid: expected one of {', '.join(MODES)}")
    rows = [r for r in rows if r["sweep"] == sweep] or rows
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = sorted({(r["task"], r["scorer"]) for r in rows})
    run = wandb.init(
        project=project,
        entity=entity,
        group=sweep,
        job_type=JOB_TYPE,
        name=f"{sweep}-analysis",
        mode=mode,
        dir=str(out_dir),
        reinit="create_new",
        config={
            "sweep": sweep,
            "n_cells": len(rows),
            "tasks": [f"{t}/{s}" for t, s in tasks],
            "families": sorted({r["family"] for r in rows}),
            "algos": sorted({r["algo"] for r in rows}),
        },
        settings=wandb.Settings(console="off", silent=True, disable_code=True),
    )
    sync_file = getattr(run.settings, "sync_file", None)
    media = tempfile.TemporaryDirectory()  # the family figure, until run.log has copied it into the run
    try:
        columns = table_columns()
        data = []
        for r in rows:
            extra = [
                f"{r['family']} · {r['algo']}",
                math.log10(r["trainable_params"]) if r["trainable_params"] > 0 else None,
            ]
            data.append([_cell(c, r.get(c)) for c in CSV_COLUMNS] + extra)
        cells = wandb.Table(columns=columns, data=data)
        log = {"cells": cells}
        summary = {"n_cells": len(rows), "gpu_hours": sum(r["gpu_hours"] for r in rows)}
        summary["n_collapsed"] = len(collapsed(rows))  # their table rows have collapse_step; no mean holds them
        for task, scorer in tasks:
            prefix = f"{task}-{scorer}" if scorer else task
            mine = [r for r in rows if (r["task"], r["scorer"]) == (task, scorer)]
            settings = aggregate(mine)
            _log_family(log, summary, prefix, mine, settings, Path(media.name))
            lines = defaultdict(list)
            for g in settings:
                if g["trainable_params"] > 0:
                    lines[f"{g['family']} · {g['model']} · {g['algo']}"].append(g)
            keys, xs, ys = [], [], []
            for label, settings in sorted(lines.items()):
                best = {}
                for g in settings:  # best setting per parameter count, as on the report's plot
                    p = g["trainable_params"]
                    if p not in best or g["accuracy_mean"] > best[p]["accuracy_mean"]:
                        best[p] = g
                pts = [best[p] for p in sorted(best)]
                keys.append(label)
                xs.append([math.log10(g["trainable_params"]) for g in pts])
                ys.append([g["accuracy_mean"] for g in pts])
                summary[f"best/{prefix}/{label}"] = max(g["accuracy_mean"] for g in pts)
            if keys:
                log[f"{prefix}/acc_vs_params"] = wandb.plot.line_series(
                    xs=xs,
                    ys=ys,
                    keys=keys,
                    xname="log10(trainable params)",
                    title=f"{prefix}: mean accuracy vs trainable parameters (family · model · algo)",
                )
            split = defaultdict(list)
            for r in mine:
                if r["trainable_params"] > 0:
                    split[(r["family"], r["algo"])].append(r)
            for (family, algo), cells_ in sorted(split.items()):
                table = wandb.Table(
                    columns=["log10_params", "accuracy", "trainable_params", "model", "seed", "cell_id"],
                    data=[
                        [
                            math.log10(r["trainable_params"]),
                            r["accuracy"],
                            r["trainable_params"],
                            r["model"],
                            r["seed"],
                            r["cell_id"],
                        ]
                        for r in cells_
                    ],
                )
                log[f"{prefix}/scatter/{family}-{algo}"] = wandb.plot.scatter(
                    table, "log10_params", "accuracy", title=f"{prefix}: {family} · {algo} accuracy per cell"
                )
        if has_cross_task(rows):  # cells evaluated on other tasks (eval.tasks): one row per cell and task
            log["transfer"] = wandb.Table(
                columns=TRANSFER_COLUMNS, data=[[_cell(c, t[c]) for c in TRANSFER_COLUMNS] for t in transfer_rows(rows)]
            )
        run.log(log)
        run.summary.update(summary)
    except BaseException:
        run.finish(exit_code=1)
        raise
    finally:
        media.cleanup()
    run.finish()
    if mode == "disabled" or not sync_file:
        return None
    wait_for_exit_record(sync_file, FINISH_TIMEOUT_S)
    return Path(sync_file)
