"""Evaluation: order, scoring through the task's scorer, pass@k, base cache keys."""

from __future__ import annotations

from dataclasses import replace

from tinyablate.config import EvalConfig, ModelConfig, TaskConfig
from tinyablate.evaluation import base_cache_key, evaluate, generate, prompts_for
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


def test_engine_evaluation_reserves_its_cache_once(monkeypatch):
    """Batches run shortest first; the engine's KV cache is sized for the longest before the first batch,
    so it never grows (a growth drops the captured decode graphs) and the outputs are HF generate's."""
    from tinyablate.engine import GenerationEngine

    model, tok, task = _setup()
    prompts = prompts_for(tok, task, task.eval_problems())
    prompts[-1] += " and then some more words to make this one the longest prompt"
    sizes = []
    real = GenerationEngine.generate

    def recording(self, *args, **kwargs):
        sizes.append((self.cache.rows, self.cache.length))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GenerationEngine, "generate", recording)
    cfg = EvalConfig(batch_size=4, max_new_tokens=6, engine="eager", engine_batch_size=4)
    ours = generate(model, tok, prompts, cfg)
    assert len(sizes) == 3 and len(set(sizes)) == 1  # 10 prompts in batches of 4: one size throughout
    longest = max(len(ids) for ids in tok(prompts, add_special_tokens=False)["input_ids"])
    assert sizes[0][0] == 4 and sizes[0][1] >= longest + 6
    assert ours == generate(model, tok, prompts, replace(cfg, engine="hf"))
