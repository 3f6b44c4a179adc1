"""Tests of the one scorer: extraction, normalization, scoring and the TRL reward function."""

import inspect

import pytest

from tinyablate.tasks.scoring import (
    Score,
    completion_text,
    extract_flexible,
    extract_strict,
    normalize_number,
    reward_fn,
    score,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{18}.", "18"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{1{,}000}", "1{,}000"),
        ("first \\boxed{3}, then corrected: \\boxed{4}", "4"),
        ("\\boxed{\\boxed{5}}", "5"),
        ("\\boxed {7}", "7"),
        ("\\fbox{8}", "8"),
        ("\\boxed{\\text{18 dollars}}", "\\text{18 dollars}"),
        ("\\boxed{\\$18}", "\\$18"),
        ("answer \\boxed{12} and an unclosed \\boxed{13", "12"),
        ("\\boxed{9} and the instruction echoed: \\boxed{}", "9"),
        ("Rationale.\n#### 1,234", "1,234"),
        ("#### 5\nmore text\n#### 6", "6"),
        ("\\boxed{2}\n#### 3", "2"),
        ("The answer is 5.", None),
        ("####", None),
        ("", None),
    ],
)
def test_extract_strict(text, expected):
    assert extract_strict(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is 5. Actually 6.", "6"),
        ("It costs $1,234,567 in total", "$1,234,567"),
        ("temperature is -5 degrees", "-5"),
        ("temperature is \u22125 degrees", "\u22125"),
        ("pages 3-5", "5"),
        ("(-4) + 1 = -3", "-3"),
        ("pi is about 3.14.", "3.14"),
        ("\\boxed{1{,}000}", "1,000"),
        ("no digits here", None),
    ],
)
def test_extract_flexible(text, expected):
    assert extract_flexible(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("18", "18"),
        ("18 dollars", "18"),
        ("$18.00", "18"),
        ("\\$18", "18"),
        ("18.", "18"),
        ("-5", "-5"),
        ("\u22125", "-5"),
        ("3.50", "3.5"),
        ("7.0", "7"),
        ("100", "100"),
        ("0.125", "0.125"),
        (".5", "0.5"),
        ("-0.0", "0"),
        ("1,234,567", "1234567"),
        ("$1,234.00", "1234"),
        ("1{,}000", "1000"),
        ("1\\,000", "1000"),
        ("\\text{18}", "18"),
        ("\\textbf{\\text{18}} apples", "18"),
        ("50%", "50"),
        ("50\\%", "50"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{3}{4}", "0.75"),
        ("1/2", "0.5"),
        ("7/2", "3.5"),
        ("2/3", "2/3"),
        ("4/2", "2"),
        ("x = 7", "7"),
        ("3 + 4 = 7", "7"),
        (42, "42"),
        ("5 apples and 3 pears", None),
        ("1/0", None),
        ("abc", None),
        ("", None),
        (None, None),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    "completion, answer, strict, flexible",
    [
        ("Adding up: \\boxed{18}", "18", True, True),
        ("The total is \\boxed{\\$1,234.00}.", "1234", True, True),
        ("#### 1,234", "1234", True, True),
        ("\\boxed{-5}", "-5", True, True),
        ("\\boxed{\u22125}", "-5", True, True),
        ("\\boxed{18 \\text{ dollars}}", "18", True, True),
        ("\\boxed{7.0}", "7", True, True),
        ("\\boxed{\\frac{1}{2}}", "0.5", True, False),
        ("\\boxed{4} no wait \\boxed{5}", "4", False, False),
        ("The answer is 5. Actually 6.", "6", False, True),
        ("The answer is 5. Actually 6.", "5", False, False),
        ("\\boxed{6} is wrong, so 5", "6", True, False),
        ("I do not know.", "3", False, False),
        ("\\boxed{}", "3", False, False),
        ("\\boxed{3 + 4 = 7}", "7", True, True),
        ("\\boxed{1{,}000}", "1,000", True, True),
    ],
)
def test_score(completion, answer, strict, flexible):
    result = score(completion, answer)
    assert (result.strict, result.flexible) == (strict, flexible)


def test_score_reports_what_it_extracted():
    result = score("I think 5, so \\boxed{6}. Done in 7 steps", "6")
    assert result == Score(strict=True, flexible=False, extracted_strict="6", extracted_flexible="7")


def test_score_without_number_extracts_nothing():
    result = score("no idea", "3")
    assert result.extracted_strict is None and result.extracted_flexible is None
    assert not result.strict and not result.flexible


def test_score_is_frozen():
    result = score("\\boxed{1}", "1")
    with pytest.raises(AttributeError):
        result.strict = False


def test_score_rejects_unreadable_gold():
    with pytest.raises(ValueError, match="gold answer"):
        score("\\boxed{1}", "no number")


def test_completion_text_of_conversational_completion():
    completion = [
        {"role": "assistant", "content": "a"},
        {"role": "tool", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]
    assert completion_text(completion) == "a\nc"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "\\boxed{2}"}]}]) == "\\boxed{2}"


def test_reward_fn_on_string_completions():
    reward = reward_fn("strict")
    completions = ["\\boxed{18}", "The answer is 18", "\\boxed{17}"]
    assert reward(completions=completions, answer=["18", "18", "18"]) == [1.0, 0.0, 0.0]


def test_flexible_reward_fn():
    reward = reward_fn("flexible")
    assert reward(completions=["The answer is 18", "\\boxed{18} then 3"], answer=["18", "18"]) == [1.0, 0.0]


def test_reward_fn_on_conversational_completions():
    reward = reward_fn()
    completions = [
        [{"role": "assistant", "content": "So \\boxed{-3}."}],
        [{"role": "assistant", "content": "So \\boxed{3}."}],
    ]
    assert reward(completions=completions, answer=["-3", "-3"]) == [1.0, 0.0]


def test_reward_fn_accepts_trl_call_with_extra_columns():
    """TRL passes prompts, completion_ids, every other dataset column and trainer extras by keyword."""
    reward = reward_fn("strict")
    rewards = reward(
        prompts=[[{"role": "user", "content": "What is 1 + 1?"}]] * 2,
        completions=[
            [{"role": "assistant", "content": "\\boxed{2}"}],
            [{"role": "assistant", "content": "\\boxed{3}"}],
        ],
        completion_ids=[[1, 2], [3, 4]],
        answer=["2", "2"],
        id=["a", "b"],
        trainer_state=None,
        log_extra=lambda *args: None,
        log_metric=lambda *args: None,
    )
    assert rewards == [1.0, 0.0]


def test_reward_fn_signature_and_names():
    assert reward_fn("strict").__name__ == "strict_accuracy"
    assert reward_fn("flexible").__name__ == "flexible_accuracy"
    parameters = inspect.signature(reward_fn()).parameters
    assert list(parameters)[:2] == ["completions", "answer"]
    assert parameters["kwargs"].kind is inspect.Parameter.VAR_KEYWORD


def test_reward_fn_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        reward_fn()(completions=["\\boxed{1}"], answer=["1", "2"])


def test_reward_fn_unknown_kind():
    with pytest.raises(ValueError, match="'lenient'"):
        reward_fn("lenient")
