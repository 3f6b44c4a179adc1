"""Multiple-choice tasks (mmlu_cs, hellaswag): loading, bad input, prompts, few-shot, the one scorer,
and the per-choice log-likelihood evaluator against one-at-a-time scoring."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tinyablate.config import EvalConfig
from tinyablate.config.task import default_task_config
from tinyablate.evaluation import continuation_logliks, encode_pair, evaluate_choices
from tinyablate.tasks import choice_in_text, load_task
from tinyablate.tasks.mmlu import MMLU_CS_SUBJECTS

REPO = Path(__file__).resolve().parents[1]
MMLU_DIR = REPO.parent / "shared" / "data" / "mmlu_cs"  # ../shared beside the checkout
HELLASWAG_DIR = REPO / "tests" / "fixtures" / "hellaswag"  # hand-written items in the original format
needs_mmlu = pytest.mark.skipif(
    not (MMLU_DIR / "machine_learning_test.csv").is_file(), reason=f"MMLU-CS CSVs not found at {MMLU_DIR}"
)


def mmlu(**changes):
    return load_task(default_task_config("mmlu_cs", data_dir=str(MMLU_DIR), **changes))


def hellaswag(data_dir=HELLASWAG_DIR, **changes):
    return load_task(default_task_config("hellaswag", data_dir=None if data_dir is None else str(data_dir), **changes))


# --- config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name, scorer", [("mmlu_cs", "strict"), ("hellaswag", "flexible"), ("gsm8k", "acc")])
def test_scorer_must_fit_the_task(name, scorer):
    with pytest.raises(ValueError, match="task.scorer"):
        default_task_config(name, scorer=scorer).validate()


def test_negative_fewshot_and_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="task.num_fewshot"):
        default_task_config("hellaswag", num_fewshot=-1).validate()
    with pytest.raises(ValueError, match="task.data_dri='x' is invalid: expected a TaskConfig field"):
        default_task_config("hellaswag", data_dri="x")


# --- MMLU-CS --------------------------------------------------------------------------------
@needs_mmlu
def test_mmlu_cs_has_412_questions_in_subject_order_with_the_harness_prompt():
    task = mmlu()
    problems = task.eval_problems()
    assert len(problems) == 412
    assert [sum(p.group == s for p in problems) for s in MMLU_CS_SUBJECTS] == [100, 100, 100, 112]
    first = problems[0]
    assert task.context(first) == (
        "The following are multiple choice questions (with answers) about college computer science.\n\n"
        "The access matrix approach to protection has the difficulty that\n"
        "A. the matrix, if stored directly, is large and can be clumsy to manage\n"
        "B. it is not capable of expressing complex protection requirements\n"
        "C. deciding whether a process has access to a resource is undecidable\n"
        "D. there is no way to express who has rights to change the access matrix itself\nAnswer:"
    )
    assert task.continuations(first) == [" A", " B", " C", " D"] and first.gold == 0
    assert len(mmlu(eval_limit=5).eval_problems()) == 5


@needs_mmlu
def test_mmlu_without_val_split_says_it_cannot_train():
    with pytest.raises(ValueError, match="cannot train here: no val split"):
        mmlu().train_problems()


@needs_mmlu
def test_fewshot_examples_are_seeded_from_the_same_subject_and_never_the_question():
    task = mmlu(num_fewshot=3)
    for problem in task.eval_problems()[::37]:
        shots = task.fewshot_examples(problem)
        assert len(shots) == 3 and problem not in shots and all(s.group == problem.group for s in shots)
        assert shots == task.fewshot_examples(problem)
        context = task.context(problem)
        assert context.count("Answer:") == 4 and context.endswith(problem.question)
        assert f"{shots[0].question} {'ABCD'[shots[0].gold]}\n\n" in context
    assert mmlu(num_fewshot=3, seed=1).fewshot_examples(problem) != shots


def write_mmlu(folder: Path, rows_text: str, name="machine_learning_test.csv"):
    """A copy of the MMLU-CS folder with one file replaced by `rows_text`."""
    for path in MMLU_DIR.glob("*_test.csv"):
        shutil.copy(path, folder / path.name)
    (folder / name).write_text(rows_text, encoding="utf-8")
    return folder


@needs_mmlu
@pytest.mark.parametrize(
    "rows, line, message",
    [
        ('q1,a,b,c,d,A\n"q2\nspans lines",a,b,c,d,B\nq3,a,b,c,d\n', 4, "expected 6 fields"),
        ("q1,a,b,c,d,A\nq2,a,b,c,d,E\n", 2, "'E' is not one of A, B, C, D"),
        ("q1,a,b,c,d,A\nq2,a,b,c,d,e,f,B\n", 2, "found 8"),
    ],
)
def test_bad_mmlu_rows_name_file_and_line(tmp_path, rows, line, message):
    folder = write_mmlu(tmp_path, rows)
    with pytest.raises(ValueError, match=message) as error:
        load_task(default_task_config("mmlu_cs", data_dir=str(folder)))
    assert f"{folder / 'machine_learning_test.csv'}:{line}:" in str(error.value)


@needs_mmlu
def test_missing_mmlu_file_or_folder_says_what_to_provide(tmp_path):
    folder = write_mmlu(tmp_path, "q,a,b,c,d,A\n")
    (folder / "computer_security_test.csv").unlink()
    with pytest.raises(FileNotFoundError, match="has no computer_security_test.csv.*cais/mmlu"):
        load_task(default_task_config("mmlu_cs", data_dir=str(folder)))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_task(default_task_config("mmlu_cs", data_dir=str(tmp_path / "nowhere")))


@needs_mmlu
def test_mmlu_val_and_dev_files_train_and_give_fewshot_examples(tmp_path):
    folder = write_mmlu(tmp_path, (MMLU_DIR / "machine_learning_test.csv").read_text(encoding="utf-8"))
    (folder / "dev").mkdir()
    for subject in MMLU_CS_SUBJECTS:
        (folder / f"{subject}_val.csv").write_text(f"val {subject}?,w,x,y,z,C\n")
        (folder / "dev" / f"{subject}_dev.csv").write_text(f"dev {subject}?,w,x,y,z,D\n")
    task = load_task(default_task_config("mmlu_cs", data_dir=str(folder), num_fewshot=1))
    train = task.train_problems()
    assert [p.gold for p in train] == [2] * 4 and train[0].question.startswith("val college")
    problem = task.eval_problems()[0]
    assert task.fewshot_examples(problem)[0].question.startswith("dev college")
    assert task.sft_rows(train[:1]) == [{"prompt": task.context(train[0]), "completion": " C"}]


# --- HellaSwag --------------------------------------------------------------------------------
def test_hellaswag_fixture_prompt_follows_the_harness():
    task = hellaswag()
    problems = task.eval_problems()
    assert len(problems) == 8 and len(task.train_problems()) == 4
    assert task.context(problems[0]) == "Making tea: A woman fills a kettle with water and sets it on the stove. She"
    marked = problems[3]  # "[header] ... [title] ..." cleaned as the harness does
    assert marked.question == "Home and Garden: How to water a houseplant. Check the soil first. "
    assert (
        task.continuations(marked)[0] == " Press a finger into the soil; if the top inch is dry, the plant needs water."
    )


def write_hellaswag(folder: Path, rows: list) -> Path:
    shutil.copy(HELLASWAG_DIR / "hellaswag_train.jsonl", folder / "hellaswag_train.jsonl")
    with open(folder / "hellaswag_val.jsonl", "w") as f:
        f.write("\n".join(row if isinstance(row, str) else json.dumps(row) for row in rows) + "\n")
    return folder


GOOD = {"activity_label": "x", "ctx_a": "A.", "ctx_b": "b", "endings": ["1", "2", "3", "4"], "label": 1}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({**GOOD, "label": 4}, "label 4 is out of range: expected an integer in 0..3"),
        ({**GOOD, "label": "-1"}, "label '-1' is out of range"),
        ({**GOOD, "label": None}, "label None is out of range"),
        ({k: v for k, v in GOOD.items() if k != "ctx_b"}, "missing ctx_b"),
        ({**GOOD, "endings": "abcd"}, "endings must be a list"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_hellaswag_rows_name_file_and_line(tmp_path, bad, message):
    folder = write_hellaswag(tmp_path, [GOOD, GOOD, bad])
    with pytest.raises(ValueError, match=message) as error:
        hellaswag(folder)
    assert f"{folder / 'hellaswag_val.jsonl'}:3:" in str(error.value)


def test_hellaswag_label_as_string_is_read_and_missing_val_file_is_named(tmp_path):
    task = hellaswag(write_hellaswag(tmp_path, [{**GOOD, "label": "2"}]))
    assert task.eval_problems()[0].gold == 2
    (tmp_path / "hellaswag_val.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="has no hellaswag_val.jsonl"):
        hellaswag(tmp_path)


# --- the one scorer -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", 1),
        (" B. because", 1),
        ("D\n", 3),
        ("Answer: B", None),
        ("Ab", None),
        ("", None),
        ("E", None),
    ],
)
def test_choice_in_text_reads_the_choice_a_completion_spells_out(text, expected):
    assert choice_in_text(text, ("A", "B", "C", "D")) == expected


def test_longest_matching_choice_wins():
    assert choice_in_text(" he runs home.", ("he runs", "he runs home.")) == 1


def test_reward_and_evaluation_share_the_scorer():
    task = hellaswag()
    reward = task.reward_fn()
    train = task.train_problems()
    completions = [p.solution for p in train] + [" " + p.choices[(p.gold + 1) % 4] for p in train]
    ids = [p.id for p in train] * 2
    assert reward(completions=completions, id=ids) == [1.0] * 4 + [0.0] * 4
    for problem in train:  # the evaluator's pick, written out, scores as the pick does
        for i, choice in enumerate(problem.choices):
            assert task.score(" " + choice, problem).correct == (i == problem.gold)


# --- the log-likelihood evaluator ------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from tinyablate.models import build_local_tokenizer, build_tiny_model

    return build_tiny_model("llama", seed=3).eval(), build_local_tokenizer("llama")


def reference_loglik(model, tokenizer, context, continuation):
    """One unpadded sequence, full logits: the exact reference."""
    ctx, cont = encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
    return sum(float(logprobs[len(ctx) - 1 + j, token]) for j, token in enumerate(cont))


def test_batched_logliks_match_one_sequence_at_a_time(tiny):
    model, tokenizer = tiny
    task = hellaswag(num_fewshot=1)
    requests = [(task.context(p), c) for p in task.eval_problems() for c in task.continuations(p)]
    letters = "Which is even?\nA. 3\nB. 4\nC. 5\nD. 7\nAnswer:"  # one-token choices share one row
    requests += [(letters, f" {x}") for x in "ABCD"] + [("Pick one:", " A"), ("Pick one:", " B. four")]
    batched = continuation_logliks(model, tokenizer, requests, batch_size=7)
    for (context, continuation), got in zip(requests, batched):
        assert got == pytest.approx(reference_loglik(model, tokenizer, context, continuation), abs=1e-3, rel=1e-5)


def test_trailing_context_space_moves_to_the_continuation(tiny):
    _, tokenizer = tiny
    assert encode_pair(tokenizer, "It is ", "done") == encode_pair(tokenizer, "It is", " done")


def test_acc_and_acc_norm_pick_from_the_logliks(tiny):
    model, tokenizer = tiny
    task = hellaswag()
    result = evaluate_choices(model, tokenizer, task, task.eval_problems(), EvalConfig(batch_size=16))
    acc = acc_norm = 0
    for record, problem in zip(result.records, task.eval_problems()):
        ll = record["loglik"]
        per_char = [s / len(c) for s, c in zip(ll, problem.choices)]
        acc += ll.index(max(ll)) == problem.gold
        acc_norm += per_char.index(max(per_char)) == problem.gold
    assert result.acc == acc / 8 and result.acc_norm == acc_norm / 8 and result.chance == 0.25
    assert result.metrics("acc_norm")["accuracy"] == result.acc_norm
    assert result.metrics("acc")["accuracy"] == result.acc


def test_a_model_that_prefers_gold_scores_one(tiny):
    """A model that predicts each problem's gold ending token by token scores acc = acc_norm = 1."""
    _, tokenizer = tiny
    task = hellaswag()
    problems = task.eval_problems()
    gold = {}  # model input (context + continuation but its last token) -> the gold continuation's tokens
    for p in problems:
        context_ids, target = encode_pair(tokenizer, task.context(p), task.continuations(p)[p.gold])
        gold[tuple(context_ids + target[:-1])] = target

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
            logits = torch.zeros(input_ids.shape[0], logits_to_keep, len(tokenizer))
            for row, ids in enumerate(input_ids.tolist()):
                target = gold.get(tuple(t for t, m in zip(ids, attention_mask[row].tolist()) if m), [])
                for j, token in enumerate(target):
                    logits[row, logits_to_keep - len(target) + j, token] = 20.0
            return type("Out", (), {"logits": logits})()

    result = evaluate_choices(Oracle(), tokenizer, task, problems, EvalConfig(batch_size=3))
    assert result.acc == 1.0 and result.acc_norm == 1.0


