"""The difference-with-interval arithmetic of analysis/compare.py, and which settings it compares."""

from __future__ import annotations

import json

import pytest

from analysis.compare import comparisons, difference


def test_a_certain_difference_has_a_point_interval_and_is_resolved():
    diff, low, high = difference([[1.0] * 50] * 3, [[0.0] * 50] * 3)
    assert (diff, low, high) == (1.0, 1.0, 1.0)


def test_paired_problems_give_the_paired_binomial_interval():
    """200 shared problems, A right on 140, B on the first 100 of those: 40 discordant pairs, one way. Paired
    standard error sqrt((40/200 - 0.2^2) / 200) = 0.0283, so the 95% interval is 0.2 +- 0.055 (seeds agree)."""
    a = [[1.0] * 140 + [0.0] * 60] * 3
    b = [[1.0] * 100 + [0.0] * 100] * 3
    diff, low, high = difference(a, b, draws=20000)
    assert diff == pytest.approx(0.2)
    assert low == pytest.approx(0.2 - 1.96 * 0.02828, abs=0.008) and high == pytest.approx(
        0.2 + 1.96 * 0.02828, abs=0.008
    )
    # unpaired (different problem sets) the interval is wider: sqrt(.7*.3/200 + .5*.5/200) = 0.048
    _, low_u, high_u = difference(a, [[1.0] * 50 + [0.0] * 50] * 3, draws=20000)
    assert high_u - low_u > 1.5 * (high - low)


def test_seeds_that_disagree_leave_a_difference_unresolved():
    a = [[1.0] * 20 + [0.0] * 80, [1.0] * 90 + [0.0] * 10]  # 20% and 90%: the seed decides
    b = [[1.0] * 50 + [0.0] * 50] * 2
    diff, low, high = difference(a, b)
    assert diff == pytest.approx(0.05) and low < 0 < high


def test_identical_settings_differ_by_zero_and_are_unresolved():
    x = [[1.0, 0.0, 1.0, 1.0, 0.0] * 20] * 2
    diff, low, high = difference(x, x)
    assert diff == 0 and low <= 0 <= high


def _row(tmp_path, seed, scores, **axes):
    base = dict(
        task="arithmetic",
        scorer="flexible",
        model="m",
        algo="grpo",
        kind="tinylora",
        r=2,
        u=16,
        tie="all",
        sharing="tiled",
        precision="fp32",
        lr=2e-3,
        quantization="none",
        trainable_params=16,
    )
    base.update(axes)
    key = json.dumps({k: v for k, v in base.items()}, sort_keys=True)
    path = tmp_path / f"{abs(hash(key))}-{seed}.jsonl"
    path.write_text(
        "".join(json.dumps({"id": f"p-{i}", "flexible": bool(s), "strict": False}) + "\n" for i, s in enumerate(scores))
    )
    return {
        **base,
        "cell_id": f"{key}-{seed}",
        "seed": seed,
        "config_key": key,
        "samples_path": str(path),
        "accuracy": sum(scores) / len(scores),
        "n_eval": len(scores),
    }


def test_comparisons_pair_settings_that_differ_in_one_axis(tmp_path):
    good, bad = [1] * 80 + [0] * 20, [1] * 50 + [0] * 50
    rows = [_row(tmp_path, s, good) for s in (0, 1)]
    rows += [_row(tmp_path, s, bad, algo="sft") for s in (0, 1)]
    rows += [_row(tmp_path, s, bad, sharing="structured", u=8, tie=2) for s in (0, 1)]  # same params, other u/tie
    rows += [_row(tmp_path, s, good, algo="sft", precision="bf16") for s in (0, 1)]  # two axes from the first
    rows += [_row(tmp_path, 0, good, trainable_params=256, u=256)]  # another parameter count: compared with none
    found = {(c["axis"], c["a"], c["b"]): c for c in comparisons(rows)}
    assert set(found) == {("algo", "grpo", "sft"), ("sharing", "structured", "tiled"), ("precision", "bf16", "fp32")}
    c = found[("algo", "grpo", "sft")]
    assert c["diff"] == pytest.approx(30.0) and c["resolved"] and c["low"] > 0
    assert c["text"].startswith("algo grpo − sft at 16 params (arithmetic, m): +30.0 points [")
    assert found[("sharing", "structured", "tiled")]["diff"] == pytest.approx(-30.0)


def test_cells_without_problem_records_resample_their_accuracy(tmp_path):
    rows = [_row(tmp_path, 0, [1] * 60 + [0] * 40), _row(tmp_path, 0, [1] * 60 + [0] * 40, algo="sft")]
    for row in rows:
        row["samples_path"] = None  # read from W&B: no eval_samples.jsonl
    (c,) = comparisons(rows)
    assert c["diff"] == 0 and not c["resolved"] and "unresolved" in c["text"]
