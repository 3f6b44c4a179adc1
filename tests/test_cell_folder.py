"""The cell folder: the typed, versioned result schema, its checks, the folder's state and records."""

from __future__ import annotations

import json

import pytest

from tinyablate.cell_folder import (SCHEMA_VERSION, AdapterRecord, AlgoRecord, CellFolder, ErrorRecord, Metrics,
                                    ModelRecord, Result, ResultError, TaskRecord, Timing, sweep_cell_folders)
from tinyablate.config import CellSpec, cell_id


def completed(cid="cell-1") -> Result:
    return Result(
        cell_id=cid, status="completed", sweep="s", config={"seed": 0},
        model=ModelRecord(name="tiny-qwen2", family="qwen2", size="0.16M", n_params=156_224, model_id="random:1"),
        adapter=AdapterRecord(trainable_params=13, kind="tinylora", r=2, u=13, tie="all", sharing="tiled",
                              precision="fp32", trainable_bytes=52, n_modules=14, n_groups=1),
        algo=AlgoRecord(name="grpo", learning_rate=1e-5, steps=4), task=TaskRecord(name="arithmetic", scorer="strict"),
        metrics=Metrics(accuracy=0.5, accuracy_strict=0.5, accuracy_flexible=0.6, n_eval=8, base_accuracy=None,
                        reward={"first": 0.1, "last": 0.4, "mean_last10": 0.3, "max": 0.5}, train_steps=4),
        timing=Timing(wall_s=3.0, train_s=1.0, n_gpus=0, world_size=1, gpu_hours=0.0), provenance={"git": {}})


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


def test_fields_written_by_another_version_are_kept(tmp_path):
    raw = {**completed().to_dict(), "note": "from the future"}
    raw["metrics"]["pass_at_k"] = 0.9
    result = Result.parse(raw)
    assert result.to_dict() == raw


@pytest.mark.parametrize("change,message", [
    (lambda r: r["metrics"].pop("accuracy"), "metrics.accuracy is missing"),
    (lambda r: r["metrics"].update(accuracy="high"), "metrics.accuracy='high' is not a float"),
    (lambda r: r["adapter"].update(trainable_params=True), "adapter.trainable_params=True is not an int"),
    (lambda r: r.pop("metrics"), "a completed result lacks metrics"),
    (lambda r: r.update(status="done"), "unknown status 'done'"),
    (lambda r: r.update(schema_version=2), "schema_version 2 (expected 1)"),
    (lambda r: r.pop("cell_id"), "no status/cell_id"),
])
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
    folder.mark_running(1)
    assert folder.state() == "running" and folder.read_running()["world_size"] == 1
    folder.clear_running()
    folder.write_result(Result(cell_id="c", status="failed", error=ErrorRecord(type="E", message="boom"),
                               timing=Timing(wall_s=1.0)))
    assert folder.state() == "failed" and folder.read_result().error.message == "boom"
    folder.move_result_aside("failed")
    assert folder.state() == "pending" and len(list(folder.path.glob("result.failed-*.json"))) == 1
    (folder.path / "result.json").write_text('{"cell_id": "c", "sta')
    assert folder.state() == "failed"
    with pytest.raises(ResultError, match="not valid JSON"):
        folder.read_result()


def test_spec_and_launch_records_and_finding_cells(tmp_path):
    spec = CellSpec(output_dir=str(tmp_path), sweep="sw")
    folder = CellFolder.of(spec)
    assert folder.path == tmp_path / "sw" / cell_id(spec)
    folder.write_spec(spec)
    folder.write_launch("slurm", "123_4", "/o", "/e", ["launch.py", "-m"])
    assert folder.read_spec()["cell_id"] == cell_id(spec) and folder.read_launch()["job_id"] == "123_4"
    (tmp_path / "sw" / ".submitit").mkdir()
    assert sweep_cell_folders(tmp_path) == [folder] == sweep_cell_folders(tmp_path / "sw")
