"""Fault injection (`-m faults`): kill -9 a short cell at random points of training, evaluation, export
and result writing, re-run it after each kill, and check that nothing is lost, run twice or faked;
two launches of one cell and of one sweep at once; kill, then status; Ctrl-C to a local sweep (SIGINT to its
process group), then a re-run; a local bundle's process killed (the sweep names the job and fails).

The kills run through tests/fault_driver.py (forked attempts of the tiny random model, SFT, 6 steps: one epoch);
then a cell whose max_steps ends an epoch part way (SFT and GRPO) stopped after its final checkpoint (during
the final evaluation, the export) and with its result.json damaged.
The counts of the last run are printed (pytest -s) and written to <tmp>/fault_counts.json.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from tinyablate.cell_folder import CellFolder
from tinyablate.config import AdapterConfig, AlgoConfig, CellSpec, EvalConfig, LoggerConfig, ModelConfig, TaskConfig
from tinyablate.metrics import read_metrics

pytestmark = pytest.mark.faults
REPO = Path(__file__).resolve().parents[1]
STEPS = 6
LIVES = 4  # cell folders taken from empty to completed through ~10 kills each
ENV = {
    **os.environ,
    "WANDB_MODE": "disabled",
    "TQDM_DISABLE": "1",
    "PYTHONPATH": str(REPO),
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def fault_spec(root: Path) -> CellSpec:
    """The fastest real cell: tiny random Qwen2, TinyLoRA, SFT, a checkpoint every step."""
    return CellSpec(
        model=ModelConfig(name="tiny-qwen2", cache_dir=str(root / "cache")),
        adapter=AdapterConfig(kind="tinylora", r=2, u=3, tie=2),
        task=TaskConfig(name="arithmetic", max_value=9, train_size=24, eval_size=8, scorer="flexible"),
        algo=AlgoConfig(
            name="sft",
            max_steps=STEPS,
            learning_rate=1e-2,
            prompts_per_step=4,
            micro_batch_size=2,
            max_length=96,
            save_steps=1,
        ),
        eval=EvalConfig(batch_size=4, max_new_tokens=8),  # 2 generation batches per evaluation
        logger=LoggerConfig(mode="disabled"),
        output_dir=str(root / "runs"),
        sweep="faults",
    )


def kill_plan(rng: random.Random) -> list:
    """One lifetime's kills, in the order a cell meets them: a random moment early on, training (a step's
    end, a checkpoint half written, a checkpoint just complete), then evaluation, export and result
    writing in a random order (each re-run repeats them: training is done)."""
    s1, s2 = rng.choice([2, 3]), rng.choice([4, 5])
    moment = lambda: ["random", round(rng.uniform(0.05, 0.6), 2)]  # noqa: E731 (a whole cell takes ~1.5 s)
    train = [
        moment(),
        [rng.choice(["train_step", "train_save"]), s1],
        moment(),
        ["ckpt_write", rng.choice([1, 2])],
        [rng.choice(["train_step", "train_save"]), s2],
    ]
    after = [["eval", 1], ["eval", 2], ["export", None], ["result_write", None]]
    rng.shuffle(after)
    return train + after


def can_land(a: dict, before: dict) -> bool:
    """Whether attempt `a`'s planned kill point is still ahead of the cell after the attempt `before`: a
    random kill can come late (past the step or checkpoint a later planned kill waits for, or past the end)."""
    done = max(before["checkpoints"], default=0)  # the attempt resumes from here
    if before["state"] == "completed":
        return False
    if a["point"] in ("train_step", "train_save"):
        return a["arg"] > done
    if a["point"] == "ckpt_write":
        return done < STEPS
    return True


def run_driver(tmp_path: Path, lifetimes: list) -> list:
    """The attempts of every lifetime, run by tests/fault_driver.py: one record per attempt (attempts.jsonl)."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"lifetimes": lifetimes}))
    out = subprocess.run(
        [sys.executable, str(REPO / "tests" / "fault_driver.py"), str(plan)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"')]
    assert records[-1] == {"done": True}, out.stderr[-4000:]
    (tmp_path / "attempts.jsonl").write_text("".join(json.dumps(a) + "\n" for a in records[:-1]))
    return records[:-1]


def vectors(folder: CellFolder) -> dict:
    return load_file(str(folder.file("adapter_native") / "vectors.safetensors"))


def test_kills_at_random_points_then_one_valid_result_equal_to_an_uninterrupted_run(tmp_path):
    rng = random.Random(int(os.environ.get("TINYABLATE_FAULT_SEED", "13")))
    lifetimes = [{"spec": asdict(fault_spec(tmp_path / "reference")), "attempts": []}]
    lifetimes += [{"spec": asdict(fault_spec(tmp_path / f"life{i}")), "attempts": kill_plan(rng)} for i in range(LIVES)]
    t0 = time.time()
    attempts = run_driver(tmp_path, lifetimes)

    kills = [a for a in attempts if a["outcome"] == "killed"]
    for before, a in zip([None] + attempts, attempts):
        if a["point"] not in ("random", "none") and can_land(a, before):
            assert a["outcome"] == "killed", a  # every planned kill landed where it was planned
        if a["outcome"] == "killed":  # a kill leaves no result (never a fake or torn one) and reads interrupted
            started = a["state"] == "interrupted" or (a["state"] == "pending" and not a["checkpoints"])  # (killed
            assert a["result"] is None and started and a["holder"] is None, a  # before it wrote running.json)
        if a["point"] == "result_write" and a["outcome"] == "killed":
            assert a["tmp_files"], a  # the kill did leave a temp file behind ...
        if a["point"] == "none":  # ... which the re-run removed; each lifetime ends completed, once
            assert a["outcome"] == "exit 0" and a["state"] == a["result"] == "completed" and not a["tmp_files"], a
    assert len(kills) >= 20, [(a["point"], a["outcome"]) for a in attempts]

    reference = CellFolder.of(fault_spec(tmp_path / "reference"))
    v_ref = vectors(reference)
    for i in range(LIVES):
        folder = CellFolder.of(fault_spec(tmp_path / f"life{i}"))
        result = folder.read_result()
        assert result.completed and result.metrics.train_steps == STEPS and result.metrics.n_eval == 8
        assert sorted(p.name for p in folder.path.glob("result*.json")) == ["result.json"]  # exactly one
        v = vectors(folder)
        assert v.keys() == v_ref.keys() and all((v[k] == v_ref[k]).all() for k in v), f"lifetime {i}: v differs"
        assert result.metrics.accuracy == reference.read_result().metrics.accuracy
        losses = [r["step"] for r in read_metrics(folder.path) if "train/loss" in r]
        assert losses == list(range(1, STEPS + 1)), losses  # each step once, after every resume
        assert not list(folder.path.glob(".*.tmp"))

    where = collections.Counter(a["point"] for a in kills)
    counts = {
        "kills": len(kills),
        "where": dict(where),
        "attempts": len(attempts),
        "outcomes": dict(collections.Counter(a["outcome"] for a in attempts)),
        "random_kills_landed_with_checkpoints": [a["checkpoints"] for a in kills if a["point"] == "random"],
        "seconds": round(time.time() - t0, 1),
    }
    (tmp_path / "fault_counts.json").write_text(json.dumps(counts, indent=1))
    print("fault counts:", json.dumps(counts))


# -- stopped after the final checkpoint ----------------------------------------------------------------
MID_EPOCH = 4  # steps, of 6 an epoch (24 problems, 4 a step): resumed from checkpoint-4, TRL took a 5th step
AFTER_FINAL = [
    ["train_save", MID_EPOCH],  # the final checkpoint just complete
    ["eval", 1],  # during the final evaluation (the base's is cached by then)
    ["export", None],
    ["none", None],  # completed
    ["damaged_result", ["eval", 1]],  # result.json damaged, and the retry stopped during its evaluation,
    ["damaged_result", ["export", None]],  # during its export,
    ["damaged_result", ["result_write", None]],  # writing its result,
    ["damaged_result", ["none", None]],  # or not at all
]


def mid_epoch_spec(root: Path, algo: str) -> CellSpec:
    """fault_spec's cell trained by `algo` for MID_EPOCH steps, which end an epoch part way."""
    spec = fault_spec(root)
    grpo = dict(num_generations=2, max_completion_length=8) if algo == "grpo" else {}
    return replace(spec, algo=replace(spec.algo, name=algo, max_steps=MID_EPOCH, **grpo))


@pytest.mark.parametrize("algo", ["sft", "grpo"])
def test_stopped_after_its_final_checkpoint_a_cell_completes_with_max_steps(tmp_path, algo):
    lifetimes = [
        {"spec": asdict(mid_epoch_spec(tmp_path / "reference", algo)), "attempts": []},
        {"spec": asdict(mid_epoch_spec(tmp_path / "stopped", algo)), "attempts": AFTER_FINAL},
    ]
    attempts = [a for a in run_driver(tmp_path, lifetimes) if a["lifetime"] == 1]
    completed_outputs = None
    for a in attempts:
        kill = a["arg"][0] if a["point"] == "damaged_result" else a["point"]
        assert max(a["checkpoints"]) == MID_EPOCH, a  # never trained past algo.max_steps
        assert a["outcome"] == ("exit 0" if kill == "none" else "killed"), a
        assert a["result"] == ("completed" if kill == "none" else None), a
        assert bool(a["tmp_files"]) == (kill == "result_write"), a  # what a killed write left, the next removed
        if a["point"] == "damaged_result" and kill in ("eval", "export"):
            assert a["outputs"] == completed_outputs, a  # a retry left the completed attempt's outputs alone
        if kill == "none":
            completed_outputs = a["outputs"]
    assert len(completed_outputs) >= 3, completed_outputs  # eval_samples.jsonl, adapter/*, adapter_native/*

    reference, folder = (CellFolder.of(mid_epoch_spec(tmp_path / w, algo)) for w in ("reference", "stopped"))
    result, v_ref, v = folder.read_result(), vectors(reference), vectors(folder)
    assert result.completed and result.metrics.train_steps == result.algo.steps == MID_EPOCH
    assert result.metrics.resumed_from_step == MID_EPOCH  # evaluated and exported again, not trained
    assert v.keys() == v_ref.keys() and all((v[k] == v_ref[k]).all() for k in v), "v differs"
    assert result.metrics.accuracy == reference.read_result().metrics.accuracy
    assert loss_steps(folder.path) == list(range(1, MID_EPOCH + 1))  # each step once
    damaged = sum(a["point"] == "damaged_result" for a in attempts)
    assert len(list(folder.path.glob("result.unreadable-*.json"))) == damaged  # each kept aside, none lost


# -- two launches at once, and status after a kill -----------------------------------------------
TINY = [
    "model=tiny-qwen2",
    "task.max_value=9",
    "task.train_size=24",
    "task.eval_size=8",
    "algo=sft",
    "algo.max_steps=4",
    "algo.prompts_per_step=4",
    "algo.micro_batch_size=2",
    "algo.max_length=96",
    "algo.save_steps=1",
    "eval.max_new_tokens=8",
    "eval.batch_size=8",
    "logger=disabled",
]


def start(args: list, tmp_path: Path, log: str, session: bool = False) -> subprocess.Popen:
    """launch.py with `args`, its output in tmp_path/log; `session`: in a session (and process group) of its own."""
    env = {**ENV, "TINYABLATE_CACHE": str(tmp_path / "cache")}
    return subprocess.Popen(
        [sys.executable, str(REPO / "launch.py"), *args],
        cwd=tmp_path,
        env=env,
        stdout=open(tmp_path / log, "w"),
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=session,
    )


def wait_until(condition, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)


def session_processes(sid: int) -> list:
    """The processes still alive in session `sid` (a launcher started with session=True, and its children)."""
    alive = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.cmdline())
    return alive


def loss_steps(cell_dir: Path) -> list:
    return [r["step"] for r in read_metrics(cell_dir) if "train/loss" in r]


def test_one_cell_launched_twice_at_once_runs_once(tmp_path):
    args = [*TINY, "algo.max_steps=30", f"output_dir={tmp_path / 'runs'}", "sweep=twice"]
    first, second = start(args, tmp_path, "a.log"), start(args, tmp_path, "b.log")
    codes = sorted([first.wait(timeout=600), second.wait(timeout=600)])
    logs = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    # one trained it (the console ends training with "trained to step N"); the other was refused by the lock
    # (exit 2, one line) or, come later, found it completed
    assert codes in ([0, 2], [0, 0]) and logs.count("trained to step") == 1 and "Traceback" not in logs, logs[-4000:]
    [cell] = [p.parent for p in (tmp_path / "runs" / "twice").glob("*/result.json")]
    assert CellFolder(cell).read_result().completed and loss_steps(cell) == list(range(1, 31))

    # a launch while a live process holds the cell (here: this test) is refused at once, without a traceback
    busy = CellFolder(tmp_path / "runs" / "busy" / cell.name)
    with busy.locked():
        busy.mark_running(1)
        second = start([*args[:-1], "sweep=busy"], tmp_path, "c.log")
        code, log = second.wait(timeout=300), (tmp_path / "c.log").read_text()
    assert code == 2 and f"is already being run by process {os.getpid()}" in log and "Traceback" not in log, log
    assert not busy.has_result() and busy.state() == "interrupted"  # the refused launch wrote nothing


def test_one_sweep_launched_twice_at_once_runs_each_cell_once(tmp_path):
    args = [
        "-m",
        *TINY,
        "algo.max_steps=30",
        f"output_dir={tmp_path / 'runs'}",
        "sweep=twice",
        "adapter.u=1,2",
        "hydra.launcher.max_parallel=2",
        "hydra.launcher.poll_s=0.5",
    ]
    first, second = start(args, tmp_path, "a.log"), start(args, tmp_path, "b.log")
    first.wait(timeout=600), second.wait(timeout=600)
    logs = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    cells = sorted(p.parent for p in (tmp_path / "runs" / "twice").glob("*/spec.json"))
    assert len(cells) == 2, logs[-4000:]
    for cell in cells:  # each cell completed by one process: every step logged once
        assert CellFolder(cell).read_result().completed, logs[-4000:]
        assert loss_steps(cell) == list(range(1, 31)), logs[-4000:]
    trained = sum(
        p.read_text().count("trained to step") for p in (tmp_path / "runs" / "twice" / ".submitit").rglob("*_log.*")
    )
    assert trained == 2, logs[
        -4000:
    ]  # a cell started by both launchers was trained by one (the lock refused the other)


def test_kill_then_status_says_interrupted(tmp_path):
    runs = tmp_path / "runs"
    args = [*TINY, "algo.max_steps=400", f"output_dir={runs}", "sweep=killed"]  # ~25 s: it is killed long before
    proc = start(args, tmp_path, "a.log")
    deadline = time.time() + 300
    while time.time() < deadline and not list(runs.glob("killed/*/checkpoints/checkpoint-*/trainer_state.json")):
        assert proc.poll() is None, (tmp_path / "a.log").read_text()[-3000:]
        time.sleep(0.2)
    [cell] = [p.parent for p in runs.glob("killed/*/spec.json")]
    status = subprocess.run(
        [sys.executable, "-m", "tinyablate.status", str(runs / "killed")], env=ENV, capture_output=True, text=True
    )
    assert status.returncode == 0 and status.stdout.split()[5] == "running", status.stdout
    proc.kill()
    proc.wait()
    status = subprocess.run(
        [sys.executable, "-m", "tinyablate.status", str(runs / "killed")], env=ENV, capture_output=True, text=True
    )
    assert status.stdout.split()[5] == "interrupted", status.stdout
    assert CellFolder(cell).state() == "interrupted" and "1 cells: 1 interrupted" in status.stdout


def test_ctrl_c_stops_a_local_sweep_with_one_line_and_the_rerun_resumes(tmp_path):
    runs, steps = tmp_path / "runs", 200
    args = ["-m", *TINY, f"algo.max_steps={steps}", f"output_dir={runs}", "sweep=ctrlc", "adapter.u=1,2"]
    args += ["hydra.launcher.max_parallel=2", "hydra.launcher.poll_s=0.5"]
    proc = start(args, tmp_path, "a.log", session=True)
    checkpointed = lambda: len({p.parents[2] for p in runs.glob("ctrlc/*/checkpoints/*/trainer_state.json")}) == 2  # noqa: E731
    wait_until(checkpointed, proc, tmp_path / "a.log")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the launcher's whole process group
    code, log = proc.wait(timeout=120), (tmp_path / "a.log").read_text()
    assert code == 130 and "Traceback" not in log and "KeyboardInterrupt" not in log, log[-4000:]
    assert len([line for line in log.splitlines() if line.startswith("interrupted (Ctrl-C)")]) == 1, log[-4000:]
    assert session_processes(proc.pid) == []  # nothing left running
    cells = sorted(p.parent for p in runs.glob("ctrlc/*/spec.json"))
    assert [CellFolder(c).state() for c in cells] == ["interrupted", "interrupted"], log[-4000:]
    assert log.count("  [resumes from checkpoint-") == 2, log[-4000:]  # the status table says from where

    rerun = start(args, tmp_path, "b.log")
    assert rerun.wait(timeout=600) == 0, (tmp_path / "b.log").read_text()[-4000:]
    for cell in cells:
        result = CellFolder(cell).read_result()
        assert result.completed and result.metrics.resumed_from_step >= 1  # resumed, not started over
        assert loss_steps(cell) == list(range(1, steps + 1))


@pytest.mark.parametrize("killed", ["cells", "job"])
def test_a_bundle_whose_process_died_is_reported_and_fails_the_sweep(tmp_path, killed):
    """kill -9 of the process running a local bundle's cells (a forked child of the job's process, which reports
    the signal), or of the job's process itself (the child dies with it: nothing is left running)."""
    runs = tmp_path / "runs"
    args = ["-m", *TINY, "algo.max_steps=60", f"output_dir={runs}", "sweep=dead", "adapter.u=1,2,3"]
    args += ["hydra.launcher.cells_per_job=3", "hydra.launcher.poll_s=0.5"]
    proc = start(args, tmp_path, "a.log", session=True)

    def second_cell():  # the bundle's second cell, once the first has completed and it has a checkpoint
        completed = {p.parent for p in runs.glob("dead/*/result.json")}
        started = {p.parents[2] for p in runs.glob("dead/*/checkpoints/*/trainer_state.json")} - completed
        return next(iter(started)) if completed and started else None

    wait_until(second_cell, proc, tmp_path / "a.log")
    holder = json.loads((second_cell() / "cell.lock").read_text())["pid"]  # the process running the bundle
    os.kill(holder if killed == "cells" else psutil.Process(holder).ppid(), signal.SIGKILL)
    code, log = proc.wait(timeout=300), (tmp_path / "a.log").read_text()
    assert code == 1 and "Traceback" not in log, log[-4000:]
    [line] = [line for line in log.splitlines() if line.startswith("job ")]
    how = "died (killed by SIGKILL)" if killed == "cells" else "its process ended without a result (killed"
    assert f"lost its cells: {how}" in line or f"running its cells {how}" in line, line
    assert "2 of its cells did not finish" in line and "(interrupted)" in line and "(pending)" in line, line
    assert "1 completed, 1 interrupted, 1 pending" in log and session_processes(proc.pid) == [], log[-3000:]


FULL_DISK = """
mount -t tmpfs -o size=120k tmpfs "$DISK" || exit 97
"$PY" launch.py "$@" output_dir="$DISK/runs" sweep=full > "$OUT/cell.log" 2>&1; echo $? > "$OUT/cell.code"
"$PY" -m tinyablate.status "$DISK/runs/full" > "$OUT/status.log" 2>&1; echo $? > "$OUT/status.code"
head -c 1M /dev/zero > "$DISK/filler" 2>/dev/null
"$PY" launch.py -m "$@" output_dir="$DISK/runs" sweep=full status=true > "$OUT/probe.log" 2>&1; echo $? > "$OUT/probe.code"
"""


def in_tmpfs(script: str, args: list, tmp_path: Path) -> dict:
    """`script` in a mount namespace of its own (a 120 KB tmpfs at $DISK, gone with it); what it wrote to $OUT, by
    name. Skipped where this machine does not let this user mount one."""
    unshare = ["unshare", "--mount"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--mount"]
    probe = subprocess.run([*unshare, "sh", "-c", f"mount -t tmpfs -o size=8k tmpfs {tmp_path}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no small tmpfs here: {' '.join(unshare)} + mount failed ({probe.stderr.decode().strip()[:200]})")
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir(), out.mkdir()
    env = {**ENV, "DISK": str(disk), "OUT": str(out), "PY": sys.executable, "TINYABLATE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([*unshare, "bash", "-c", script, "bash", *args], cwd=REPO, env=env, timeout=600)
    assert done.returncode == 0, done
    return {p.name: p.read_text() for p in out.iterdir()}


def test_a_full_disk_fails_the_cell_in_one_line_that_names_it_and_the_state_survives(tmp_path):
    out = in_tmpfs(FULL_DISK, [*TINY, "algo.max_steps=30"], tmp_path)
    log = out["cell.log"]
    assert out["cell.code"].strip() == "1" and "Traceback" not in log, log[-3000:]
    [line] = [line for line in log.splitlines() if "No space left on device" in line]
    assert line.startswith("cell failed: the disk holding ") and "/runs/full/" in line and " is full " in line
    # the failed result was written (into the space the cell held back), so the state is failed, not pending
    assert out["status.code"].strip() == "1" and "1 cells: 1 failed" in out["status.log"], out["status.log"]
    assert "DiskFull: the disk holding" in out["status.log"]
    # a launch on the full disk is refused before Hydra writes there: one line, exit 2
    probe = out["probe.log"]
    assert out["probe.code"].strip() == "2" and "Traceback" not in probe, probe[-3000:]
    assert [line for line in probe.splitlines() if "is full" in line][0].strip().startswith("output_dir=")


def test_ctrl_c_stops_one_cell_with_one_line_and_it_reads_interrupted(tmp_path):
    runs = tmp_path / "runs"
    proc = start([*TINY, "algo.max_steps=400", f"output_dir={runs}", "sweep=one"], tmp_path, "a.log", session=True)
    wait_until(lambda: list(runs.glob("one/*/checkpoints/*/trainer_state.json")), proc, tmp_path / "a.log")
    os.killpg(proc.pid, signal.SIGINT)
    code, log = proc.wait(timeout=120), (tmp_path / "a.log").read_text()
    assert code == 130 and "Traceback" not in log and log.count("interrupted (Ctrl-C)") == 1, log[-3000:]
    [cell] = [p.parent for p in runs.glob("one/*/spec.json")]
    assert CellFolder(cell).state() == "interrupted"
