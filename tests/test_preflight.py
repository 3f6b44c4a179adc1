"""The checks a single cell and a sweep share before any weight loads (tinyablate/preflight.py), and
how a failing single cell reports: one message, no traceback, non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinyablate.config import AdapterConfig, CellSpec, ConfigError, LoggerConfig, ModelConfig, TaskConfig
from tinyablate.preflight import preflight

REPO = Path(__file__).resolve().parents[1]
ROW = {"question": "1+1?", "answer": "one and one\n#### 2"}


def gsm8k_dir(tmp_path: Path, train_rows=3, test_rows=3, broken_line=None) -> Path:
    data = tmp_path / "gsm8k"
    data.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train_rows), ("test", test_rows)):
        lines = [json.dumps(ROW)] * n
        if broken_line is not None and split == "train":
            lines[broken_line - 1] = '{"question": "x", "answer": '  # cut short
        (data / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
    return data


def spec(**kw) -> CellSpec:
    s = CellSpec(
        model=ModelConfig(name="tiny-qwen2"),
        adapter=AdapterConfig(kind="tinylora", r=2, u=3, tie=2),
        task=TaskConfig(name="arithmetic", max_value=9, train_size=8, eval_size=4),
    )
    for key, value in kw.items():
        section, _, name = key.partition("__")
        setattr(getattr(s, section), name, value) if name else setattr(s, section, value)
    return s


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(adapter__r=65), "adapter.r=65"),
        (dict(adapter__target_modules=["foo_proj"]), "foo_proj"),
        (dict(adapter__layers=[99]), "adapter.layers: [99] are not layers of this model"),
        (dict(seed=-1), "seed=-1 is invalid: expected an integer >= 0 below 2**32"),
        (dict(model__path="/nonexistent/model"), "model.path='/nonexistent/model' is invalid"),
        (dict(logger=LoggerConfig(mode="online")), "logger.mode='online' has no W&B API key"),
    ],
)
def test_what_used_to_fail_after_loading_is_found_before(change, expected, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(ConfigError) as err:
        preflight(spec(**change))
    assert any(expected in p for p in err.value.problems), err.value.problems


def test_every_problem_at_once_and_a_valid_cell_gets_its_size(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(ConfigError) as err:
        preflight(spec(seed=-1, adapter__layers=[99], logger=LoggerConfig(mode="online")))
    assert len(err.value.problems) == 3
    assert preflight(spec()) == (21, 84)
    key = tmp_path / "key"
    key.write_text("x" * 40 + "\n")
    assert preflight(spec(logger=LoggerConfig(mode="online", api_key_file=str(key)))) == (21, 84)
    with pytest.raises(ConfigError, match="logger.api_key_file="):
        preflight(spec(logger=LoggerConfig(mode="online", api_key_file=str(tmp_path / "missing"))))


def test_data_files_exist_parse_are_non_empty_and_errors_name_file_and_line(tmp_path):
    assert preflight(spec(task=TaskConfig(name="gsm8k", data_dir=str(gsm8k_dir(tmp_path))))) == (21, 84)
    with pytest.raises(ConfigError, match=r"train.jsonl:10: not valid JSON"):
        preflight(spec(task=TaskConfig(name="gsm8k", data_dir=str(gsm8k_dir(tmp_path, 12, 3, broken_line=10)))))
    with pytest.raises(ConfigError) as err:  # with a train_size too, the bad line is said once
        preflight(spec(task=TaskConfig(name="gsm8k", data_dir=str(tmp_path / "gsm8k"), train_size=5)))
    assert len(err.value.problems) == 1 and "train.jsonl:10: not valid JSON" in err.value.problems[0], err.value
    (tmp_path / "e").mkdir()
    empty = gsm8k_dir(tmp_path / "e", 0, 0)
    with pytest.raises(ConfigError) as err:  # was a "completed" cell with n_eval=0 and 0 steps
        preflight(spec(task=TaskConfig(name="gsm8k", data_dir=str(empty))))
    assert [p.split(" (")[0] for p in err.value.problems] == [
        "task data: no training problems",
        "task data: no evaluation problems",
    ]
    with pytest.raises(ConfigError) as err:  # a train_size asked of an empty file: both splits named
        preflight(spec(task=TaskConfig(name="gsm8k", data_dir=str(empty), train_size=40)))
    assert len(err.value.problems) == 2, err.value.problems
    assert "task.train_size=40 is invalid" in err.value.problems[0]
    assert (
        err.value.problems[1].startswith("task data: no evaluation problems") and "test file" in err.value.problems[1]
    )
    bad_answer = tmp_path / "b"
    gsm8k_dir(bad_answer)
    (bad_answer / "gsm8k" / "test.jsonl").write_text(
        json.dumps(ROW) + "\n" + json.dumps({"question": "q", "answer": "7"}) + "\n"
    )
    with pytest.raises(ConfigError, match=r"test.jsonl:2: the answer does not end in '#### <number>'"):
        preflight(spec(task=TaskConfig(name="gsm8k", data_dir=str(bad_answer / "gsm8k"))))
    with pytest.raises(ConfigError, match="is not a folder"):
        preflight(spec(task=TaskConfig(name="gsm8k", data_dir=str(tmp_path / "missing"))))


def launch(args, tmp_path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "TQDM_DISABLE": "1",
        "HF_HUB_OFFLINE": "1",
        "TINYABLATE_CACHE": str(tmp_path / "cache"),
    }
    return subprocess.run(
        [sys.executable, str(REPO / "launch.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_single_cell_errors_are_one_message_without_traceback(tmp_path):
    data = gsm8k_dir(tmp_path, 12, 3, broken_line=10)
    t0 = time.time()
    out = launch(
        [
            "model=tiny-qwen2",
            "task=gsm8k",
            f"task.data_dir={data}",
            "adapter.layers=[99]",
            "seed=-1",
            f"output_dir={tmp_path / 'runs'}",
        ],
        tmp_path,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr + out.stdout and "Error executing job" not in out.stderr
    assert out.stderr.splitlines()[0] == "invalid cell, nothing was run:"
    assert "train.jsonl:10: not valid JSON" in out.stderr and "adapter.layers" in out.stderr and "seed=-1" in out.stderr
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [".hydra"]  # no cell folder: nothing started
    # a sweep's dry run finds the same, from the same function
    dry = launch(
        [
            "-m",
            "sweeps=embedded",
            "model=tiny-qwen2",
            "task=gsm8k",
            f"task.data_dir={data}",
            "dry_run=true",
            f"output_dir={tmp_path / 'runs'}",
        ],
        tmp_path,
    )
    assert dry.returncode == 2 and "train.jsonl:10: not valid JSON" in dry.stdout, dry.stdout + dry.stderr
    assert time.time() - t0 < 120


def test_launcher_edge_cases_say_what_to_change(tmp_path):
    out = launch(["-m", "sweeps=null", "dry_run=true"], tmp_path)
    assert out.returncode == 1 and "sweeps=null is invalid" in out.stderr and "Traceback" not in out.stderr
    out = launch(["-m", "adapter.u=range(1,1)", "dry_run=true", f"output_dir={tmp_path}"], tmp_path)
    assert out.returncode == 2 and "the sweep has 0 cells" in out.stdout and "Traceback" not in out.stderr
    out = launch(["-m", "hydra.launcher.max_parallel=0", "dry_run=true", f"output_dir={tmp_path}"], tmp_path)
    assert out.returncode == 2 and "hydra.launcher.max_parallel=0 is invalid: expected an integer >= 1" in out.stdout


@pytest.mark.parametrize("where", ["file", "proc"])
def test_an_unwritable_output_dir_is_one_line_naming_it(tmp_path, where):
    (tmp_path / "a-file").write_text("")
    output_dir = tmp_path / "a-file" / "runs" if where == "file" else Path("/proc/tinyablate/runs")
    for args in ([f"output_dir={output_dir}"], ["-m", f"output_dir={output_dir}", "dry_run=true"]):
        out = launch(args, tmp_path)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "Traceback" not in out.stderr and f"output_dir='{output_dir}' is invalid" in out.stderr, out.stderr
    with pytest.raises(ConfigError, match="output_dir="):
        preflight(spec(output_dir=str(output_dir)))
