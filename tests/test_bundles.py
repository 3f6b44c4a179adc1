"""Several cells in one job (hydra.launcher.cells_per_job) and several jobs on one GPU (cells_per_gpu, auto).

A bundle runs its cells one after another in one process: a failed cell does not stop the next, every cell
keeps its own folder and result, and a later cell starts warm. cells_per_gpu=auto packs by the cost model's
memory estimate; a number that cannot fit, or that is no positive integer, is refused before anything runs.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from test_sweeps import TINY, fail_when_run, launch


def _results(runs) -> dict:
    return {
        json.loads(p.read_text())["config"]["adapter"]["u"]: json.loads(p.read_text())
        for p in runs.rglob("result.json")
    }


def test_a_bundle_runs_its_cells_one_after_another_and_a_failure_stops_none(tmp_path):
    runs = tmp_path / "runs"
    args = ["-m", *TINY, f"output_dir={runs}", "sweep=bundle", "gpus=0"]
    fail_when_run(runs / "bundle", launch([*args, "adapter.u=2", "dry_run=true"], tmp_path))
    proc = launch([*args, "adapter.u=1,2,3", "hydra.launcher.cells_per_job=3"], tmp_path, timeout=900)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # one cell failed
    assert "and 2 more, one after another" in proc.stdout
    by_u = _results(runs)
    assert [by_u[u]["status"] for u in (1, 2, 3)] == ["completed", "failed", "completed"]
    records = [json.loads(p.read_text()) for p in runs.rglob("launch.json")]
    assert len(records) == 3 and len({r["job_id"] for r in records}) == 1  # one job ran all three
    # the third cell started in a warm process: imports done, base accuracy cached
    first, third = (by_u[u]["timing"]["start_to_first_step_s"] for u in (1, 3))
    assert 0 < third < first, (first, third)
    again = launch([*args, "adapter.u=1,2,3", "hydra.launcher.cells_per_job=3"], tmp_path, timeout=300)
    assert "0 to run, 2 completed cells skipped, 1 failed cells skipped" in again.stdout, again.stdout


def test_bundles_group_cells_of_one_gpu_count_and_never_multi_gpu_cells():
    from hydra_plugins.tinyablate.submit import bundles

    cells = [
        SimpleNamespace(name=n, spec=SimpleNamespace(gpus=g))
        for n, g in [("a", 1), ("b", 1), ("c", 1), ("d", 2), ("e", 1), ("f", 0), ("g", 0)]
    ]
    groups = [[c.name for c in b] for b in bundles(cells, 2)]
    assert groups == [["a", "b"], ["d"], ["c", "e"], ["f", "g"]]
    assert sorted([c.name for c in b] for b in bundles(cells, 1)) == [[c.name] for c in cells]


@pytest.mark.parametrize("value", ["0", "two", "1.5", "-3"])
def test_cells_per_gpu_that_is_no_positive_integer_or_auto_is_refused(value, tmp_path):
    proc = launch(
        ["-m", *TINY, f"output_dir={tmp_path}/runs", "dry_run=true", f"hydra.launcher.cells_per_gpu={value}"], tmp_path
    )
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "cells_per_gpu" in line]
    assert lines and "a positive integer or auto" in lines[0], proc.stdout + proc.stderr[-2000:]


def test_cells_per_gpu_on_slurm_without_a_bundle_is_refused(tmp_path):
    """On SLURM, cells_per_gpu runs cells of one job's bundle at once: without cells_per_job there is none."""
    proc = launch(
        [
            "-m",
            *TINY,
            f"output_dir={tmp_path}/runs",
            "dry_run=true",
            "gpus=0",
            "hydra/launcher=slurm",
            "hydra.launcher.cells_per_gpu=2",
        ],
        tmp_path,
    )
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "cells_per_gpu" in line]
    assert lines and "set hydra.launcher.cells_per_job too" in lines[0], proc.stdout + proc.stderr[-2000:]


