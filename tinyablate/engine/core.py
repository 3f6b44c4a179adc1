"""GenerationEngine: batched left-padded prefill, then a fixed-shape decode step, replayed from CUDA graphs.

The engine runs the model's own modules (embeddings, RMSNorms, q/k/v/o projections, MLPs, rotary
embedding, lm_head) in its own loop, so every adapter on them (TinyLoRA / LoRA-XS fused layers, PEFT
LoRA) is in the computation; only the cache and the attention over it are the engine's:

- KV cache: one (batch, kv heads, length, head dim) tensor per layer for keys and one for values,
  allocated for the largest (batch, prompt + new tokens) asked so far and reused (`reserve`).
- prefill: the whole left-padded prompt batch in one forward; pad tokens attend only to themselves
  (so nothing is NaN) and no real token attends to a pad. Identical prompts (GRPO's generations of
  one prompt) are computed once and their cache rows and logits copied to the duplicates.
- decode step: embed the last tokens, every layer (the new key/value written at slot P + t), the
  logits of that position, sampling (greedy, temperature + top-k + top-p, or the keyed Gumbel sampler
  of tinyablate/sampling.py), finished rows forced to pad, per-row EOS flags, counters advanced. All of it
  reads and writes fixed buffers, so on CUDA it is captured once per (batch bucket, key-length
  bucket, sampling) and replayed; the host only checks every `check_every` steps whether all rows
  are done (early exit).
- packed projections (engine/packing.py): q/k/v run as one matmul and gate/up as one, over stacked
  weights that hold each layer's effective weight (a fused adapter merges straight into its rows).
- weights: before a generation the adapters' fused weights are re-merged for the current v (in
  place, the same storage), the packed weights refreshed, and a signature of every weight tensor the
  step reads (addresses and adapter states) is compared with the one the graphs were captured with;
  any change (a dropped
  merged cache, adapters disabled or merged, a device move) drops the graphs, which are captured
  again. A replay therefore never reads a stale or freed weight.

Positions follow HF generate (cumulative attention mask minus one), so greedy tokens match it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from ..adapters.layers import SVDAdapterLinear
from ..sampling import mix32, noisy_scores, top_p_filter, vocab_hash
from . import fused
from .fused import rms_norm as _rms_norm
from .attention import available as attention_kernel_available
from .attention import decode_attention
from .attention import splits_for as decode_attention_splits
from .packing import PackedLinear, pack_group

ARCHITECTURES = ("qwen2", "llama")


class LayerPacks(NamedTuple):
    """A decoder layer's packed projections (engine/packing.py); None where its layers cannot be packed."""

    qkv: Optional[PackedLinear]
    o: Optional[PackedLinear]
    gate_up: Optional[PackedLinear]
    down: Optional[PackedLinear]


_NO_PACKS = LayerPacks(None, None, None, None)


class DecodeMask(NamedTuple):
    """Which cached keys a row attends to at a decode step, in the forms the attention kernels take."""

    valid: torch.Tensor  # (rows, 1, 1, keys) bool
    start: torch.Tensor  # (rows,): first valid key (after the left padding)
    slot: torch.Tensor  # (1,): the slot written at this step, the last valid key
    src: torch.Tensor  # (rows,): the cache row holding this row's prompt keys (shared by identical prompts)
    prompt_end: torch.Tensor  # (1,): the prompt region's end (the left-padded prompts' width)


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


def causal_lm_parts(model):
    """(causal LM, decoder) of a Qwen2/Llama model, a PeftModel around one, or a DDP-unwrapped one."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(lm.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"the generation engine supports {list(ARCHITECTURES)} models, not {model_type!r}: "
                         "use rollout_engine=hf / eval.engine=hf")
    layer_types = getattr(lm.config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError("the generation engine has no sliding-window attention: "
                         "use rollout_engine=hf / eval.engine=hf")
    return lm, lm.model


def kv_cache_bytes(config, batch: int, length: int, dtype: torch.dtype) -> int:
    """Bytes of the engine's KV cache for `batch` rows of `length` tokens."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
    return per_token * batch * length * torch.empty((), dtype=dtype).element_size()


