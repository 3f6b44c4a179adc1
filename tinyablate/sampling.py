"""Keyed rollout sampling: each completion's randomness is a function of what it is, not of where it ran.

With `algo.rollout_sampler=keyed`, the token sampled at position t of a completion is

    argmax_v( logits_v / T + Gumbel(hash(seed, step, prompt row, sample number, t, v)) )

which is an exact draw from softmax(logits / T) (the Gumbel-max trick), with noise from a counter-
based hash instead of a stateful generator. The same (seed, step, prompt, sample number) gives the
same completion whatever the batch split, padding, number of ranks or device, so a 2-GPU GRPO run
samples the same rollouts as a 1-GPU run with the same global batch. The default sampler (`torch`,
TRL's own) draws from per-rank generators instead: equally valid, but it depends on the layout.

This module is the ground floor both samplers stand on (torch only): TRL's HF generation samples with
`KeyedGumbelSampler` (switched in by the trainer, train/trl_seam.py), the generation engine with the same
scores (engine/sampler.py); both check their keys with `check_keys`.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

import torch

from .kernels import compiled

_M32 = 0xFFFFFFFF


def mix32(x):
    """A 32-bit integer hash (lowbias32), on Python ints or int64 tensors holding values < 2**32.

    Products are masked to 32 bits, so int64 wrap-around never changes the result: CPU and GPU agree.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def sequence_key(seed: int, step: int, row: int, sample: int) -> int:
    """The 32-bit key of one completion: training seed, generation step, dataset row, sample number."""
    key = mix32(seed & _M32)
    for part in (step, row, sample):
        key = mix32(key ^ (part & _M32))
    return key


def rollout_keys(seed: int, step: int, rows_by_rank: Sequence[Sequence[int]], rank: int) -> list:
    """Keys of rank `rank`'s completions, from every rank's dataset rows (in rank order).

    A prompt repeated G times in the generation batch (its GRPO group) gets sample numbers 0..G-1 by
    its position in the global batch, so the keys do not depend on how the batch is split.
    """
    seen: Counter = Counter()  # copies of each row met so far, in global order
    keys_by_rank = []
    for rows in rows_by_rank:
        keys = []
        for row in rows:
            keys.append(sequence_key(seed, step, row, seen[row]))
            seen[row] += 1
        keys_by_rank.append(keys)
    return keys_by_rank[rank]


def check_keys(keys: Optional[Sequence[int]], prompts: int) -> None:
    """Keyed sampling needs one key per prompt (the engine's generate, and TRL's generation in
    train/trl_seam.py, check here)."""
    if keys is None or len(keys) != prompts:
        got = "no" if keys is None else len(keys)
        raise ValueError(f"keyed sampling needs one key per prompt: {got} keys for {prompts} prompts")


class KeyedGumbelSampler:
    """A logits processor that turns greedy decoding into keyed sampling at `temperature` (and top_p).

    Use with do_sample=False: the argmax of the returned scores is the sampled token. One instance per
    generate() call; `keys` holds one 32-bit key per batch row.
    """

    def __init__(self, keys: Sequence[int], temperature: float, top_p: float = 1.0):
        self.keys = torch.tensor(list(keys), dtype=torch.int64)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.start: Optional[int] = None
        self._vocab_hash: Optional[torch.Tensor] = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]  # the padded prompt length: t counts generated tokens only
        t = input_ids.shape[1] - self.start
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            scores = top_p_filter(scores, self.top_p)
        self._prepare(scores.shape[1], scores.device)
        step = torch.tensor(mix32(t), dtype=torch.int64, device=scores.device)
        return noisy_scores(scores.is_cuda)(scores, self.keys, self._vocab_hash, step)

    def noise(self, t: int, vocab: int, device) -> torch.Tensor:
        """Gumbel(0, 1) noise of shape (rows, vocab) for generated position t."""
        self._prepare(vocab, device)
        step = torch.tensor(mix32(t), dtype=torch.int64, device=device)
        zeros = torch.zeros(len(self.keys), vocab, device=device)
        return _add_gumbel(zeros, self.keys, self._vocab_hash, step)

    def _prepare(self, vocab: int, device) -> None:
        if self._vocab_hash is None or self._vocab_hash.device != torch.device(device):
            self._vocab_hash = vocab_hash(vocab, device)
            self.keys = self.keys.to(device)


def vocab_hash(vocab: int, device) -> torch.Tensor:
    """The per-token-id hash the keyed noise mixes with a row's key and the step (one int64 per token id)."""
    return mix32(torch.arange(vocab, dtype=torch.int64, device=device) * 0x9E3779B1 & _M32)


def _add_gumbel(scores: torch.Tensor, keys: torch.Tensor, vocab_hash: torch.Tensor, step: torch.Tensor):
    """scores + Gumbel noise hashed from (row key, step, token id): one elementwise pass."""
    rows = mix32(keys ^ step)
    bits = mix32(rows[:, None] ^ vocab_hash[None, :]) >> 8  # 24 uniform bits
    uniform = (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return scores - torch.log(-torch.log(uniform))


def noisy_scores(cuda: bool):
    """The function scores + keyed Gumbel noise (scores, keys, vocab_hash, step): on CUDA the ~20 elementwise
    integer and float ops are fused into one kernel by torch.compile (eager they cost a pass over a
    (rows x vocab) int64 tensor each), compiled once per process (tinyablate/kernels.py `compiled`: dynamic
    shapes, whole, no emulate_precision_casts: its float work is float32); on CPU they run
    eagerly."""
    if not cuda:
        return _add_gumbel
    return compiled(_add_gumbel, dynamic=True, fullgraph=True, hf_rounding=False)


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """`scores` with -inf outside the smallest set of top tokens whose probability reaches top_p."""
    sorted_scores, order = torch.sort(scores, descending=True)
    probs = sorted_scores.softmax(-1)
    drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix whose mass reaches top_p
    return scores.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