def test_cells_per_gpu_auto_packs_by_the_memory_model_and_too_many_are_refused(monkeypatch, capsys):
    from hydra_plugins.tinyablate import launcher as launcher_module
    from hydra_plugins.tinyablate.launcher import TinyablateLauncher
    from tinyablate.config import CellSpec, ModelConfig
    from tinyablate.cost import cell_memory_bytes

    spec = CellSpec(model=ModelConfig(name="smollm2-135m"), gpus=1)
    need = cell_memory_bytes(spec)
    monkeypatch.setattr(launcher_module, "local_gpu_bytes", lambda: 20 * need)
    monkeypatch.setattr(launcher_module, "local_gpus", lambda: [0])
    monkeypatch.setattr(launcher_module, "cores", lambda: 64)
    cells = [SimpleNamespace(spec=spec, cell_id=f"c{i}", error=None) for i in range(30)]
    monkeypatch.setattr(launcher_module.plan, "distinct", lambda cs: (cs, []))
    auto = TinyablateLauncher(backend="local", cells_per_gpu="auto", max_parallel=1)
    auto._pack_gpus(cells)
    assert auto.settings["cells_per_gpu"] == 12 and auto.settings["max_parallel"] == 12  # 0.9 x 20 / 1.5
    assert "cells_per_gpu=auto: 12 cells at once per GPU" in capsys.readouterr().out
    monkeypatch.setattr(launcher_module, "cores", lambda: 8)
    capped = TinyablateLauncher(backend="local", cells_per_gpu="auto", max_parallel=1)
    capped._pack_gpus(cells)
    assert capped.settings["cells_per_gpu"] == 8  # one per CPU core
    fits = TinyablateLauncher(backend="local", cells_per_gpu=12, max_parallel=12)
    fits._pack_gpus(cells)
    with pytest.raises(SystemExit) as stop:
        TinyablateLauncher(backend="local", cells_per_gpu=13, max_parallel=13)._pack_gpus(cells)
    assert stop.value.code == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("hydra.launcher.cells_per_gpu=13: that many cells") and "at most 12 do" in out[-1]


def test_a_slurm_job_resolves_its_cells_at_once_by_its_own_gpu(monkeypatch, capsys):
    """On SLURM the node's GPU is known only in the job: auto packs by it there, and a number that does not fit
    is lowered (the job's log says so); CPU cells take the number as it is."""
    from hydra_plugins.tinyablate import submit
    from tinyablate.config import CellSpec, ModelConfig
    from tinyablate.cost import cell_memory_bytes

    spec = CellSpec(model=ModelConfig(name="smollm2-135m"), gpus=1)
    monkeypatch.setattr(submit, "local_gpu_bytes", lambda: 20 * cell_memory_bytes(spec))
    monkeypatch.setattr(submit, "cores", lambda: 64)
    gpu_cells = [spec] * 30
    assert submit.job_cells_at_once("auto", gpu_cells) == 12  # 0.9 x 20 / 1.5, as the local launcher
    assert submit.job_cells_at_once("auto", gpu_cells[:5]) == 5
    assert submit.job_cells_at_once(4, gpu_cells) == 4
    assert submit.job_cells_at_once(16, gpu_cells) == 12
    assert "cells_per_gpu=16: only 12 of these cells fit in this job's GPU" in capsys.readouterr().out
    monkeypatch.setattr(submit, "cores", lambda: 8)
    assert submit.job_cells_at_once("auto", gpu_cells) == 8  # one per CPU of the job
    cpu_cells = [CellSpec(gpus=0)] * 4
    assert submit.job_cells_at_once("auto", cpu_cells) == 1 and submit.job_cells_at_once(3, cpu_cells) == 3


def test_the_memory_model_grows_with_the_model_and_the_batch():
    from dataclasses import replace

    from tinyablate.config import AlgoConfig, CellSpec, ModelConfig
    from tinyablate.cost import cell_memory_bytes

    small = CellSpec(model=ModelConfig(name="smollm2-135m"), gpus=1)
    assert 2**30 < cell_memory_bytes(small) < 16 * 2**30
    big = replace(small, model=ModelConfig(name="qwen2.5-7b"))
    assert cell_memory_bytes(big) > 2 * 15e9  # 7.6 B bf16 weights, twice (model + engine's packed copies)
    wide = replace(small, algo=AlgoConfig(name="grpo", prompts_per_step=64, num_generations=8, micro_batch_size=64))
    assert cell_memory_bytes(wide) > cell_memory_bytes(small)


