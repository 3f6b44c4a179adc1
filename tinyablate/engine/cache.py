"""The engine's memory: the KV cache, and the decode state of one batch bucket.

- `KVCache`: one (rows, kv heads, length, head dim) tensor per layer for keys and one for values, allocated
  for the largest (rows, prompt + new tokens) asked so far and reused (GenerationEngine.reserve).
  `kv_cache_bytes` sizes it before allocating (train/rollouts.py checks that it fits).
- `DecodeState`: the decode step's fixed buffers for one number of rows (tokens, positions, the slot written,
  masks, outputs): everything a captured CUDA graph reads and writes, so a replay only needs them updated
  in place. The engine keeps one per batch bucket.
- `left_pad` and `dedupe`: the prompt batch as the cache holds it (left-padded; identical prompts, GRPO's
  generations of one prompt, found so they are prefilled once).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..kernels import head_dim


def kv_cache_bytes(config, batch: int, length: int, dtype: torch.dtype) -> int:
    """Bytes of the engine's KV cache for `batch` rows of `length` tokens."""
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config)
    return per_token * batch * length * torch.empty((), dtype=dtype).element_size()


class KVCache:
    """Per decoder layer a keys and a values tensor (rows, kv heads, length, head dim); None until allocated.

    decoder: the model's decoder (its layers, attention shape, dtype and device size the cache)."""

    def __init__(self, decoder):
        attn = decoder.layers[0].self_attn
        self.layers = len(decoder.layers)
        self.head_dim = attn.head_dim
        self.kv_heads = attn.k_proj.out_features // attn.head_dim
        self.dtype = decoder.embed_tokens.weight.dtype
        self.device = decoder.embed_tokens.weight.device
        self.keys: Optional[list] = None
        self.values: Optional[list] = None
        self.rows = self.length = 0

    def allocate(self, rows: int, length: int) -> None:
        shape = (rows, self.kv_heads, length, self.head_dim)
        n = self.layers
        # Zeros, not empty: masked keys beyond the written slots are still read (x 0), so never NaN.
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)]
        self.rows, self.length = rows, length

    def free(self) -> None:
        self.keys = self.values = None
        self.rows = self.length = 0

    @property
    def bytes(self) -> int:
        return 0 if self.keys is None else 2 * sum(t.numel() * t.element_size() for t in self.keys)


class DecodeState:
    """The decode step's fixed buffers for one batch bucket (what a captured graph reads and writes).

    rows: the bucket's rows; length: the KV cache's length; max_new: the most new tokens it records.
    """

    def __init__(self, rows: int, length: int, max_new: int, device):
        long = dict(dtype=torch.long, device=device)
        self.tokens = torch.zeros(rows, **long)  # the token fed at this step
        self.pos = torch.zeros(rows, **long)  # its position id
        self.slot = torch.zeros(1, **long)  # its cache slot (the same for every row: left padding)
        self.step = torch.zeros(1, **long)  # index of the token being sampled among the new ones
        self.valid = torch.zeros(rows, length, dtype=torch.bool, device=device)  # keys a row may attend to
        self.start = torch.zeros(rows, **long)  # its first valid key (after the left padding): valid = [start, slot]
        self.src = torch.arange(rows, **long)  # the cache row whose prompt keys it reads (identical prompts share)
        self.prompt_end = torch.zeros(1, **long)  # the prompt region's end
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.out = torch.zeros(rows, max_new, **long)
        # log p of each sampled token under softmax(logits / temperature) (the distribution GRPO's training
        # scores; top-p/top-k filtering aside); 0 for greedy decoding and after a row's EOS
        self.logp = torch.zeros(rows, max_new, dtype=torch.float32, device=device)
        self.keys = torch.zeros(rows, **long)  # keyed sampling: one 32-bit key per row

    def begin(self, prompts: int, keys: Optional[Sequence[int]]) -> None:
        """A new generation of `prompts` rows (the bucket's other rows: finished fillers), keyed by `keys`."""
        self.done.zero_()
        self.done[prompts:] = True  # bucket filler rows
        self.keys.zero_()
        if keys is not None:
            self.keys[:prompts] = torch.tensor([int(k) for k in keys], dtype=torch.long)

    def advance(self) -> None:
        """To the next new token: its position, cache slot and index among the new tokens."""
        self.pos.add_(1)
        self.slot.add_(1)
        self.step.add_(1)

    def _written(self):
        return (self.tokens, self.pos, self.slot, self.step, self.valid, self.done, self.out, self.logp)

    def snapshot(self):
        return [t.clone() for t in self._written()]

    def restore(self, saved) -> None:
        for t, s in zip(self._written(), saved):
            t.copy_(s)


def left_pad(prompts: Sequence[Sequence[int]], rows: int, width: int, pad: int) -> tuple:
    """(ids, attention mask) of the prompts left-padded to `width`, in `rows` rows (on the CPU)."""
    ids = torch.full((rows, width), pad, dtype=torch.long)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p))
        mask[i, width - len(p) :] = 1
    return ids, mask


def dedupe(ids: torch.Tensor) -> tuple[list, list]:
    """(the first row index of each distinct row of `ids`, each row's position among those)."""
    first: dict = {}
    source = [first.setdefault(tuple(row), len(first)) for row in ids.tolist()]
    unique = [0] * len(first)
    for r, u in reversed(list(enumerate(source))):
        unique[u] = r
    return unique, source
