"""Tests of the tasks: config validation, arithmetic generation, GSM8K loading, prompts."""

import dataclasses
import json
from pathlib import Path

import pytest

from tinyablate.config import TaskConfig
from tinyablate.config.task import ARITHMETIC_DEFAULT_TRAIN_SIZE
from tinyablate.tasks import ArithmeticTask, GSM8KTask, Problem, load_task
from tinyablate.tasks.gsm8k import parse_row

# /work/main/tests/test_tasks.py -> /work/shared/data/gsm8k (shared is a sibling of the repo).
GSM8K_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
needs_gsm8k = pytest.mark.skipif(
    not (GSM8K_DIR / "train.jsonl").is_file() or not (GSM8K_DIR / "test.jsonl").is_file(),
    reason=f"GSM8K data not found at {GSM8K_DIR} (expected train.jsonl and test.jsonl)",
)


def assert_solutions_score_correct(task, problems):
    for problem in problems:
        result = task.score(problem.solution, problem)
        assert result.strict and result.flexible, (problem, result)


# --- config ---------------------------------------------------------------------------------


def test_default_config_is_valid():
    TaskConfig().validate()
    TaskConfig(name="gsm8k").validate()


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"name": "mmlu"}, "task.name"),
        ({"train_size": 0}, "task.train_size"),
        ({"eval_limit": -1}, "task.eval_limit"),
        ({"eval_limit": 2.5}, "task.eval_limit"),
        ({"n_operands": 1}, "task.n_operands"),
        ({"min_value": 10, "max_value": 5}, "task.max_value"),
        ({"operations": []}, "task.operations"),
        ({"operations": ["/"]}, "task.operations"),
        ({"operations": ["+", "+"]}, "task.operations"),
        ({"operations": "+-"}, "task.operations"),
        ({"eval_size": 0}, "task.eval_size"),
        ({"seed": "zero"}, "task.seed"),
        ({"hub_id": ""}, "task.hub_id"),
        ({"system_prompt": 3}, "task.system_prompt"),
        ({"instruction": None}, "task.instruction"),
        ({"max_value": 9, "train_size": 95, "eval_size": 10}, "task.train_size"),
    ],
)
def test_validation_names_the_field_and_value(changes, field):
    cfg = dataclasses.replace(TaskConfig(), **changes)
    with pytest.raises(ValueError) as error:
        cfg.validate()
    message = str(error.value)
    assert message.startswith(f"{field}=")
    assert "expected" in message


def test_validation_message_lists_allowed_names():
    with pytest.raises(ValueError, match=r"task.name='mmlu'.*'arithmetic', 'gsm8k'"):
        TaskConfig(name="mmlu").validate()


def test_load_task_validates_first():
    with pytest.raises(ValueError, match="task.n_operands"):
        load_task(TaskConfig(n_operands=0))


def test_question_count_bounds_a_small_space_exactly():
    cfg = TaskConfig(max_value=9, train_size=90, eval_size=10)  # 100 questions: 90 + 10 fit exactly
    task = load_task(cfg)
    questions = {p.question for p in task.train_problems() + task.eval_problems()}
    assert len(questions) == cfg.arithmetic_question_count() == 100


# --- arithmetic -----------------------------------------------------------------------------


def test_arithmetic_is_deterministic_and_seed_dependent():
    cfg = TaskConfig(n_operands=3, operations=["+", "-", "*"], train_size=300, eval_size=50)
    first, second = load_task(cfg), load_task(cfg)
    assert first.train_problems() == second.train_problems()
    assert first.eval_problems() == second.eval_problems()
    other = load_task(dataclasses.replace(cfg, seed=1))
    assert other.eval_problems() != first.eval_problems()


def test_arithmetic_train_and_eval_are_disjoint_and_unique():
    task = load_task(TaskConfig(max_value=20, train_size=300, eval_size=100))
    train = [p.question for p in task.train_problems()]
    evaluation = [p.question for p in task.eval_problems()]
    assert len(set(train)) == len(train) == 300
    assert len(set(evaluation)) == len(evaluation) == 100
    assert not set(train) & set(evaluation)


def test_arithmetic_eval_set_does_not_depend_on_train_size():
    small = load_task(TaskConfig(train_size=10))
    large = load_task(TaskConfig(train_size=3000))
    assert small.eval_problems() == large.eval_problems()


def test_arithmetic_sizes_and_eval_limit():
    task = load_task(TaskConfig(eval_size=50, eval_limit=20))
    assert isinstance(task, ArithmeticTask)
    assert len(task.train_problems()) == ARITHMETIC_DEFAULT_TRAIN_SIZE
    assert len(task.eval_problems()) == 20
    assert task.eval_problems() == load_task(TaskConfig(eval_size=50)).eval_problems()[:20]


def test_arithmetic_question_and_solution_format():
    task = load_task(TaskConfig(max_value=9, train_size=5, eval_size=5))
    problem = task.train_problems()[0]
    left, right = (int(x) for x in problem.question.removeprefix("What is ").removesuffix("?").split(" + "))
    assert problem.answer == str(left + right)
    assert problem.solution == f"{left} + {right} = {left + right}.\n\\boxed{{{left + right}}}"