# --- the Hub path (datasets.load_dataset replaced: nothing is downloaded) ---------------------------
def fake_hub(monkeypatch, tables: dict, calls: list):
    import datasets

    def load_dataset(repo, config=None, **kwargs):
        calls.append((repo, config))
        if repo not in tables:
            raise ConnectionError("offline")
        return tables[repo](config)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_mmlu_from_the_hub_takes_each_subject_config(monkeypatch):
    def subject(config):
        row = {"question": f"{config}?", "subject": config, "choices": ["w", "x", "y", "z"], "answer": 1}
        return {"test": [row] * 3, "validation": [row] * 2, "dev": [row] * 5}

    calls = []
    fake_hub(monkeypatch, {"cais/mmlu": subject}, calls)
    task = load_task(default_task_config("mmlu_cs", num_fewshot=2))
    assert [c[1] for c in calls] == list(MMLU_CS_SUBJECTS)
    assert len(task.eval_problems()) == 12 and len(task.train_problems()) == 8
    problem = task.eval_problems()[0]
    assert problem.gold == 1 and task.context(problem).count("Answer: B") == 2


def test_hellaswag_from_the_hub_reads_string_labels(monkeypatch):
    row = {"activity_label": "x", "ctx_a": "A.", "ctx_b": "b", "endings": ["1", "2", "3", "4"], "label": "3"}
    calls = []
    fake_hub(monkeypatch, {"Rowan/hellaswag": lambda config: {"train": [row], "validation": [row] * 2}}, calls)
    task = hellaswag(data_dir=None)
    assert calls == [("Rowan/hellaswag", "default")]
    assert [p.gold for p in task.eval_problems()] == [3, 3] and len(task.train_problems()) == 1


