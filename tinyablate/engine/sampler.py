"""Sampling inside the engine's decode step: how each row's next token is chosen from the logits.

`Sampling` says how (greedy, temperature + top-k + top-p, or keyed Gumbel noise); a `Sampler` does it on
the decode state's fixed buffers (engine/cache.py), so a CUDA graph captures it with the rest of the step:

    sampler.sample_next(logits, state, sampling, pad, eos)   # token at state.step, EOS flags, log-probs

The keyed sampler computes exactly tinyablate/sampling.py's scores (`noisy_scores`, `top_p_filter`,
`vocab_hash`: the library TRL's HF path samples with), so keyed rollouts equal HF's. The other draws are
exact categorical draws without a host sync (the exponential race); plain temperature sampling runs as one
compiled kernel when the engine compiles (`exponential_race`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling import mix32, noisy_scores, top_p_filter, vocab_hash


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0: greedy. keyed: Gumbel noise keyed per row (needs keys)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    keyed: bool = False

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling {self}: temperature >= 0, top_p in (0, 1], top_k >= 0")
        if self.keyed and self.temperature == 0:
            raise ValueError("keyed sampling needs a temperature > 0")
        if self.keyed and self.top_k:
            raise ValueError("keyed sampling does not apply top_k (as tinyablate/sampling.py's sampler)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """One engine's sampling. compiled: the engine's compiled functions (engine/compiled.py EngineCompiled);
    compiled_race: plain temperature sampling through the compiled exponential race (one fused kernel)."""

    def __init__(self, compiled, compiled_race: bool):
        self.compiled = compiled
        self.compiled_race = compiled_race
        self._vocab_hash = None  # keyed sampling: the per-token hashes, made once per vocabulary size

    def sample_next(self, logits: torch.Tensor, state, sampling: Sampling, pad: int, eos: torch.Tensor) -> None:
        """Pick each row's token at state.step, pad for finished rows, record it, update the EOS flags.

        state: the decode state (engine/cache.py DecodeState); eos: the EOS ids as a tensor (a captured graph
        reads its memory)."""
        token, logp = self.next_tokens(logits, state, sampling)
        token = torch.where(state.done, pad, token)
        state.out.index_copy_(1, state.step, token[:, None])
        if logp is not None:
            state.logp.index_copy_(1, state.step, torch.where(state.done, 0.0, logp)[:, None])
        state.done |= torch.isin(token, eos)
        state.tokens.copy_(token)

    def next_tokens(self, logits: torch.Tensor, state, sampling: Sampling) -> tuple:
        """(the next token of each row, its log-probability under softmax(logits / T); None when greedy)."""
        if sampling.greedy:  # float32 holds every bf16/fp16 value exactly: the same argmax without the cast
            return logits.argmax(-1), None
        if self.compiled_race and not (
            sampling.keyed or sampling.top_k or sampling.top_p < 1
        ):  # compiled: one fused kernel
            # The noise is drawn outside compiled code by exponential_ (torch's generator, which a CUDA graph
            # replay advances). Drawn inside the kernel instead (torch.rand compiled), the sampling kernel was
            # slower than the two apart (measured: benchmarks/RESULTS.md).
            noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_()
            return self.compiled(exponential_race, logits.shape[0])(logits, noise, sampling.temperature)
        scores = logits.float() / sampling.temperature
        token = self._draw(scores, state, sampling)
        return token, token_logprob(scores, token)

    def _draw(self, scores: torch.Tensor, state, sampling: Sampling) -> torch.Tensor:
        """The sampled token of each row from the temperature-scaled scores (eager: keyed, top-k or top-p)."""
        if sampling.keyed:  # exactly KeyedGumbelSampler's scores (tinyablate/sampling.py), then their argmax
            if sampling.top_p < 1:
                scores = top_p_filter(scores, sampling.top_p)
            if self._vocab_hash is None or self._vocab_hash.numel() != scores.shape[1]:
                self._vocab_hash = vocab_hash(scores.shape[1], scores.device)
            noisy = noisy_scores(scores.is_cuda)(scores, state.keys, self._vocab_hash, mix32(state.step))
            return noisy.argmax(-1)
        if sampling.top_k:
            kth = scores.topk(min(sampling.top_k, scores.shape[1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if sampling.top_p < 1:
            scores = top_p_filter(scores, sampling.top_p)
        # An exact categorical draw without a host sync: argmax of p / Exp(1) (the exponential race; exponential_
        # draws from torch's generator, which a CUDA graph replay advances, so replays draw new noise).
        return (scores.softmax(-1) / torch.empty_like(scores).exponential_()).argmax(-1)


def exponential_race(logits, noise, temperature: float):
    """argmax of softmax(logits / T) / noise, noise ~ Exp(1): an exact categorical draw (one fused kernel),
    and the drawn token's log-probability under softmax(logits / T).

    Computed as argmax(logits / T - log noise) (log is monotone and log softmax = logits / T - a per-row
    constant, i.e. the Gumbel-max form): the logits (any float dtype, read as float32) are read once for the
    draw and once for the log-sum-exp.
    """
    scores = logits.float() / temperature
    token = (scores - noise.log()).argmax(-1)
    return token, token_logprob(scores, token)


def token_logprob(scores, token):
    """log softmax(scores)[row, token[row]] in float32, without materialising the log-softmax."""
    return scores.gather(-1, token[:, None])[:, 0] - scores.logsumexp(-1)
