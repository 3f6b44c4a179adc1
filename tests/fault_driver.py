"""Fault injection for one cell: run it again and again, each attempt a forked child killed with SIGKILL
at a planned point, then once more to the end. Used by tests/test_faults.py.

    python tests/fault_driver.py PLAN.json      # one JSON line per attempt on stdout, then {"done": ...}

PLAN.json: {"lifetimes": [{"spec": <spec_to_dict>, "attempts": [[point, arg], ...]}, ...]}: each lifetime
is one cell folder taken from empty to completed; an attempt's point is
  random        SIGKILL from outside after `arg` seconds (wherever the child is)
  train_step    at the end of optimizer step `arg`, before its checkpoint
  train_save    right after checkpoint `arg` is complete
  ckpt_write    inside the `arg`-th torch.save of the attempt (a checkpoint half written)
  eval          after the `arg`-th generated batch of the attempt (base or final evaluation)
  export        after the PEFT export, before the native one
  result_write  with result.json's temp file written and synced, before the rename
  none          no kill: the attempt runs to its end
  damaged_result  result.json overwritten with garbage first, then the planned kill `arg` ([point, arg]; not
                random) or none
This process imports torch/transformers/TRL once and forks each attempt from it (no torch op runs
in it before the last fork), so 20+ kills cost seconds each, not a fresh interpreter each.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

import torch
from transformers import TrainerCallback

import tinyablate.cell as cell_module
import tinyablate.cell_folder as cell_folder
import tinyablate.evaluation.generation as generation_module
import tinyablate.files as files_module
from tinyablate.adapters.adapter import Adapter
from tinyablate.config import spec_from_dict


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt(TrainerCallback):
    def __init__(self, point: str, step: int):
        self.point, self.step = point, step

    def on_step_end(self, args, state, control, **kwargs):
        if self.point == "train_step" and state.global_step == self.step:
            die()

    def on_save(self, args, state, control, **kwargs):
        if self.point == "train_save" and state.global_step == self.step:
            die()


def nth_call_dies(module, name: str, n: int, before: bool) -> None:
    original, calls = getattr(module, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if before and calls[0] == n:
            die()
        out = original(*args, **kwargs)
        if not before and calls[0] == n:
            die()
        return out

    setattr(module, name, wrapper)


def arm(point: str, arg, spec) -> None:
    """Install the kill of `point` in this (child) process."""
    if point == "damaged_result":  # a completed result whose file was damaged (disk, hand): the cell re-runs
        cell_folder.CellFolder.of(spec).file(cell_folder.RESULT_FILE).write_text('{"status": "compl')
        arm(*arg, spec)
    elif point in ("train_step", "train_save"):
        train = cell_module.train  # cell's binding, where _run looks it up (defined in tinyablate.train.run)
        cell_module.train = lambda spec, built, cell_dir, callbacks: train(
            spec, built, cell_dir, [*callbacks, KillAt(point, int(arg))]
        )
    elif point == "ckpt_write":
        nth_call_dies(torch, "save", int(arg), before=True)
    elif point == "eval":  # generation evaluation's progress bar advances once per generated batch
        bar, n, done = generation_module.tqdm, int(arg), [0]

        class KillingBar(bar):
            def update(self, k=1):
                done[0] += 1
                if done[0] == n:
                    die()
                return super().update(k)

        generation_module.tqdm = KillingBar
    elif point == "export":
        Adapter.save_native = lambda self, out_dir: die()
    elif point == "result_write":  # every atomic write of the library goes through tinyablate.files
        replace = files_module.os.replace

        class _Os:  # files' `os`, whose replace dies on the way to result.json
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def replace(src, dst):
                if os.path.basename(str(dst)) == cell_folder.RESULT_FILE:
                    die()
                return replace(src, dst)

        files_module.os = _Os()


def attempt(spec, point: str, arg) -> dict:
    t0 = time.time()
    pid = os.fork()
    if pid == 0:  # the child: arm, run, exit (never returns)
        code = 0
        try:
            arm(point, arg, spec)
            cell_module.run_cell(spec)
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    if point == "random":
        time.sleep(float(arg))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    outcome = "killed" if killed else ("exit 0" if os.WEXITSTATUS(status) == 0 else f"exit {os.WEXITSTATUS(status)}")
    return {"point": point, "arg": arg, "outcome": outcome, "s": round(time.time() - t0, 2)}


def folder_facts(folder) -> dict:
    """What the folder says after an attempt (read without torch)."""
    try:
        result = folder.read_result()
        result_state = None if result is None else result.status
    except cell_folder.ResultError as err:
        result_state = f"unusable: {err}"
    steps = map(cell_folder.checkpoint_step, folder.file(cell_folder.CHECKPOINTS_DIR).glob("checkpoint-*"))
    ckpts = sorted(step for step in steps if step is not None)  # cell_folder's reading of checkpoint-N
    outputs = [*folder.path.glob("eval_samples*.jsonl"), *folder.path.glob("adapter*/*")]
    return {
        "state": folder.state(),
        "holder": folder.holder(),
        "result": result_state,
        "checkpoints": ckpts,
        "tmp_files": sorted(p.name for p in folder.path.glob(".*.tmp")),
        "outputs": {str(p.relative_to(folder.path)): p.stat().st_mtime_ns for p in outputs},  # when each was written
    }


def main(plan_path: str) -> None:
    plan = json.loads(open(plan_path).read())
    for life, lifetime in enumerate(plan["lifetimes"]):
        spec = spec_from_dict(lifetime["spec"])
        folder = cell_folder.CellFolder.of(spec)
        for point, arg in lifetime["attempts"] + [["none", None]]:
            record = {"lifetime": life, **attempt(spec, point, arg)}
            record.update(folder_facts(folder))
            print(json.dumps(record), flush=True)
    print(json.dumps({"done": True}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
