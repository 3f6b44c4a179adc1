"""Multiple-choice evaluation by per-choice log-likelihood, as the standard evaluation harness does.

    result = evaluate_choices(model, tokenizer, task, task.eval_problems(), EvalConfig())
    result.metrics("acc")   # {"accuracy", "acc", "acc_norm", "n_eval", "chance"}

For every problem and choice, the log-likelihood of the continuation (" " + choice) given the
plain-text context (few-shot examples included) is the sum of the log-probabilities of its tokens.
`acc` picks the choice with the highest sum, `acc_norm` the highest sum divided by the choice's length
in characters; either pick is scored by the task's one scorer (`tasks.choice.score_choice`).

Tokens, as in the harness: the context is encoded with the tokenizer's special tokens (a BOS where the
family uses one), context + continuation likewise, and the continuation's tokens are those of the whole
beyond the context's (trailing spaces of the context move to the continuation first). The model reads a
pair's context and continuation but its last token; pairs with the same input share one row (MMLU's
four letters: one forward per question). Rows are batched by length with left padding and explicit
position ids, so a padded row scores what it would alone (tested against one-at-a-time scoring);
logits are kept only for the continuation positions. Under several ranks each scores its share (shards.py).
`evaluation.evaluate_task` calls this for multiple-choice tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..tasks.choice import score_choice
from .shards import score_across_ranks


@dataclass
class ChoiceEvalResult:
    acc: float  # the highest log-likelihood choice is the gold one
    acc_norm: float  # the highest log-likelihood per character
    n: int
    chance: float  # mean of 1 / number of choices: what guessing scores
    records: list = field(default_factory=list)  # per problem: id, gold, log-likelihoods, picks

    def metrics(self, scorer: str) -> dict:
        """`accuracy` is the task's scorer ("acc" or "acc_norm"); both are kept under their names."""
        return {
            "accuracy": self.acc if scorer == "acc" else self.acc_norm,
            "acc": self.acc,
            "acc_norm": self.acc_norm,
            "n_eval": self.n,
            "chance": self.chance,
        }


def evaluate_choices(model, tokenizer, task, problems, cfg, desc: str = "eval") -> ChoiceEvalResult:
    """Score every problem by per-choice log-likelihood; `cfg.batch_size` sequences per forward.

    Under several ranks each scores its share and the records are gathered in the problems' order.
    """
    records = score_across_ranks(model, problems, lambda mine: _score_problems(model, tokenizer, task, mine, cfg, desc))
    n = max(len(records), 1)
    return ChoiceEvalResult(
        acc=sum(r["correct"] for r in records) / n,
        acc_norm=sum(r["correct_norm"] for r in records) / n,
        n=len(records),
        chance=sum(1 / len(r["loglik"]) for r in records) / n,
        records=records,
    )


def _score_problems(model, tokenizer, task, problems, cfg, desc: str) -> list:
    """One record per problem: gold, per-choice log-likelihoods, the picks by acc and acc_norm, correctness."""
    requests = [(task.context(p), continuation) for p in problems for continuation in task.continuations(p)]
    with tqdm(total=len(requests), desc=desc, unit="choice", leave=False) as bar:
        logliks = continuation_logliks(model, tokenizer, requests, cfg.batch_size, progress=bar)
    records, start = [], 0
    for problem in problems:
        scores = logliks[start : start + len(problem.choices)]
        start += len(problem.choices)
        per_char = [s / max(len(choice), 1) for s, choice in zip(scores, problem.choices)]
        pick, pick_norm = _argmax(scores), _argmax(per_char)
        records.append(
            {
                "id": problem.id,
                "gold": problem.gold,
                "loglik": scores,
                "pred": pick,
                "pred_norm": pick_norm,
                "correct": score_choice(pick, problem).correct,
                "correct_norm": score_choice(pick_norm, problem).correct,
            }
        )
    return records


def _argmax(values: list) -> int:
    return max(range(len(values)), key=lambda i: values[i])  # the first of equal maxima, as numpy's


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list, list]:
    """(context tokens, continuation tokens) as the harness encodes a pair."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=True)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=True)["input_ids"]
    if not context_ids:
        raise ValueError("an empty context (and no BOS token) leaves nothing to condition the first token on")
    return context_ids, whole[len(context_ids) :]


@torch.no_grad()
def continuation_logliks(model, tokenizer, requests: list, batch_size: int, progress=None) -> list:
    """Sum of log p(continuation tokens | context) for each (context, continuation) pair, in order.

    A pair's input is its context and its continuation but the last token; pairs with the same input
    (MMLU's four one-letter choices after one context) share one row, read at the same positions.
    """
    encoded = [encode_pair(tokenizer, context, continuation) for context, continuation in requests]
    for (_, continuation), (_, target) in zip(requests, encoded):
        if not target:
            raise ValueError(f"the continuation {continuation!r} adds no token to its context")
    rows: dict = {}
    for i, (context_ids, target) in enumerate(encoded):
        rows.setdefault(tuple(context_ids + target[:-1]), []).append(i)
    inputs = sorted(rows, key=len, reverse=True)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = [0.0] * len(encoded)
    for start in range(0, len(inputs), batch_size):
        batch = inputs[start : start + batch_size]
        width = max(len(row) for row in batch)
        ids = torch.tensor([[pad] * (width - len(row)) + list(row) for row in batch], device=device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in batch], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(len(encoded[i][1]) for row in batch for i in rows[row])
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for b, row in enumerate(batch):
            for i in rows[row]:  # the last len(target) positions predict the target's tokens
                target = encoded[i][1]
                steps = logprobs[b, keep - len(target) :]
                out[i] = float(steps.gather(-1, torch.tensor(target, device=device)[:, None]).sum())
                if progress is not None:
                    progress.update(1)
    return out
