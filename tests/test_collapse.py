"""A collapsed GRPO cell is named, not averaged (tinyablate/train/collapse.py): the watch's verdicts, a forced
collapse end to end (a constant reward; completions forced to the end token), the result field, the console and
status lines, and the settings' refusal."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import TrainerControl, TrainerState

from test_cell import tiny_spec
from tinyablate.cell import run_cell
from tinyablate.cell_folder import CHECKPOINTS_DIR, CellFolder, Result, ResultError
from tinyablate.config import ConfigError, LoggerConfig, cell_id, validate_spec
from tinyablate.console import collapse_note, end_lines
from tinyablate.status import cell_row, format_table
from tinyablate.tasks.base import Task
from tinyablate.train.collapse import CollapseWatch, step_reason
from tinyablate.train.trl_seam import TinyablateGRPOTrainer

HEALTHY = dict(zero_std=0.5, max_length=9, clipped=0.0)
SAME_REWARDS = dict(zero_std=1.0, max_length=9, clipped=0.0)
EMPTY = dict(zero_std=1.0, max_length=1, clipped=0.0)
AT_CAP = dict(zero_std=0.0, max_length=12, clipped=1.0)


def stats(zero_std, max_length, clipped) -> dict:
    """TRL's per-generation metrics as the watch reads them (lists: the last value is the newest)."""
    return {
        "frac_reward_zero_std": [0.0, zero_std],
        "completions/max_length": [3.0, max_length],
        "completions/clipped_ratio": [0.5, clipped],
    }


def run_steps(watch: CollapseWatch, steps: list, first: int = 1) -> TrainerControl:
    """Feed the watch one generation per step, as the trainer does; returns the last step's control."""
    state, control = TrainerState(), TrainerControl()
    for i, kind in enumerate(steps):
        watch.saw_rollouts(stats(**kind))
        state.global_step = first + i
        watch.on_step_end(None, state, control)
    return control


def test_step_verdicts():
    assert step_reason(stats(**HEALTHY)) is None
    assert step_reason(stats(**SAME_REWARDS)) == "zero_reward_spread"
    assert step_reason(stats(**EMPTY)) == "empty_completions"
    assert step_reason(stats(**AT_CAP)) == "length_cap"  # rewards that differ do not save all-capped completions
    assert step_reason(stats(zero_std=1.0, max_length=1, clipped=1.0)) == "length_cap"  # a cap of one token


def test_a_streak_of_k_degenerate_steps_is_a_collapse_from_its_first_step(capsys):
    watch = CollapseWatch(steps=3)
    run_steps(watch, [SAME_REWARDS, SAME_REWARDS, HEALTHY, SAME_REWARDS, EMPTY])
    assert watch.record is None  # two, then two: never three in a row
    control = run_steps(watch, [EMPTY], first=6)
    assert watch.record == {
        "step": 4,
        "detected_step": 6,
        "reason": "empty_completions",
        "stopped": False,
        "recovered_step": None,
    }
    assert not control.should_training_stop  # record: it trains on
    out = capsys.readouterr().out
    assert out.startswith("collapsed at step 6: 3 steps in a row gave GRPO nothing to learn from (since step 4; now")
    run_steps(watch, [EMPTY, AT_CAP, HEALTHY], first=7)
    assert watch.record["recovered_step"] == 9 and watch.record["step"] == 4
    assert "recovered at step 9" in capsys.readouterr().out
    run_steps(watch, [AT_CAP] * 3, first=10)  # a new collapse replaces the recovered one
    assert watch.record == {
        "step": 10,
        "detected_step": 12,
        "reason": "length_cap",
        "stopped": False,
        "recovered_step": None,
    }


def test_stop_ends_training_without_a_checkpoint_at_the_stop():
    watch = CollapseWatch(steps=2, action="stop")
    control = run_steps(watch, [HEALTHY, SAME_REWARDS])
    assert not control.should_training_stop
    control.should_save = True  # a save step (set by transformers' DefaultFlowCallback before the watch)
    control = run_steps(watch, [SAME_REWARDS], first=3)
    assert control.should_training_stop and not control.should_save
    assert watch.record["stopped"] and watch.record["detected_step"] == 3