class _State:
    """The decode step's fixed buffers for one batch bucket (what a captured graph reads and writes)."""

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

    def _written(self):
        return (self.tokens, self.pos, self.slot, self.step, self.valid, self.done, self.out, self.logp)

    def snapshot(self):
        return [t.clone() for t in self._written()]

    def restore(self, saved) -> None:
        for t, s in zip(self._written(), saved):
            t.copy_(s)


class GenerationEngine:
    """Batched generation for one model; see the module docstring. One engine per cell and rank.

    use_graphs: replay the decode step from CUDA graphs (default: on CUDA). length_bucket: graphs are
    captured for key lengths in multiples of it (the cache's length too). check_every: decode steps
    between the host's checks for all rows done (8 with graphs). attention: the decode step's
    attention, "triton" (engine/attention.py; the default on CUDA), "sdpa" (the default elsewhere) or
    "matmul". compile_glue (default: on CUDA): with every projection packed, compile each decoder layer
    of the decode step into two functions around the attention and the sampling draw into one kernel
    (engine/fused.py); otherwise compile the norms, rotary and SiLU x up one by one (CUDA only); the
    prefill's norms, rotary and SiLU x up are compiled too (dynamic shapes: any batch and width). Its bf16
    tokens agree with HF's as the uncompiled step's do (tests/test_engine_gpu.py); speed-ups are in
    benchmarks/RESULTS.md.
    pack: run q/k/v and gate/up as one matmul each over packed weights (engine/packing.py); layers
    that cannot be packed (PEFT LoRA, a quantized base, an unmerged adapter) are called one by one.
    share_prompts: the Triton attention reads the prompt keys of rows with identical prompts from one
    cache row (engine/attention.py), so the copies are not each read from HBM.
    """

    def __init__(self, model, pad_token_id: int, eos_token_ids: Sequence[int], use_graphs: Optional[bool] = None,
                 length_bucket: int = 64, check_every: Optional[int] = None, log=None, attention: Optional[str] = None,
                 compile_glue: Optional[bool] = None, pack: bool = True, share_prompts: bool = True):
        self.model = model
        self.lm, self.decoder = causal_lm_parts(model)
        self.pad, self.eos, self._eos_t = None, None, None
        device = self.decoder.embed_tokens.weight.device
        self.device = device
        compile_glue = device.type == "cuda" if compile_glue is None else bool(compile_glue)
        self.use_graphs = device.type == "cuda" if use_graphs is None else bool(use_graphs)
        if self.use_graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        # Fixed shapes (power-of-two batches, key lengths in multiples of length_bucket): what capture
        # needs; also settable without graphs, so CPU tests run the captured step's exact shapes.
        self.fixed_shapes = self.use_graphs
        self.length_bucket = int(length_bucket)
        # Decode attention: "triton" (engine/attention.py, flash decoding; CUDA), "sdpa" (torch's fused kernel,
        # fp32 softmax) or "matmul" (two grouped matmuls, scores rounded to the model dtype as HF's eager
        # attention does). Default: triton where it runs, else sdpa.
        if attention is None:
            attention = "triton" if attention_kernel_available(device) else "sdpa"
        if attention not in ("triton", "sdpa", "matmul"):
            raise ValueError(f"attention={attention!r}: 'triton', 'sdpa' or 'matmul'")
        if attention == "triton" and not attention_kernel_available(device):
            raise ValueError("attention='triton' needs Triton and a CUDA device")
        self.attention = attention
        self.share_prompts = bool(share_prompts)
        self._splits: dict = {}
        self.check_every = check_every or (8 if self.use_graphs else 1)
        self.log = log or (lambda msg: None)
        attn = self.decoder.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.kv_heads = attn.k_proj.out_features // attn.head_dim
        self.groups = attn.num_key_value_groups
        rope = self._rope = fused.plain_function(sys.modules[type(attn).__module__].apply_rotary_pos_emb)
        # The elementwise work between the matmuls (norms, residual adds, rotary, SiLU x up): HF's own math,
        # as plain functions; in the decode step on CUDA compiled into a few fused kernels (compile_glue).
        # The prefill's (any rows x width: dynamic shapes) and the decode step's (fixed shapes).
        self._glue = _Glue(self.decoder, rope, compiled=compile_glue and device.type == "cuda", dynamic=True)
        self._glue_decode = _Glue(self.decoder, rope, compiled=compile_glue and device.type == "cuda")
        self.dtype = self.decoder.embed_tokens.weight.dtype
        self._k = self._v = None
        self.rows = self.length = 0
        self._states: dict = {}
        self._graphs: dict = {}
        self.set_special_tokens(pad_token_id, eos_token_ids)
        self.captures = 0  # decode graphs captured so far (each costs a warm-up and a capture)
        self._pool = None
        self._signature = None
        self._vocab_hash = None
        self.pack = bool(pack)
        self._packs: list = [_NO_PACKS] * len(self.decoder.layers)
        # The decode step's layers and sampling draw as compiled functions (engine/fused.py), used while every
        # projection is packed; one compiled version per model shape and batch shape in a process (`_compiled`)
        self._tag = fused.model_tag(self.lm.config, self.dtype)
        self._compiled_fns: dict = {}
        self._fuse = bool(compile_glue and self.pack and self._glue.fused and fused.available())

    def set_special_tokens(self, pad_token_id: int, eos_token_ids: Sequence[int]) -> None:
        """The token finished rows are filled with and the tokens that finish a row.

        A captured decode graph bakes the pad id in and reads the EOS ids from `_eos_t`'s memory, so a change
        drops the graphs, and an unchanged call keeps the very same tensor: replacing it would free the memory
        the graphs read, and a later allocation (a training step's activations) would then decide which rows
        stop (rows ended mid-answer on a token they never sampled, logged as 20-56 nats of training-rollout
        mismatch: benchmarks/RESULTS.md, "GPU numerics").
        """
        pad, eos = int(pad_token_id), sorted({int(e) for e in eos_token_ids})
        if pad == self.pad and eos == self.eos:
            return
        self.pad, self.eos = pad, eos
        self._eos_t = torch.tensor(eos or [-1], device=self.device)
        if self._graphs:
            self.log("generation engine: pad or EOS tokens changed, recapturing the decode graphs")
            self._graphs.clear()

    # -- memory --------------------------------------------------------------------------------
    def reserve(self, rows: int, length: int) -> int:
        """Allocate the KV cache for `rows` x `length` tokens (rounded up to the length bucket); returns its bytes.

        Grows only: an existing larger cache is kept. Growing drops the captured graphs.
        """
        length = -(-length // self.length_bucket) * self.length_bucket
        if self._k is not None and rows <= self.rows and length <= self.length:
            return self.cache_bytes
        rows, length = max(rows, self.rows), max(length, self.length)
        self._k = self._v = None
        self._drop_graphs()
        shape = (rows, self.kv_heads, length, self.head_dim)
        n = len(self.decoder.layers)
        # Zeros, not empty: masked keys beyond the written slots are still read (x 0), so never NaN.
        self._k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)]
        self._v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)]
        self.rows, self.length = rows, length
        self.log(f"generation engine: KV cache {rows} rows x {length} tokens = {self.cache_bytes / 2**30:.2f} GiB")
        return self.cache_bytes

    @property
    def cache_bytes(self) -> int:
        return 0 if self._k is None else 2 * sum(t.numel() * t.element_size() for t in self._k)

    def release(self) -> None:
        """Free the cache and the graphs (a later generate() allocates them again)."""
        self._k = self._v = None
        self.rows = self.length = 0
        self._drop_graphs()
        self._packs = [_NO_PACKS] * len(self.decoder.layers)

    def _drop_graphs(self) -> None:
        self._graphs.clear()
        self._states.clear()
        self._pool = None
        self._signature = None

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 keys: Optional[Sequence[int]] = None, logprobs: bool = False):
        """One completion per prompt (token ids, up to and including the first EOS), in input order; with
        `logprobs`, also each token's log-probability under softmax(logits / temperature) as sampled (GRPO's
        training-rollout mismatch, train/rollouts.py): (completions, logprobs)."""
        if sampling.keyed and (keys is None or len(keys) != len(prompts)):
            raise ValueError("keyed sampling needs one key per prompt")
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt")
        was_training = self.model.training
        self.model.eval()  # no dropout in any adapter while sampling
        try:
            rows = self._bucket_rows(len(prompts))
            width = max(len(p) for p in prompts)
            self.reserve(rows, width + max_new_tokens)
            self.refresh_weights()
            tokens, logps = self._run(prompts, rows, width, max_new_tokens, sampling, keys, logprobs)
        finally:
            self.model.train(was_training)
        completions = [self._cut(row) for row in tokens[:len(prompts)]]
        if not logprobs:
            return completions
        return completions, [lp[:len(c)] for c, lp in zip(completions, logps)]

    def _cut(self, row: list) -> list:
        if not self.eos:
            return row
        for i, token in enumerate(row):
            if token in self.eos:
                return row[:i + 1]
        return row

    def _bucket_rows(self, n: int) -> int:
        if not self.fixed_shapes:
            return n
        rows = 1 << (n - 1).bit_length()  # graphs are captured for power-of-two batches
        return max(n, min(rows, max(self.rows, n)))

    def _run(self, prompts, rows, width, max_new, sampling, keys, logprobs: bool = False) -> tuple:
        st = self._state(rows, max_new)
        ids = torch.full((rows, width), self.pad, dtype=torch.long)
        mask = torch.zeros(rows, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.as_tensor(list(p))
            mask[i, width - len(p):] = 1
        unique, source = _dedupe(ids)
        ids, mask = ids.to(self.device), mask.to(self.device)
        st.done.zero_()
        st.done[len(prompts):] = True  # bucket filler rows
        st.keys.zero_()
        if keys is not None:
            st.keys[:len(prompts)] = torch.tensor([int(k) for k in keys], dtype=torch.long)
        logits = self._prefill(ids, mask, st, unique, source)
        st.step.zero_()
        self._choose(logits, st, sampling)  # the first new token, from the prefill's last position
        done_at = max_new
        for t in range(1, max_new):
            # Early exit: a host sync every check_every steps (none without an EOS token: no row can finish)
            if self.eos and t % self.check_every == 0 and bool(st.done.all()):
                done_at = t
                break
            kv_len = self._kv_len(width + t)
            if self.use_graphs:
                self._graph(rows, kv_len, sampling, max_new).replay()
            else:
                self._decode_step(st, kv_len, sampling)
        return st.out[:, :done_at].tolist(), (st.logp[:, :done_at].tolist() if logprobs else None)

    def _kv_len(self, used: int) -> int:
        if not self.fixed_shapes:
            return used  # exactly the keys written so far, as HF's dynamic cache
        return min(-(-used // self.length_bucket) * self.length_bucket, self.length)

    def _state(self, rows: int, max_new: int) -> _State:
        st = self._states.get(rows)
        if st is None or st.out.shape[1] < max_new:
            if st is not None:  # graphs write into the old buffers
                self._graphs = {k: g for k, g in self._graphs.items() if k[0] != rows}
            st = self._states[rows] = _State(rows, self.length, max_new, self.device)
        return st

    # -- the model, layer by layer ------------------------------------------------------------
    def _prefill(self, ids, mask, st: _State, unique: list, source: list) -> torch.Tensor:
        """The prompts' forward: cache rows and last-position logits of every row.

        `unique`: one row index per distinct prompt; `source[r]`: the position in `unique` of row r's prompt.
        """
        pos = mask.cumsum(-1) - 1
        pos.masked_fill_(mask == 0, 0)  # as HF generate (pads' positions are never attended to)
        st.valid.zero_()
        st.valid[:, :ids.shape[1]] = mask.bool()
        st.start.copy_((mask == 0).sum(-1))
        st.pos.copy_(pos[:, -1] + 1)
        st.slot.fill_(ids.shape[1])
        st.prompt_end.fill_(ids.shape[1])
        # Without the spread below, distinct prompt u stays in cache row u; with it, in its first row unique[u]
        st.src.copy_(torch.tensor(source if self._reads_shared_prompts else [unique[s] for s in source]))
        if len(unique) == ids.shape[0]:
            return self._forward_prompts(ids, mask, pos)
        pick = torch.tensor(unique, device=self.device)
        logits = self._forward_prompts(ids[pick], mask[pick], pos[pick])
        back = torch.tensor(source, device=self.device)
        width = ids.shape[1]
        if not self._reads_shared_prompts:  # else the decode attention reads each row's prompt from row src
            for cache in self._k + self._v:  # rows 0..len(unique)-1 hold the distinct prompts; spread them out
                cache[:len(source), :, :width] = cache[:len(unique), :, :width].index_select(0, back)
        return logits.index_select(0, back)

    def _forward_prompts(self, ids, mask, pos) -> torch.Tensor:
        """Prefill of distinct prompts into cache rows 0..len(ids)-1; the logits of each one's last position."""
        rows, width = ids.shape
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        attend = causal[None] & mask.bool()[:, None, :]
        attend |= torch.eye(width, dtype=torch.bool, device=self.device)[None]  # pads see themselves only
        x = self.decoder.embed_tokens(ids)
        cos, sin = self.decoder.rotary_emb(x, pos)
        def write(i, k, v):
            self._k[i][:rows, :, :width].copy_(k)
            self._v[i][:rows, :, :width].copy_(v)
            return _repeat_kv(k, self.groups), _repeat_kv(v, self.groups)

        return self.lm.lm_head(self._layers(x, cos, sin, attend[:, None], write))[:, -1]  # model dtype, as decode

    def _decode_step(self, st: _State, kv_len: int, sampling: Sampling) -> None:
        rows = st.tokens.shape[0]
        st.valid.index_fill_(1, st.slot, True)
        x = self.decoder.embed_tokens(st.tokens[:, None])
        cos, sin = self.decoder.rotary_emb(x, st.pos[:, None])
        mask = DecodeMask(st.valid[:, None, None, :kv_len], st.start, st.slot, st.src, st.prompt_end)

        def write(i, k, v):
            kc, vc = self._k[i][:rows], self._v[i][:rows]
            kc.index_copy_(2, st.slot, k)
            vc.index_copy_(2, st.slot, v)
            return kc[:, :, :kv_len], vc[:, :, :kv_len]

        if self._fuse and self._all_packed:
            h = self._fused_layers(x, cos, sin, mask, kv_len, rows)
        else:
            h = self._layers(x, cos, sin, mask, write, decode=True)
        logits = self.lm.lm_head(h)[:, -1]  # the model's dtype: _pick casts where it needs float32
        st.pos.add_(1)
        st.slot.add_(1)
        st.step.add_(1)
        self._choose(logits, st, sampling)

    def _layers(self, x, cos, sin, mask, write, decode: bool = False):
        """Every decoder layer, then the final norm, at the last position only (for its logits)."""
        glue = self._glue_decode if decode else self._glue
        delta = None
        for i, layer in enumerate(self.decoder.layers):
            ln1, ln2, mlp = layer.input_layernorm, layer.post_attention_layernorm, layer.mlp
            if delta is None:
                h = glue.norm(ln1, x)
            else:
                x, h = glue.add_norm(ln1, x, delta)  # the previous layer's residual add, fused with this norm
            packs = self._packs[i]
            o = self._attention(layer.self_attn, h, cos, sin, mask, i, write, decode, glue, packs.qkv)
            x, h = glue.add_norm(ln2, x, o)
            delta = glue.mlp(mlp, h, packs.gate_up)
        return glue.add_norm(self.decoder.norm, x[:, -1:], delta[:, -1:])[1]

    def _attend(self, q, keys, values, mask: DecodeMask, scaling: float):
        """Decode attention: q (rows, kv heads, groups, dim) over the cache's keys (rows, kv heads, length, dim)."""
        if self.attention == "triton":
            splits = self._splits.get(keys.shape[:3])
            if splits is None:
                rows, kv_heads, length = keys.shape[:3]
                splits = self._splits[keys.shape[:3]] = decode_attention_splits(rows, kv_heads, length, keys.device)
            shared = (mask.src, mask.prompt_end) if self.share_prompts else (None, None)
            return decode_attention(q, keys, values, mask.start, mask.slot, scaling, splits, *shared)
        if self.attention == "matmul":
            scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scaling
            probs = scores.masked_fill(~mask.valid, float("-inf")).softmax(-1).to(values.dtype)
            return torch.matmul(probs, values)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask.valid, scale=scaling)

    def _fused_layers(self, x, cos, sin, mask: DecodeMask, kv_len: int, rows: int):
        """The decode step's layers through the compiled functions of engine/fused.py (all projections packed)."""
        pre, post, final = (self._compiled(f, rows, self.length)
                            for f in (fused.pre_attention, fused.post_attention, fused.final_norm))
        delta = None
        for i, layer in enumerate(self.decoder.layers):
            p, ln1, ln2 = self._packs[i], layer.input_layernorm, layer.post_attention_layernorm
            kc, vc = self._k[i][:rows], self._v[i][:rows]
            x, q = pre(x, delta, ln1.weight, ln1.variance_epsilon, p.qkv.weight, p.qkv.bias, self._rope, cos, sin, kc, vc,
                       mask.slot, self.kv_heads * self.groups, self.kv_heads, self.head_dim)
            out = self._attend(q, kc[:, :, :kv_len], vc[:, :, :kv_len], mask, layer.self_attn.scaling)
            x, delta = post(x, out, p.o.weight, p.o.bias, ln2.weight, ln2.variance_epsilon, p.gate_up.weight,
                            p.gate_up.bias, p.down.weight, p.down.bias)
        norm = self.decoder.norm
        return final(x, delta, norm.weight, norm.variance_epsilon)

    def _attention(self, attn, h, cos, sin, mask, i, write, decode, glue, qkv=None):
        rows, length = h.shape[:2]
        shape = (rows, length, -1, self.head_dim)
        q, k, v = qkv(h) if qkv is not None else (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h))
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        q, k = glue.rope(q, k, cos, sin)
        keys, values = write(i, k, v)
        if decode:  # one query per head: the G heads sharing a kv head are its G "queries" (no repeat_kv)
            q = q.reshape(rows, self.kv_heads, self.groups, self.head_dim)
            out = self._attend(q, keys, values, mask, attn.scaling)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)
        out = out.reshape(rows, self.kv_heads * self.groups, length, self.head_dim).transpose(1, 2)
        return attn.o_proj(out.reshape(rows, length, -1))

    # -- sampling -------------------------------------------------------------------------------
    def _choose(self, logits: torch.Tensor, st: _State, sampling: Sampling) -> None:
        """Pick each row's token at st.step, pad for finished rows, record it, update the EOS flags."""
        nxt, logp = self._pick(logits, st, sampling)
        nxt = torch.where(st.done, self.pad, nxt)
        st.out.index_copy_(1, st.step, nxt[:, None])
        if logp is not None:
            st.logp.index_copy_(1, st.step, torch.where(st.done, 0.0, logp)[:, None])
        st.done |= torch.isin(nxt, self._eos_t)
        st.tokens.copy_(nxt)

    def _pick(self, logits: torch.Tensor, st: _State, s: Sampling) -> tuple:
        """(the next token of each row, its log-probability under softmax(logits / T); None when greedy)."""
        if s.greedy:  # float32 holds every bf16/fp16 value exactly: the same argmax without the cast
            return logits.argmax(-1), None
        if self._fuse and not (s.keyed or s.top_k or s.top_p < 1):  # compiled: one fused kernel
            # The noise is drawn outside compiled code by exponential_ (torch's generator, which a CUDA graph
            # replay advances). Drawn inside the kernel instead (torch.rand compiled), the sampling kernel took
            # 258 instead of 104 + 86 µs a step: benchmarks/RESULTS.md, session 4.
            noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_()
            return self._compiled(fused.exponential_race, logits.shape[0])(logits, noise, s.temperature)
        scores = logits.float() / s.temperature
        token = self._draw(scores, st, s)
        return token, fused.token_logprob(scores, token)

    def _draw(self, scores: torch.Tensor, st: _State, s: Sampling) -> torch.Tensor:
        """The sampled token of each row from the temperature-scaled scores (eager: keyed, top-k or top-p)."""
        if s.keyed:  # exactly KeyedGumbelSampler's scores (tinyablate/sampling.py), then their argmax
            if s.top_p < 1:
                scores = top_p_filter(scores, s.top_p)
            if self._vocab_hash is None or self._vocab_hash.numel() != scores.shape[1]:
                self._vocab_hash = vocab_hash(scores.shape[1], scores.device)
            noisy = noisy_scores(scores.is_cuda)(scores, st.keys, self._vocab_hash, mix32(st.step))
            return noisy.argmax(-1)
        if s.top_k:
            kth = scores.topk(min(s.top_k, scores.shape[1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if s.top_p < 1:
            scores = top_p_filter(scores, s.top_p)
        # An exact categorical draw without a host sync: argmax of p / Exp(1) (the exponential race; exponential_
        # draws from torch's generator, which a CUDA graph replay advances, so replays draw new noise).
        return (scores.softmax(-1) / torch.empty_like(scores).exponential_()).argmax(-1)

    def _compiled(self, fn, *batch_shape):
        """`fn` compiled for this model's shape and `batch_shape` (static shapes: each shape its own code),
        looked up once per engine and shape (an eager decode step asks for it every step)."""
        key = (fn, batch_shape)
        if key not in self._compiled_fns:
            self._compiled_fns[key] = fused.compiled(fn, "_".join(["engine", self._tag, *map(str, batch_shape)]))
        return self._compiled_fns[key]

    # -- CUDA graphs and fresh weights ------------------------------------------------------------
    def _graph(self, rows: int, kv_len: int, sampling: Sampling, max_new: int):
        key = (rows, kv_len, sampling)
        graph = self._graphs.get(key)
        if graph is not None:
            return graph
        st = self._states[rows]
        saved = st.snapshot()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (allocator, cuBLAS workspaces, compiled sampler)
            for _ in range(2):
                self._decode_step(st, kv_len, sampling)
                st.restore(saved)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None or not self._graphs:
            # The graphs share one memory pool. Once every graph that used it is gone, the allocator keeps the
            # pool (use count 0) until it can free its memory, and capturing into it again fails an internal
            # assert: a new pool whenever no graph is alive.
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._decode_step(st, kv_len, sampling)
        st.restore(saved)  # capture records kernels without running them; keep the state exact anyway
        self._graphs[key] = graph
        self.captures += 1
        return graph

    def refresh_weights(self) -> None:
        """Re-merge adapters' fused weights for the current v and refresh the packed weights; drop the
        captured graphs if any weight tensor the decode step reads moved or changed state."""
        if self.pack:
            self._refresh_packs()
        signature = [tuple(p.signature() if p is not None else None for p in packs) for packs in self._packs]
        for module in self.model.modules():
            if isinstance(module, SVDAdapterLinear):
                fused = module.enabled and not module.is_merged and module.forward_mode == "fused"
                if fused:
                    module.merged_weight()  # in place into the cached buffer when v changed
                w_eff = module.merged_weight_cache
                signature.append((module.enabled, not module.is_merged, module.forward_mode,
                                  w_eff.data_ptr() if fused and w_eff is not None else 0))
            else:
                for flag in ("merged", "disable_adapters", "active_adapters"):  # PEFT LoRA layers
                    if hasattr(type(module), flag) or flag in vars(module):
                        value = getattr(module, flag, None)
                        signature.append(tuple(value) if isinstance(value, list) else value)
            for tensors in (module._parameters, module._buffers):  # recurse=False, without the generators' cost
                signature.extend(t.data_ptr() for t in tensors.values() if t is not None)
        signature = tuple(signature)
        if signature != self._signature:
            if self._graphs:
                self.log("generation engine: weights changed place or state, recapturing the decode graphs")
            self._graphs.clear()
            self._signature = signature

    def _refresh_packs(self) -> None:
        """Each layer's packed weights (None where the layers cannot be packed), refreshed."""
        packs = []
        for layer, old in zip(self.decoder.layers, self._packs):
            attn, mlp = layer.self_attn, layer.mlp
            mlp_ok = self._glue.fused
            packs.append(LayerPacks(
                qkv=pack_group([attn.q_proj, attn.k_proj, attn.v_proj], old.qkv),
                o=pack_group([attn.o_proj], old.o),
                gate_up=pack_group([mlp.gate_proj, mlp.up_proj], old.gate_up) if mlp_ok else None,
                down=pack_group([mlp.down_proj], old.down) if mlp_ok else None))
        self._packs = packs

    @property
    def _reads_shared_prompts(self) -> bool:
        """The decode attention reads the prompt keys of identical prompts from one cache row (st.src)."""
        return self.attention == "triton" and self.share_prompts

    @property
    def _all_packed(self) -> bool:
        return all(p is not None for packs in self._packs for p in packs)


def _add_rms_norm(x, delta, weight, eps: float):
    x = x + delta
    return x, _rms_norm(x, weight, eps)


class _Glue:
    """Norms, residual adds, rotary embedding and the MLP's SiLU x up of one model, as functions.

    With HF's RMSNorm and SiLU MLPs they are the functions above (compiled when `compiled`); any other
    module falls back to calling the module itself.
    """

    def __init__(self, decoder, rope, compiled: bool, dynamic: bool = False):
        layer = decoder.layers[0]
        norms = [decoder.norm] + [m for lay in decoder.layers
                                  for m in (lay.input_layernorm, lay.post_attention_layernorm)]
        self.fused = all(fused.is_hf_rms_norm(n) for n in norms) and fused.is_silu_mlp(layer.mlp)
        # Compiled only where inductor can round where HF's eager code rounds (emulate_precision_casts: without
        # it 25% of bf16 norm outputs differ by an ulp). One compiled version per model shape (the prefill's, with
        # dynamic shapes) or per model shape and rows (the decode step's, fixed shapes), shared by every engine of
        # the process (fused.compiled).
        tag = f"{'prefill' if dynamic else 'decode'}_{fused.model_tag(decoder.config, decoder.embed_tokens.weight.dtype)}"
        if not (compiled and self.fused and fused.available()):
            wrap = lambda f: f  # noqa: E731
        elif dynamic:
            wrap = lambda f: fused.compiled(f, tag, dynamic=True)  # noqa: E731
        else:
            wrap = lambda f: _per_rows(f, tag)  # noqa: E731
        self._rms, self._add_rms, self._silu_mul, self._rope = (
            f if f is None else wrap(f) for f in (_rms_norm, _add_rms_norm, fused.silu_mul, rope))

    def norm(self, module, x):
        return self._rms(x, module.weight, module.variance_epsilon) if self.fused else module(x)

    def add_norm(self, module, x, delta):
        if self.fused:
            return self._add_rms(x, delta, module.weight, module.variance_epsilon)
        x = x + delta
        return x, module(x)

    def rope(self, q, k, cos, sin):
        return self._rope(q, k, cos, sin)

    def mlp(self, mlp, h, gate_up=None):
        if self.fused:
            gate, up = gate_up(h) if gate_up is not None else (mlp.gate_proj(h), mlp.up_proj(h))
            return mlp.down_proj(self._silu_mul(gate, up))
        return mlp(h)


def _per_rows(fn, tag: str):
    """`fn` compiled for fixed shapes, one version per number of rows (its first argument's first dimension)."""
    by_rows: dict = {}

    def call(x, *args):
        compiled = by_rows.get(x.shape[0])
        if compiled is None:
            compiled = by_rows[x.shape[0]] = fused.compiled(fn, f"{tag}_{x.shape[0]}")
        return compiled(x, *args)
    return call


def _dedupe(ids: torch.Tensor) -> tuple[list, list]:
    """(the first row index of each distinct row of `ids`, each row's position among those)."""
    first: dict = {}
    source = [first.setdefault(tuple(row), len(first)) for row in ids.tolist()]
    unique = [0] * len(first)
    for r, u in reversed(list(enumerate(source))):
        unique[u] = r
    return unique, source


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(rows, kv heads, length, dim) -> (rows, kv heads x groups, length, dim), as HF's repeat_kv."""
    if groups == 1:
        return x
    rows, heads, length, dim = x.shape
    return x[:, :, None].expand(rows, heads, groups, length, dim).reshape(rows, heads * groups, length, dim)


_ATTR = "_tinyablate_engine"


def engine_for(model, pad_token_id: int, eos_token_ids: Sequence[int], use_graphs: bool, log=None) -> GenerationEngine:
    """The engine of `model`, kept on the model object, so a cell (rank) allocates its cache and captures once."""
    engine = model.__dict__.get(_ATTR)
    if engine is None or engine.use_graphs != use_graphs:
        engine = GenerationEngine(model, pad_token_id, eos_token_ids, use_graphs=use_graphs, log=log)
        model.__dict__[_ATTR] = engine  # not a submodule: no state dict entry
    engine.set_special_tokens(pad_token_id, eos_token_ids)
    return engine
