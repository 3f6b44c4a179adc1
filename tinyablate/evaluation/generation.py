"""Generation evaluation: batched greedy pass@1 (strict and flexible), and sampled pass@k if asked.

    result = evaluate(model, tokenizer, task, task.eval_problems(), EvalConfig())   # tinyablate.config
    result.accuracy, result.accuracy_flexible, result.n, result.records

The scorer is the task's, the same one the GRPO reward uses. Completions come from tinyablate's engine
or HF `generate` (`eval.engine`), batched by prompt length. Under several ranks each scores its share
(shards.py). `evaluation.evaluate_task` calls this for generation tasks; the base model's accuracy is
cached by records.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..config import EvalConfig
from ..engine import Sampling, engine_for, resolve_engine
from ..quantization import base_quantization
from .shards import score_across_ranks


@dataclass
class EvalResult:
    accuracy: float  # strict: \boxed{} or ####
    accuracy_flexible: float  # the last number in the completion
    n: int
    pass_at_k: Optional[float] = None
    records: list = field(default_factory=list)  # per problem: id, completion, extracted answers, scores

    def metrics(self) -> dict:
        out = {"accuracy": self.accuracy, "accuracy_flexible": self.accuracy_flexible, "n_eval": self.n}
        if self.pass_at_k is not None:
            out["pass_at_k"] = self.pass_at_k
        return out


def prompts_for(tokenizer, task, problems) -> list[str]:
    return [
        tokenizer.apply_chat_template(task.messages(p), add_generation_prompt=True, tokenize=False) for p in problems
    ]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], cfg: EvalConfig, do_sample=False, progress=None) -> list[str]:
    """Completions for `prompts`, batched by length (left padding), returned in input order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Optional[str]] = [None] * len(prompts)
    device = next(model.parameters()).device
    engine = resolve_engine(cfg.engine, device.type, base_quantization(model))
    if engine != "hf":
        return _engine_generate(model, tokenizer, prompts, order, cfg, do_sample, engine == "graph", progress)
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start : start + cfg.batch_size]
        batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v.to(device) for k, v in batch.items()}
        sampling = (
            dict(do_sample=True, temperature=cfg.temperature, top_p=1.0, top_k=0)
            if do_sample
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        )
        tokens = model.generate(
            **batch, max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
        )
        texts = tokenizer.batch_decode(tokens[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text in zip(idx, texts):
            out[i] = text
        if progress is not None:
            progress.update(len(idx))
    return out  # type: ignore[return-value]


def _engine_generate(model, tokenizer, prompts, order, cfg: EvalConfig, do_sample, use_graphs, progress) -> list:
    """generate() through tinyablate's engine, in batches of cfg.engine_batch_size."""
    eos = model.generation_config.eos_token_id
    eos = [tokenizer.eos_token_id] if eos is None else (eos if isinstance(eos, list) else [eos])
    engine = engine_for(model, tokenizer.pad_token_id, eos, use_graphs=use_graphs)
    sampling = Sampling(temperature=cfg.temperature) if do_sample else Sampling()
    tokens = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    # The cache for the whole evaluation at once: batches come shortest first, and a cache grown batch by
    # batch would drop and recapture the decode graphs at every growth.
    engine.reserve(min(cfg.engine_batch_size, len(prompts)), max(map(len, tokens)) + cfg.max_new_tokens)
    out: list = [None] * len(prompts)
    for start in range(0, len(order), cfg.engine_batch_size):
        idx = order[start : start + cfg.engine_batch_size]
        completions = engine.generate([tokens[i] for i in idx], cfg.max_new_tokens, sampling)
        for i, text in zip(idx, tokenizer.batch_decode(completions, skip_special_tokens=True)):
            out[i] = text
        if progress is not None:
            progress.update(len(idx))
    return out


def evaluate(model, tokenizer, task, problems, cfg: EvalConfig, desc: str = "eval") -> EvalResult:
    """Greedy pass@1 over `problems` with the task's scorer (and sampled pass@k if asked).

    Under several ranks each scores its share (round robin) and the records are gathered in the
    problems' order, so every rank returns the same result and each problem is scored exactly once.
    """
    records = score_across_ranks(model, problems, lambda mine: _score_problems(model, tokenizer, task, mine, cfg, desc))
    n = len(records)
    result = EvalResult(
        accuracy=sum(r["strict"] for r in records) / max(n, 1),
        accuracy_flexible=sum(r["flexible"] for r in records) / max(n, 1),
        n=n,
        records=records,
    )
    if cfg.pass_k:
        result.pass_at_k = sum(r["solved_at_k"] for r in records) / max(n, 1)
    return result


def _score_problems(model, tokenizer, task, problems, cfg: EvalConfig, desc: str) -> list:
    """One record per problem: completion, extracted answers, strict/flexible scores (+ pass@k).
    The progress bar advances once per generated batch (tests/fault_driver.py kills at the n-th)."""
    prompts = prompts_for(tokenizer, task, problems)
    with tqdm(total=len(prompts), desc=desc, unit="problem", leave=False) as bar:
        completions = generate(model, tokenizer, prompts, cfg, progress=bar)
    records = []
    for problem, completion in zip(problems, completions):
        s = task.score(completion, problem)
        records.append(
            {
                "id": problem.id,
                "answer": problem.answer,
                "completion": completion,
                "extracted_strict": s.extracted_strict,
                "extracted_flexible": s.extracted_flexible,
                "strict": s.strict,
                "flexible": s.flexible,
            }
        )
    if cfg.pass_k:
        for record, solved in zip(records, _solved_at_k(model, tokenizer, task, problems, prompts, cfg)):
            record["solved_at_k"] = solved
    return records


def _solved_at_k(model, tokenizer, task, problems, prompts, cfg: EvalConfig) -> list:
    """Per problem: at least one strictly correct answer among k samples."""
    solved = [False] * len(problems)
    for _ in range(cfg.pass_k):
        for i, text in enumerate(generate(model, tokenizer, prompts, cfg, do_sample=True)):
            solved[i] = solved[i] or task.score(text, problems[i]).strict
    return solved
