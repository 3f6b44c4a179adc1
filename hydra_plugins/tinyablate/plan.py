"""What a sweep will run, before it runs: honest counts and GPU-hour estimates (the dry run and the submission).

N override sets can define fewer distinct cells: two sets differing only in a field the cell's adapter kind
ignores (LoRA-XS's u) or in `sharing` at tie=all are one cell (tinyablate/config/identity.py). The plan says
N -> M (K duplicates and why), lists each distinct cell once, and prices each with tinyablate/cost.py: the
model's figure, calibrated by completed cells of the same model/algorithm/GPUs, or measured when cells of
the same kind completed; totals per swept axis and for the sweep.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional

from tinyablate.cell_folder import ResultError, sweep_cell_folders
from tinyablate.config import spec_from_dict
from tinyablate.config.identity import NOT_IDENTITY, ignored_fields
from tinyablate.config.model import SHAPES
from tinyablate.cost import calibrate, estimate_cell, load_table, packing_speedup


def distinct(cells: list) -> tuple:
    """(the first cell of each cell_id in order, {cell_id: [later cells with that id]})."""
    first, dups = {}, {}
    for c in cells:
        if c.cell_id in first:
            dups.setdefault(c.cell_id, []).append(c)
        else:
            first[c.cell_id] = c
    return list(first.values()), dups


def count_lines(cells: list) -> list:
    """ "N override sets -> M distinct cells", then one line per reason of the duplicates."""
    unique, dups = distinct(cells)
    k = len(cells) - len(unique)
    head = f"{len(cells)} override sets -> {len(unique)} distinct cells"
    if not k:
        return [head]
    by_id = {c.cell_id: c for c in unique}
    reasons = Counter(duplicate_reason(by_id[cid], d) for cid, later in dups.items() for d in later)
    lines = [f"{head} ({k} duplicates, each run once):"]
    lines += [f"    {n:>6}  {why}" for why, n in reasons.most_common()]
    return lines


def duplicate_reason(first, dup) -> str:
    """Why override set `dup` defines the same cell as `first`: the fields they differ in, each with why it
    does not change the result."""
    a, b = _overrides(first.overrides), _overrides(dup.overrides)
    ignored = ignored_fields(first.spec)
    parts = []
    for key in sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)):
        if key in ignored:
            parts.append(f"{key} ({ignored[key]})")
        elif _not_identity(key):
            parts.append(f"{key} (changes speed or bookkeeping, not the result)")
        else:
            parts.append(f"{key}={a.get(key)} and {b.get(key)} (the same value)")
    return "; ".join(parts) or "the same overrides"


def _overrides(overrides: list) -> dict:
    return dict(o.lstrip("+").split("=", 1) for o in overrides if "=" in o)


def _not_identity(key: str) -> bool:
    """`key` (e.g. "algo.micro_batch_size", "logger.mode") is left out of cell_id."""
    section, _, name = key.rpartition(".")
    top = key.split(".")[0]
    return (top in NOT_IDENTITY and NOT_IDENTITY[top] is None) or name in (NOT_IDENTITY.get(section) or ())


# -- GPU-hours ---------------------------------------------------------------------------------
def estimates(cells: list, device: str) -> list:
    """An Estimate per cell (tinyablate.cost), calibrated by the completed cells of these cells' sweeps."""
    table = load_table()
    if device not in table.kinds():
        raise SystemExit(
            f"cost_device={device!r} has no throughput measurements; known: {', '.join(table.kinds())} ({table.path})"
        )
    return calibrate([c.spec for c in cells], completed_cells(cells), table.device(device))


def completed_cells(cells: list) -> list:
    """(spec, GPU-hours) of the completed cells in these cells' sweep folders; a cell resumed from a
    checkpoint or stopped at a collapse (algo.on_collapse=stop) is left out (its timing covers only part of its run)."""
    out = []
    for sweep_dir in sorted({c.folder.path.parent for c in cells}):
        for folder in sweep_cell_folders(sweep_dir, depth=1):
            try:
                result = folder.read_result()
            except ResultError:
                continue
            if (
                result is None
                or not result.completed
                or not result.config
                or result.timing.gpu_hours is None
                or result.metrics is None
                or result.metrics.resumed_from_step is not None
                or (result.metrics.collapse is not None and result.metrics.collapse.stopped)
            ):
                continue
            try:
                spec = spec_from_dict(result.config)
            except (TypeError, ValueError):  # a result of an older schema: not comparable
                continue
            if spec.model.name in SHAPES:  # (a model since removed from the registry cannot be priced)
                out.append((spec, result.timing.gpu_hours))
    return out


def plan_lines(cells: list, device: str, states: Optional[dict] = None, cells_per_gpu: int = 1) -> list:
    """The dry run: each distinct cell once with its estimate, then totals per swept axis and overall."""
    unique, _ = distinct(cells)
    est = estimates(unique, device)
    states = states or {c.cell_id: c.folder.state() for c in unique}
    lines = [_cell_line(c, e, states[c.cell_id]) for c, e in zip(unique, est)]
    if all(e.source == "cpu" for e in est):
        return lines + [f"GPU-hours: none (all {len(unique)} cells run on the CPU, gpus=0)"]
    lines += axis_lines(cells, unique, est)
    lines += total_lines(unique, est, states, device)
    return lines + packed_lines(unique, est, device, cells_per_gpu)


