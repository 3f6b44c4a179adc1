"""Evaluation: order, scoring through the task's scorer, pass@k, base cache keys."""

from __future__ import annotations

from dataclasses import replace

from tinyablate.config import EvalConfig, ModelConfig, TaskConfig
from tinyablate.eval import base_cache_key, evaluate, generate, prompts_for
from tinyablate.models import load_model_and_tokenizer
from tinyablate.tasks import load_task
from tinyablate.tasks.scoring import reward_fn


def _setup():
    model, tok, _ = load_model_and_tokenizer(ModelConfig(name="tiny-qwen2"))
    task = load_task(TaskConfig(name="arithmetic", max_value=9, train_size=20, eval_size=10, scorer="flexible"))
    return model, tok, task


def test_batched_generation_keeps_input_order_and_matches_single_prompts():
    model, tok, task = _setup()
    problems = task.eval_problems()
    prompts = prompts_for(tok, task, problems)
    cfg = EvalConfig(batch_size=4, max_new_tokens=6)
    batched = generate(model, tok, prompts, cfg)
    single = [generate(model, tok, [p], cfg)[0] for p in prompts]
    assert batched == single  # left padding does not change greedy outputs


def test_eval_uses_the_same_scorer_as_the_reward():
    model, tok, task = _setup()
    result = evaluate(model, tok, task, task.eval_problems(), EvalConfig(batch_size=5, max_new_tokens=6))
    assert result.n == 10 and len(result.records) == 10
    rewards = reward_fn("flexible")([r["completion"] for r in result.records], [r["answer"] for r in result.records])
    assert [float(r["flexible"]) for r in result.records] == rewards
    assert result.accuracy_flexible == sum(rewards) / 10


def test_pass_at_k_is_at_least_one_sample():
    model, tok, task = _setup()
    result = evaluate(model, tok, task, task.eval_problems(), EvalConfig(batch_size=5, max_new_tokens=6, pass_k=2))
    assert 0.0 <= result.pass_at_k <= 1.0 and "pass_at_k" in result.metrics()


def test_base_cache_key_ignores_speed_settings_only():
    task = TaskConfig()
    key = base_cache_key("m", task, EvalConfig(), "torch.float32")
    assert key == base_cache_key("m", replace(task, train_size=7), EvalConfig(batch_size=3), "torch.float32")
    assert key != base_cache_key("m", replace(task, instruction="x"), EvalConfig(), "torch.float32")
    assert key != base_cache_key("m", task, EvalConfig(max_new_tokens=5), "torch.float32")
    assert key != base_cache_key("other", task, EvalConfig(), "torch.float32")
