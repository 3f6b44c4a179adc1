"""The cell folder: the typed, versioned result schema, its checks, the folder's state and records."""

from __future__ import annotations

import json

import pytest

from tinyablate.cell_folder import (
    SCHEMA_VERSION,
    AdapterRecord,
    AlgoRecord,
    CellFolder,
    ErrorRecord,
    Metrics,
    ModelRecord,
    Result,
    ResultError,
    TaskRecord,
    Timing,
    last_complete_checkpoint,
    sweep_cell_folders,
)
from tinyablate.config import CellSpec, cell_id


def completed(cid="cell-1") -> Result:
    return Result(
        cell_id=cid,
        status="completed",
        sweep="s",
        config={"seed": 0},
        model=ModelRecord(name="tiny-qwen2", family="qwen2", size="0.16M", n_params=156_224, model_id="random:1"),
        adapter=AdapterRecord(
            trainable_params=13,
            kind="tinylora",
            r=2,
            u=13,
            tie="all",
            sharing="tiled",
            precision="fp32",
            trainable_bytes=52,
            n_modules=14,
            n_groups=1,
        ),
        algo=AlgoRecord(name="grpo", learning_rate=1e-5, steps=4),
        task=TaskRecord(name="arithmetic", scorer="strict"),
        metrics=Metrics(
            accuracy=0.5,
            accuracy_strict=0.5,
            accuracy_flexible=0.6,
            n_eval=8,
            base_accuracy=None,
            reward={"first": 0.1, "last": 0.4, "mean_last10": 0.3, "max": 0.5},
            train_steps=4,
        ),
        timing=Timing(wall_s=3.0, train_s=1.0, n_gpus=0, world_size=1, gpu_hours=0.0),
        provenance={"git": {}},
    )


def test_a_result_round_trips_through_its_folder(tmp_path):
    folder = CellFolder(tmp_path / "cell")
    assert folder.read_result() is None and folder.state() == "pending"
    folder.write_result(completed())
    raw = json.loads((tmp_path / "cell" / "result.json").read_text())
    assert list(raw)[:3] == ["schema_version", "cell_id", "status"] and raw["schema_version"] == SCHEMA_VERSION
    assert raw["metrics"]["base_accuracy"] is None  # a None metric is written as null, not dropped
    assert "error" not in raw and "start_to_first_step_s" not in raw["timing"]  # absent sections stay absent
    back = folder.read_result()
    assert back == completed() and back.to_dict() == raw and folder.state() == "completed"


def test_a_version_1_result_reads_as_its_training_task_alone():
    raw = {**completed().to_dict(), "schema_version": 1}
    raw["metrics"]["base_accuracy"] = 0.25
    result = Result.parse(raw)
    [(name, m)] = result.task_metrics().items()
    assert name == result.task.name and m.accuracy == result.metrics.accuracy and m.trained_on
    assert m.delta == pytest.approx(result.metrics.accuracy - result.metrics.base_accuracy)