def packed_lines(cells: list, est: list, device: str, cells_per_gpu: int) -> list:
    """With several one-GPU cells at once on a GPU: the GPU-hours the packing leaves (tinyablate/cost.py
    packing_speedup, measured on the embedded model)."""
    if cells_per_gpu <= 1:
        return []
    shared = sum(e.gpu_hours for c, e in zip(cells, est) if c.spec.gpus == 1)
    other = sum(e.gpu_hours for c, e in zip(cells, est) if c.spec.gpus != 1)
    speedup = packing_speedup(cells_per_gpu, device)
    return [
        f"packed {cells_per_gpu} cells per GPU (hydra.launcher.cells_per_gpu): about "
        f"{_hours(shared / speedup + other)} GPU-hours in all ({speedup:.1f}x the cells per GPU-hour, measured "
        f"with small models; benchmarks/RESULTS.md)"
    ]


def _cell_line(c, e, state: str) -> str:
    s, a = c.spec, c.spec.adapter
    extra = (f" quantization={s.model.quantization}" if s.model.quantization != "none" else "") + (
        f" eval_tasks={','.join(s.eval.tasks)}" if s.eval.tasks else ""
    )
    return (
        f"{state:<9} {c.cell_id}  model={s.model.name} task={s.task.name} algo={s.algo.name} kind={a.kind} "
        f"r={a.r} u={a.u} tie={a.tie} sharing={a.sharing} precision={a.precision}{extra} seed={s.seed} gpus={s.gpus} "
        f"params={c.params:,} bytes={c.trainable_bytes:,} gpu_h={_hours(e.gpu_hours)} ({e.label()})"
    )


def axis_lines(cells: list, unique: list, est: list) -> list:
    """GPU-hours per value of each swept axis (an axis a cell's kind ignores counts under 'n/a')."""
    sets = [_overrides(c.overrides) for c in cells]
    axes = [k for k in dict.fromkeys(k for s in sets for k in s) if len({s.get(k) for s in sets}) > 1]
    lines = []
    for axis in axes:
        totals: dict = {}
        for c, e in zip(unique, est):
            value = "n/a" if axis in ignored_fields(c.spec) else _overrides(c.overrides).get(axis)
            hours, n = totals.get(value, (0.0, 0))
            totals[value] = (hours + e.gpu_hours, n + 1)
        by_value = ", ".join(f"{v} {_hours(h)} ({n} cells)" for v, (h, n) in totals.items())
        lines.append(f"GPU-hours by {axis}: {by_value}")
    return lines


def total_lines(unique: list, est: list, states: dict, device: str) -> list:
    total = sum(e.gpu_hours for e in est)
    todo = [e.gpu_hours for c, e in zip(unique, est) if states[c.cell_id] != "completed"]
    sources = Counter(e.source for e in est)
    base = {}
    table = load_table().device(device)
    for c in unique:
        if c.spec.gpus and c.spec.eval.base:
            key = (c.spec.model.name, c.spec.task.name, c.spec.eval.batch_size, c.spec.eval.max_new_tokens, c.spec.gpus)
            base.setdefault(key, c.spec.gpus * estimate_cell(c.spec, table).base_eval_s / 3600)
    how = ", ".join(f"{n} {src}" for src, n in sources.most_common())
    lines = [
        f"GPU-hours on {device}: {_hours(total)} for {len(unique)} distinct cells ({how}); "
        f"{_hours(sum(todo))} for the {len(todo)} not completed"
    ]
    if base:
        lines.append(
            f"    + {_hours(sum(base.values()))} GPU-hours of base evaluation (cached: once per model, task "
            f"and eval setting, {len(base)} here)"
        )
    if sources.get("model") or sources.get("calibrated"):
        lines.append(
            "    model figures are upper bounds: completions at their maximum length, decode steps at the "
            "measured latency of the generator the engine settings pick (tinyablate/cost.py; table "
            "tinyablate/throughput.json)"
        )
    return lines


def todo_line(todo: list, device: str, cells_per_gpu: int = 1) -> str:
    """The submission's estimate for the cells about to run."""
    est = estimates(todo, device)
    if all(e.source == "cpu" for e in est):
        return f"the {len(todo)} cells to run are CPU cells (gpus=0): no GPU-hours"
    packed = packed_lines(todo, est, device, cells_per_gpu)
    return (
        f"estimated {_hours(sum(e.gpu_hours for e in est))} GPU-hours on {device} for the {len(todo)} cells to run "
        f"({', '.join(f'{n} {src}' for src, n in Counter(e.source for e in est).most_common())})"
        + (f"; {packed[0]}" if packed else "")
    )


def _hours(h: float) -> str:
    """GPU-hours to 3 significant digits (whole hours with thousands separators above 100)."""
    return f"{h:,.0f}" if h >= 100 else f"{h:.3g}"