def test_the_watch_resumes_from_a_checkpoints_trainer_state(tmp_path):
    """Its state travels in trainer_state.json (transformers' own save and load): a resumed cell counts on."""
    watch = CollapseWatch(steps=3)
    run_steps(watch, [HEALTHY, SAME_REWARDS, SAME_REWARDS])
    TrainerState(stateful_callbacks=[watch]).save_to_json(str(tmp_path / "trainer_state.json"))
    resumed = CollapseWatch(steps=3)
    resumed.on_train_begin(None, TrainerState.load_from_json(str(tmp_path / "trainer_state.json")), None)
    assert (resumed.streak, resumed.began) == (2, 2)
    run_steps(resumed, [SAME_REWARDS], first=4)
    assert resumed.record["step"] == 2 and resumed.record["detected_step"] == 4
    older = TrainerState()  # a checkpoint written before the watch existed: it starts afresh, and saves again
    CollapseWatch(steps=3).on_train_begin(None, older, None)
    assert older.stateful_callbacks["CollapseWatch"]["attributes"] == {"streak": 0, "began": None, "record": None}


# -- a forced collapse, end to end ---------------------------------------------------------------------
def force_completions(monkeypatch, lengths):
    """Every rollout's completions forced: completion i has lengths[i % len] tokens before the end token (0: the
    end token alone; None: max_completion_length tokens and no end token)."""

    def generate(self, prompt_ids, *args, **kwargs):
        special = {*self.eos_token_ids, self.processing_class.pad_token_id}
        eos, token = self.eos_token_ids[0], next(i for i in range(3, 100) if i not in special)
        out = []
        for i, _ in enumerate(prompt_ids):
            n = lengths[i % len(lengths)]
            out.append([token] * self.max_completion_length if n is None else [token] * n + [eos])
        return out, None

    monkeypatch.setattr(TinyablateGRPOTrainer, "_generate_single_turn", generate)


def constant_reward(monkeypatch, value=0.5):
    def reward_fn(self):
        def constant(completions, **kwargs):
            return [value] * len(completions)

        return constant

    monkeypatch.setattr(Task, "reward_fn", reward_fn)


def collapse_spec(tmp_path, **algo):
    spec = tiny_spec(tmp_path, **algo)
    spec.logger = LoggerConfig(mode="disabled")
    return spec


def test_a_constant_reward_is_recorded_shown_and_counted(tmp_path, monkeypatch, capsys):
    constant_reward(monkeypatch)
    spec = collapse_spec(tmp_path, max_steps=3, collapse_steps=2)
    force_completions(monkeypatch, [1, 4, 0, 2])  # lengths that differ and end: only the rewards collapse
    result = Result.parse(run_cell(spec))
    collapse = result.metrics.collapse
    assert (collapse.step, collapse.detected_step, collapse.reason) == (1, 2, "zero_reward_spread")
    assert not collapse.stopped and collapse.recovered_step is None and result.collapsed
    assert result.algo.steps == result.metrics.train_steps == 3  # record: trained to algo.max_steps
    out = capsys.readouterr().out
    assert "collapsed at step 2: 2 steps in a row gave GRPO nothing to learn from (since step 1; now every " in out
    folder = CellFolder.of(spec)
    assert folder.read_result().metrics.collapse == collapse  # on disk, as returned
    row = cell_row(folder.path)
    assert row["state"] == "completed" and row["collapsed"]
    table = format_table([row, cell_row(tmp_path / "never-run")]).splitlines()
    assert table[2].strip() == "collapsed since step 1 (every group's rewards equal (no advantage, no gradient))"
    assert table[-1] == (
        "2 cells: 1 completed, 1 pending; 1 of the completed collapsed in training (left out of the analysis' means)"
    )
    assert "collapsed since step 1" in end_lines(result.to_dict(), folder.file("result.json"), None).splitlines()[1]


def test_completions_forced_to_the_end_token_stop_the_cell_when_asked(tmp_path, monkeypatch):
    spec = collapse_spec(tmp_path, max_steps=6, save_steps=2, collapse_steps=2, on_collapse="stop")
    force_completions(monkeypatch, [0])
    result = Result.parse(run_cell(spec))
    collapse = result.metrics.collapse
    assert (collapse.step, collapse.detected_step, collapse.reason, collapse.stopped) == (
        1,
        2,
        "empty_completions",
        True,
    )
    assert result.completed and result.collapsed and result.algo.steps == 2  # of 6: stopped where it was named
    assert cell_row(CellFolder.of(spec).path)["collapse"].endswith(", training stopped at step 2")
    checkpoints = CellFolder.of(spec).file(CHECKPOINTS_DIR)
    assert not (checkpoints / "checkpoint-2").exists()  # the stop step is not a checkpoint: a resume trains to it
    raw = result.to_dict()
    raw["metrics"]["collapse"]["stopped"] = False  # fewer steps than asked without a stop: not a completed cell
    with pytest.raises(ResultError, match="completed after 2 training steps, but algo.max_steps=6"):
        Result.parse(raw)