def test_hub_out_of_reach_says_how_to_provide_the_data(monkeypatch):
    fake_hub(monkeypatch, {}, [])
    with pytest.raises(RuntimeError, match="Could not load MMLU from the Hub.*set task.data_dir"):
        load_task(default_task_config("mmlu_cs"))
    with pytest.raises(RuntimeError, match="Could not load HellaSwag from the Hub.*hellaswag_val.jsonl"):
        load_task(default_task_config("hellaswag"))


@needs_mmlu
def test_without_a_fewshot_split_examples_come_from_the_problems_own_split(tmp_path):
    folder = write_mmlu(tmp_path, (MMLU_DIR / "machine_learning_test.csv").read_text(encoding="utf-8"))
    for subject in MMLU_CS_SUBJECTS:  # a val split, no dev split
        (folder / f"{subject}_val.csv").write_text(f"val1 {subject}?,w,x,y,z,C\nval2 {subject}?,w,x,y,z,A\n")
    task = load_task(default_task_config("mmlu_cs", data_dir=str(folder), num_fewshot=1))
    train_shot = task.fewshot_examples(task.train_problems()[0])[0]
    eval_shot = task.fewshot_examples(task.eval_problems()[0])[0]
    assert train_shot.id.startswith("mmlu_cs-val-") and train_shot.question.startswith("val2")
    assert eval_shot.id.startswith("mmlu_cs-test-")  # a test question never enters a training prompt