def test_fields_written_by_another_version_are_kept(tmp_path):
    raw = {**completed().to_dict(), "note": "from the future"}
    raw["metrics"]["pass_at_k"] = 0.9
    result = Result.parse(raw)
    assert result.to_dict() == raw


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda r: r["metrics"].pop("accuracy"), "metrics.accuracy is missing"),
        (lambda r: r["metrics"].update(accuracy="high"), "metrics.accuracy='high' is not a float"),
        (lambda r: r["adapter"].update(trainable_params=True), "adapter.trainable_params=True is not an int"),
        (lambda r: r.pop("metrics"), "a completed result lacks metrics"),
        (lambda r: r.update(status="done"), "unknown status 'done'"),
        (lambda r: r.update(schema_version=3), "has schema_version 3 (expected one of"),
        (
            lambda r: r["metrics"].update(tasks={"mmlu_cs": {"scorer": "acc"}}),
            "metrics.tasks.mmlu_cs.accuracy is missing",
        ),
        (lambda r: r.pop("cell_id"), "no status/cell_id"),
    ],
)
def test_a_result_that_does_not_fit_the_schema_says_where(change, message):
    raw = completed().to_dict()
    change(raw)
    with pytest.raises(ResultError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Result.parse(raw)


def test_an_invalid_result_is_never_written(tmp_path):
    folder = CellFolder(tmp_path)
    with pytest.raises(ResultError, match="lacks error"):
        folder.write_result(Result(cell_id="x", status="failed", timing=Timing(wall_s=1.0)))
    assert not folder.has_result()


def test_state_running_failed_unreadable_and_a_retry(tmp_path):
    folder = CellFolder(tmp_path / "c")
    folder.path.mkdir()
    with folder.locked():
        folder.mark_running(1)
        assert folder.state() == "running" and folder.read_running()["world_size"] == 1
        folder.clear_running()
    folder.write_result(
        Result(cell_id="c", status="failed", error=ErrorRecord(type="E", message="boom"), timing=Timing(wall_s=1.0))
    )
    assert folder.state() == "failed" and folder.read_result().error.message == "boom"
    folder.move_result_aside("failed")
    assert folder.state() == "pending" and len(list(folder.path.glob("result.failed-*.json"))) == 1
    (folder.path / "result.json").write_text('{"cell_id": "c", "sta')
    assert folder.state() == "failed"
    with pytest.raises(ResultError, match="not valid JSON"):
        folder.read_result()
    folder.move_result_aside("unreadable")
    (folder.path / "result.json").write_text("{")
    folder.move_result_aside("unreadable")  # (within the same second, most likely: neither is lost)
    assert len(list(folder.path.glob("result.unreadable-*.json"))) == 2


def test_spec_and_launch_records_and_finding_cells(tmp_path):
    spec = CellSpec(output_dir=str(tmp_path), sweep="sw")
    folder = CellFolder.of(spec)
    assert folder.path == tmp_path / "sw" / cell_id(spec)
    folder.write_spec(spec)
    folder.write_launch("slurm", "123_4", "/o", "/e", ["launch.py", "-m"])
    assert folder.read_spec()["cell_id"] == cell_id(spec) and folder.read_launch()["job_id"] == "123_4"
    (tmp_path / "sw" / ".submitit").mkdir()
    assert sweep_cell_folders(tmp_path) == [folder] == sweep_cell_folders(tmp_path / "sw")


# -- issue 13: liveness, one process per cell, no fake success, file modes, temp files -------------------
HOLD = """
import sys, time
from tinyablate.cell_folder import CellFolder
folder = CellFolder(sys.argv[1])
with folder.locked():
    folder.mark_running(1)
    print("held", flush=True)
    time.sleep(120)
"""


def _holder_process(path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_killed_holder_reads_interrupted_and_a_live_one_running(tmp_path):
    """running.json alone says nothing: a dead process's cell is interrupted, not running forever."""
    import signal

    from tinyablate.cell_folder import CellBusy
    from tinyablate.status import cell_row, live_job

    folder = CellFolder(tmp_path / "c")
    proc = _holder_process(folder.path)
    try:
        assert folder.state() == "running" and f"process {proc.pid}" in folder.holder()
        assert live_job(folder.path) and cell_row(folder.path)["state"] == "running"
        with pytest.raises(CellBusy, match=f"process {proc.pid}"):  # a second runner is refused
            with folder.locked(wait_s=0.2):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert folder.read_running()["pid"] == proc.pid  # left behind by the kill
    assert folder.state() == "interrupted" and folder.holder() is None and live_job(folder.path) is None
    with folder.locked():  # the kernel released it with the process
        assert folder.state() == "running"


def test_every_cell_file_gets_one_mode_and_a_rerun_removes_temp_files(tmp_path):
    import os
    import stat

    folder = CellFolder(tmp_path / "c")
    folder.write_result(completed("c"))
    folder.write_spec(CellSpec())
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives a file under this umask (TRL, W&B and the logger use it)
    want = stat.S_IMODE(plain.stat().st_mode)
    assert {stat.S_IMODE((folder.path / n).stat().st_mode) for n in ("result.json", "spec.json")} == {want}
    (folder.path / ".result.json.abc123.tmp").write_text("{")
    assert [p.name for p in folder.remove_temp_files()] == [".result.json.abc123.tmp"]
    assert not list(folder.path.glob(".*.tmp")) and os.path.exists(folder.path / "result.json")


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(n_eval=0), "n_eval=0"),
        (dict(steps=0), "after 0 training steps, but algo.max_steps=4"),
    ],
)
def test_a_result_that_evaluated_nothing_or_trained_short_is_not_completed(tmp_path, change, match):
    result = completed()
    result.config = {"train": True, "algo": {"max_steps": 4}}
    if "n_eval" in change:
        result.metrics.n_eval = change["n_eval"]
    else:
        result.algo.steps = change["steps"]
    with pytest.raises(ResultError, match=match):
        CellFolder(tmp_path).write_result(result)
    result.config["train"] = False  # evaluating the initial adapter trains nothing, as asked
    if "steps" in change:
        CellFolder(tmp_path).write_result(result)


def test_staged_outputs_replace_the_earlier_ones_only_when_the_result_is_published(tmp_path):
    folder = CellFolder(tmp_path / "cell")
    folder.path.mkdir()
    (folder.file("adapter")).mkdir()
    folder.file("adapter/v").write_text("earlier")
    folder.file("eval_samples.jsonl").write_text("earlier")
    folder.staged("adapter").mkdir(parents=True)
    folder.staged("adapter/v").write_text("this attempt")
    folder.staged("eval_samples.jsonl").write_text("this attempt")
    bad = completed()
    bad.metrics.n_eval = 0
    with pytest.raises(ResultError):
        folder.publish(bad)  # a result that is not ready replaces nothing
    assert folder.file("adapter/v").read_text() == folder.file("eval_samples.jsonl").read_text() == "earlier"
    folder.publish(completed())
    assert folder.file("adapter/v").read_text() == folder.file("eval_samples.jsonl").read_text() == "this attempt"
    assert folder.read_result().completed and sorted(p.name for p in folder.path.glob(".*")) == []


def test_staged_outputs_of_a_killed_attempt_are_removed_by_the_next(tmp_path):
    folder = CellFolder(tmp_path / "cell")
    folder.staged("adapter").mkdir(parents=True)
    (folder.path / ".adapter.x.tmp").mkdir()  # a folder replace_path renamed aside, then killed
    assert len(folder.remove_temp_files()) == 2 and not list(folder.path.iterdir())


def test_the_last_checkpoint_is_complete_and_at_most_max_steps(tmp_path):
    folder = CellFolder(tmp_path / "cell")
    for step, files in ((2, 3), (4, 3), (5, 3), (6, 2)):  # 6: its trainer state not yet written
        ckpt = folder.file(f"checkpoints/checkpoint-{step}")
        ckpt.mkdir(parents=True)
        for name in ("adapter_state.safetensors", "rng_state.pth", "trainer_state.json")[:files]:
            (ckpt / name).write_text("x")
    checkpoints = folder.file("checkpoints")
    assert last_complete_checkpoint(checkpoints).name == "checkpoint-5"
    assert last_complete_checkpoint(checkpoints, max_step=4).name == "checkpoint-4"
    assert last_complete_checkpoint(checkpoints, max_step=1) is None
    assert folder.drop_checkpoints_past(4) == ["checkpoint-5", "checkpoint-6"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