def test_arithmetic_answers_follow_operator_precedence():
    cfg = TaskConfig(
        n_operands=4, min_value=-6, max_value=12, operations=["+", "-", "*"], train_size=400, eval_size=100
    )
    task = load_task(cfg)
    for problem in task.train_problems() + task.eval_problems():
        expression = problem.question.removeprefix("What is ").removesuffix("?")
        assert problem.answer == str(eval(expression))  # trusted text: digits, parentheses, + - *
    assert_solutions_score_correct(task, task.train_problems() + task.eval_problems())


def test_arithmetic_operands_stay_in_range():
    task = load_task(TaskConfig(n_operands=3, min_value=5, max_value=7, train_size=20, eval_size=5))
    for problem in task.train_problems():
        operands = [int(x) for x in problem.question.removeprefix("What is ").removesuffix("?").split(" + ")]
        assert len(operands) == 3 and all(5 <= x <= 7 for x in operands)


# --- prompts --------------------------------------------------------------------------------


def test_messages_without_system_prompt():
    task = load_task(TaskConfig(train_size=1, eval_size=1))
    problem = Problem(id="p", question="What is 1 + 2?", answer="3", solution="\\boxed{3}")
    assert task.messages(problem) == [
        {
            "role": "user",
            "content": "What is 1 + 2?\nPlease reason step by step, and put your final answer within \\boxed{}.",
        }
    ]


def test_messages_with_system_prompt_and_no_instruction():
    task = load_task(TaskConfig(train_size=1, eval_size=1, system_prompt="Be brief.", instruction=""))
    problem = task.eval_problems()[0]
    assert task.messages(problem) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": problem.question},
    ]


def test_prompt_and_sft_rows():
    task = load_task(TaskConfig(train_size=2, eval_size=1))
    problems = task.train_problems()
    prompt_rows = task.prompt_rows(problems)
    assert [row["answer"] for row in prompt_rows] == [p.answer for p in problems]
    assert prompt_rows[0]["prompt"] == task.messages(problems[0])
    sft_rows = task.sft_rows(problems)
    assert sft_rows[1]["completion"] == [{"role": "assistant", "content": problems[1].solution}]


# --- gsm8k ----------------------------------------------------------------------------------


def test_parse_row_strips_calculator_notes_and_boxes_the_answer():
    row = {"question": " Q? ", "answer": "She makes 9 * 2 = $<<9*2=18>>18.\n#### 1,018"}
    assert parse_row(row, "x") == Problem(
        id="x", question="Q?", answer="1018", solution="She makes 9 * 2 = $18.\n\\boxed{1018}"
    )


def test_parse_row_rejects_answer_without_final_line():
    with pytest.raises(ValueError, match="####"):
        parse_row({"question": "Q", "answer": "no final line"}, "x")


@needs_gsm8k
def test_gsm8k_loads_from_shared_folder():
    task = load_task(TaskConfig(name="gsm8k", data_dir=str(GSM8K_DIR)))
    assert isinstance(task, GSM8KTask)
    assert len(task.train_problems()) == 7473
    assert len(task.eval_problems()) == 1319
    first = task.eval_problems()[0]
    assert first.id == "gsm8k-test-0" and first.answer == "18" and first.question.startswith("Janet")
    assert "<<" not in first.solution and first.solution.endswith("\\boxed{18}")


@needs_gsm8k
def test_gsm8k_every_test_reference_solution_scores_correct():
    task = load_task(TaskConfig(name="gsm8k", data_dir=str(GSM8K_DIR)))
    with (GSM8K_DIR / "test.jsonl").open() as file:
        raw_answers = [json.loads(line)["answer"].rpartition("####")[2].strip() for line in file]
    problems = task.eval_problems()
    assert [p.answer for p in problems] == [a.replace(",", "") for a in raw_answers]
    assert_solutions_score_correct(task, problems)


@needs_gsm8k
def test_gsm8k_sizes():
    task = load_task(TaskConfig(name="gsm8k", data_dir=str(GSM8K_DIR), train_size=100, eval_limit=10))
    assert len(task.train_problems()) == 100 and len(task.eval_problems()) == 10
    with pytest.raises(ValueError, match="task.train_size=10000"):
        load_task(TaskConfig(name="gsm8k", data_dir=str(GSM8K_DIR), train_size=10000))


def test_gsm8k_missing_data_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"task.data_dir=.*nowhere.*train.jsonl and test.jsonl"):
        load_task(TaskConfig(name="gsm8k", data_dir=str(missing)))


def test_gsm8k_missing_file(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "Q", "answer": "#### 1"}) + "\n")
    with pytest.raises(FileNotFoundError, match=r"task.data_dir=.* has no test.jsonl"):
        load_task(TaskConfig(name="gsm8k", data_dir=str(tmp_path)))


def test_gsm8k_from_small_local_files(tmp_path):
    for split in ("train", "test"):
        rows = [
            {"question": f"{split} {i}?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}
            for i in range(3)
        ]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = load_task(TaskConfig(name="gsm8k", data_dir=str(tmp_path), eval_limit=2))
    assert [p.answer for p in task.train_problems()] == ["1", "2", "3"]
    assert [p.question for p in task.eval_problems()] == ["test 0?", "test 1?"]
    assert_solutions_score_correct(task, task.train_problems())


def test_gsm8k_hub_failure_explains_how_to_provide_data(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=r"openai/gsm8k.*no internet.*task.data_dir=/path/to/gsm8k"):
        load_task(TaskConfig(name="gsm8k"))