def test_the_cost_model_prices_packed_cells_by_the_measured_speedup():
    from types import SimpleNamespace as NS

    from hydra_plugins.tinyablate.plan import packed_lines
    from tinyablate.cost import packing_speedup

    assert packing_speedup(1) == 1.0 and packing_speedup(8) == 5.1 and packing_speedup(64) == 4.9
    assert 1.0 < packing_speedup(4) < 5.1  # between measured points: linear
    cells = [NS(spec=NS(gpus=1))] * 10 + [NS(spec=NS(gpus=2))]
    est = [NS(gpu_hours=0.51)] * 10 + [NS(gpu_hours=1.0)]
    assert packed_lines(cells, est, "h200", 1) == []
    (line,) = packed_lines(cells, est, "h200", 8)
    assert line.startswith("packed 8 cells per GPU (hydra.launcher.cells_per_gpu): about 2 GPU-hours in all (5.1x")


def fake_cell_worker(tasks, results, threads, started, parent):
    """A stand-in for pool.cell_worker (the same protocol, no training): a cell of seed 13 kills its worker, one of
    seed 130 ends it as Ctrl-C does (exit 130), others take 1.5 s and report when they ran."""
    import os
    import time

    while (task := tasks.get()) is not None:
        i, spec, _ = task
        results.put(("started", i, os.getpid()))
        if spec["seed"] in (13, 130):
            os._exit(3 if spec["seed"] == 13 else 130)
        t0 = time.time()
        time.sleep(1.5)
        summary = dict(cell_id=f"seed{spec['seed']}", status="completed", span=(t0, time.time()), pid=os.getpid())
        results.put(("done", i, {**summary, "threads": threads, "started": started, "parent": parent}))


def test_a_jobs_bundle_runs_cells_at_once_and_a_dead_worker_fails_only_its_cell(tmp_path):
    """SLURM's cells_per_gpu=N: a pool of N worker processes takes a bundle's cells from one queue; a worker that
    dies fails the cell it ran (a summary that says so) and a new worker finishes the rest."""
    import os
    from dataclasses import asdict

    from hydra_plugins.tinyablate.pool import run_pool
    from tinyablate.config import CellSpec

    seeds = [1, 2, 13, 4, 5]
    specs = [asdict(CellSpec(seed=s)) for s in seeds]
    out = run_pool(specs, [tmp_path / str(s) for s in seeds], workers=2, threads=3, worker=fake_cell_worker)
    assert [o["status"] for o in out] == ["completed", "completed", "failed", "completed", "completed"]
    assert "worker process died (exit code 3)" in out[2]["error"] and out[2]["cell_id"]
    done = [o for o in out if o["status"] == "completed"]
    assert {o["threads"] for o in done} == {3} and {o["parent"] for o in done} == {os.getpid()}
    assert len({o["pid"] for o in done}) >= 2  # more than one worker, one of them the dead one's replacement
    spans = sorted(o["span"] for o in done)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans  # two cells ran at the same time


def test_a_local_jobs_pool_stops_where_its_worker_died_and_ctrl_c_ends_it_with_130(tmp_path):
    """A local job: a pool of one worker, its cells one after another, the first timed from `started`. Its
    worker's death fails the cell it ran and leaves the rest unfinished, both naming how it died (what
    submit.job_end reads); a worker ended by Ctrl-C (exit 130) ends the job with 130."""
    import re
    from dataclasses import asdict

    from hydra_plugins.tinyablate.pool import run_pool
    from hydra_plugins.tinyablate.submit import DIED
    from tinyablate.config import CellSpec

    specs = [asdict(CellSpec(seed=s)) for s in (1, 13, 3)]
    out = run_pool(
        specs, [tmp_path / str(i) for i in range(3)], 1, started=12.5, replace_dead=False, worker=fake_cell_worker
    )
    assert [o["status"] for o in out] == ["completed", "failed", "failed"] and out[0]["started"] == 12.5
    assert "worker process died (exit code 3) before it finished" in out[1]["error"]
    assert "its job stopped when a worker process died (exit code 3)" in out[2]["error"]
    assert all(re.search(DIED, o["error"]).group(1) == "exit code 3" for o in out[1:])
    with pytest.raises(SystemExit) as stop:
        run_pool([asdict(CellSpec(seed=130))] * 2, [tmp_path / "a", tmp_path / "b"], 1, worker=fake_cell_worker)
    assert stop.value.code == 130


def test_the_launching_process_does_not_load_torch():
    """submit.py (what the launcher and each job's process import) loads torch only where a cell runs in it."""
    import subprocess
    import sys

    code = "import sys, hydra_plugins.tinyablate.submit; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