def test_a_resumed_cell_counts_on_from_its_checkpoint(tmp_path, monkeypatch):
    """Steps 1-2 degenerate, checkpoint 2, then killed: the resumed cell names the collapse at step 3, not step 5."""
    import shutil

    constant_reward(monkeypatch)
    force_completions(monkeypatch, [2, 3])
    spec = collapse_spec(tmp_path, max_steps=4, save_steps=2, collapse_steps=3)
    first = Result.parse(run_cell(spec))
    folder = CellFolder.of(spec)
    folder.file("result.json").unlink()  # as if killed after step 2's checkpoint
    shutil.rmtree(folder.file(CHECKPOINTS_DIR) / "checkpoint-4")
    again = Result.parse(run_cell(spec))
    assert again.metrics.resumed_from_step == 2
    assert again.metrics.collapse == first.metrics.collapse and again.metrics.collapse.detected_step == 3


# -- the settings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("collapse_steps", 0, "algo.collapse_steps=0 is invalid: expected an integer >= 1"),
        ("collapse_steps", 2.5, "algo.collapse_steps=2.5 is invalid: expected an integer >= 1"),
        ("on_collapse", "halt", "algo.on_collapse='halt' is invalid: expected one of 'record', 'stop'"),
    ],
)
def test_invalid_collapse_settings_are_refused_before_anything_loads(tmp_path, field, value, expected):
    spec = tiny_spec(tmp_path, **{field: value})
    with pytest.raises(ConfigError) as err:
        run_cell(spec)
    assert str(err.value) == expected  # one line naming the setting
    assert not Path(spec.output_dir).exists()


def test_the_collapse_settings_keep_existing_cell_ids_at_their_defaults(tmp_path):
    spec = tiny_spec(tmp_path)
    assert cell_id(validate_spec(tiny_spec(tmp_path, collapse_steps=5, on_collapse="record"))) == cell_id(spec)
    ids = {cell_id(tiny_spec(tmp_path, collapse_steps=3)), cell_id(tiny_spec(tmp_path, on_collapse="stop"))}
    assert len(ids) == 2 and cell_id(spec) not in ids  # another K records, another action trains, differently


def test_the_result_field_round_trips_and_older_results_lack_it():
    from test_cell_folder import completed

    result = completed()
    assert result.metrics.collapse is None and not result.collapsed  # an older result reads as no collapse
    raw = result.to_dict()
    raw["metrics"]["collapse"] = {"step": 3, "detected_step": 7, "reason": "length_cap", "recovered_step": 9}
    back = Result.parse(raw)
    assert back.metrics.collapse.recovered_step == 9 and not back.metrics.collapse.stopped
    assert not back.collapsed  # recovered: it counts in the means
    note = "collapsed at steps 3-8 (every completion cut at algo.max_completion_length), then recovered"
    assert collapse_note(back.metrics.collapse.to_dict()) == note  # the status table's line under the cell
    assert Result.parse(back.to_dict()).to_dict() == back.to_dict()
    raw["metrics"]["collapse"] = {"step": 3, "reason": "length_cap"}
    with pytest.raises(ResultError, match="metrics.collapse.detected_step is missing"):
        Result.parse(raw)


def test_the_library_names_collapse_reasons_once():
    from tinyablate.cell_folder import COLLAPSE_REASONS

    assert {step_reason(stats(**k)) for k in (SAME_REWARDS, EMPTY, AT_CAP)} == set(COLLAPSE_REASONS)


def test_a_cell_stopped_at_a_collapse_does_not_calibrate_the_cost_model(tmp_path):
    from hydra_plugins.tinyablate.plan import completed_cells
    from test_cell_folder import completed
    from tinyablate.cell_folder import CollapseRecord
    from tinyablate.config import spec_to_dict

    spec = tiny_spec(tmp_path, max_steps=4)
    folder = CellFolder.of(spec)
    result = completed(cell_id(spec))
    result.config = spec_to_dict(spec)
    folder.write_result(result)
    cells = [SimpleNamespace(folder=folder)]
    assert [hours for _, hours in completed_cells(cells)] == [0.0]  # a whole run: it calibrates
    result.algo.steps = result.metrics.train_steps = 2
    result.metrics.collapse = CollapseRecord(step=1, detected_step=2, reason="length_cap", stopped=True)
    folder.write_result(result)
    assert completed_cells(cells) == []  # two of its four steps: its time is not a cell's
