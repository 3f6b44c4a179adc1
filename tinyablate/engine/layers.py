"""The model's decoder layers as the engine runs them: the prefill and the decode step over the KV cache.

The engine runs the model's own modules (embeddings, RMSNorms, q/k/v/o projections, MLPs, rotary
embedding, lm_head) in its own loop, so every adapter on them (TinyLoRA / LoRA-XS layers, merged or not, PEFT
LoRA) is in the computation; only the cache and the attention over it are the engine's. A
`DecoderLayers` holds what that takes for one model: its parts, the packed projections
(engine/packing.py), the glue between the matmuls and the compiled layers (engine/compiled.py), and the
decode attention (engine/attention.py's Triton kernel, SDPA or two matmuls):

    logits = layers.prefill(ids, mask, state, unique, source)   # prompts into the cache, last logits
    logits = layers.decode_logits(state, kv_len)                # one new token per row

The decode step takes one of two paths with the same arithmetic: `_compiled_layers` (every projection packed
and compile_glue: each layer as two compiled functions around the attention) or `_layers` (layer by layer,
through the glue, compiled or eager).
"""

from __future__ import annotations

import sys
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .. import kernels
from ..kernels import ARCHITECTURES
from . import compiled
from .attention import available as attention_kernel_available
from .attention import decode_attention
from .attention import splits_for as decode_attention_splits
from .cache import DecodeState, KVCache
from .packing import NO_PACKS, pack_layers


class DecodeMask(NamedTuple):
    """Which cached keys a row attends to at a decode step, in the forms the attention kernels take."""

    valid: torch.Tensor  # (rows, 1, 1, keys) bool
    start: torch.Tensor  # (rows,): first valid key (after the left padding)
    slot: torch.Tensor  # (1,): the slot written at this step, the last valid key
    src: torch.Tensor  # (rows,): the cache row holding this row's prompt keys (shared by identical prompts)
    prompt_end: torch.Tensor  # (1,): the prompt region's end (the left-padded prompts' width)


def causal_lm_parts(model):
    """(causal LM, decoder) of a Qwen2/Llama model, a PeftModel around one, or a DDP-unwrapped one."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(lm.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"the generation engine supports {list(ARCHITECTURES)} models, not {model_type!r}: "
            "use rollout_engine=hf / eval.engine=hf"
        )
    layer_types = getattr(lm.config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(
            "the generation engine has no sliding-window attention: use rollout_engine=hf / eval.engine=hf"
        )
    return lm, lm.model


class DecoderLayers:
    """One model's decoder layers over `cache`. attention: "triton", "sdpa", "matmul" or None (triton where it
    runs, else sdpa); share_prompts, compile_glue, pack: as GenerationEngine's EngineOptions (compile_glue
    resolved to a bool)."""

    def __init__(
        self, lm, decoder, cache: KVCache, attention: Optional[str], share_prompts: bool, compile_glue: bool, pack: bool
    ):
        self.lm, self.decoder, self.cache = lm, decoder, cache
        device = self.device = cache.device
        # Decode attention: "triton" (engine/attention.py, flash decoding; CUDA), "sdpa" (torch's fused kernel,
        # fp32 softmax) or "matmul" (two grouped matmuls, scores rounded to the model dtype as HF's eager
        # attention does; benchmarks and tests only). Default: triton where it runs, else sdpa.
        if attention is None:
            attention = "triton" if attention_kernel_available(device) else "sdpa"
        if attention not in ("triton", "sdpa", "matmul"):
            raise ValueError(f"attention={attention!r}: 'triton', 'sdpa' or 'matmul'")
        if attention == "triton" and not attention_kernel_available(device):
            raise ValueError("attention='triton' needs Triton and a CUDA device")
        self.attention = attention
        self.share_prompts = bool(share_prompts)
        self._splits: dict = {}
        attn = decoder.layers[0].self_attn
        self.head_dim, self.kv_heads = cache.head_dim, cache.kv_heads
        self.groups = attn.num_key_value_groups
        rope = self.rope = kernels.plain_function(sys.modules[type(attn).__module__].apply_rotary_pos_emb)
        # The elementwise work between the matmuls (norms, residual adds, rotary, SiLU x up): HF's own math,
        # as plain functions; in the decode step on CUDA compiled into a few fused kernels (compile_glue).
        # The prefill's (any rows x width: dynamic shapes) and the decode step's (fixed shapes).
        self._glue = compiled._Glue(decoder, rope, compiled=compile_glue and device.type == "cuda", dynamic=True)
        self._glue_decode = compiled._Glue(decoder, rope, compiled=compile_glue and device.type == "cuda")
        self.pack = bool(pack)
        self.packs: list = [NO_PACKS] * len(decoder.layers)
        # The decode step's layers (engine/compiled.py) and sampling draw (engine/sampler.py) as compiled functions,
        # used while every projection is packed; one compiled version per model shape and batch shape in a process
        self.compiled = compiled.EngineCompiled(kernels.model_tag(lm.config, cache.dtype))
        self.compiles_layers = bool(compile_glue and self.pack and self._glue.standard and kernels.available())

    # -- packed weights ---------------------------------------------------------------------------
    def refresh_packs(self) -> None:
        """Each layer's packed weights (None where the layers cannot be packed), refreshed."""
        self.packs = pack_layers(self.decoder, self.packs, self._glue.standard)

    def drop_packs(self) -> None:
        self.packs = [NO_PACKS] * len(self.decoder.layers)

    @property
    def all_packed(self) -> bool:
        return all(p is not None for packs in self.packs for p in packs)

    @property
    def reads_shared_prompts(self) -> bool:
        """The decode attention reads the prompt keys of identical prompts from one cache row (state.src)."""
        return self.attention == "triton" and self.share_prompts

    # -- prefill -----------------------------------------------------------------------------------
    def prefill(self, ids, mask, st: DecodeState, unique: list, source: list) -> torch.Tensor:
        """The prompts' forward: cache rows and last-position logits of every row.

        `unique`: one row index per distinct prompt; `source[r]`: the position in `unique` of row r's prompt.
        """
        pos = mask.cumsum(-1) - 1
        pos.masked_fill_(mask == 0, 0)  # as HF generate (pads' positions are never attended to)
        st.valid.zero_()
        st.valid[:, : ids.shape[1]] = mask.bool()
        st.start.copy_((mask == 0).sum(-1))
        st.pos.copy_(pos[:, -1] + 1)
        st.slot.fill_(ids.shape[1])
        st.prompt_end.fill_(ids.shape[1])
        # Without the spread below, distinct prompt u stays in cache row u; with it, in its first row unique[u]
        st.src.copy_(torch.tensor(source if self.reads_shared_prompts else [unique[s] for s in source]))
        if len(unique) == ids.shape[0]:
            return self._forward_prompts(ids, mask, pos)
        pick = torch.tensor(unique, device=self.device)
        logits = self._forward_prompts(ids[pick], mask[pick], pos[pick])
        back = torch.tensor(source, device=self.device)
        width = ids.shape[1]
        if not self.reads_shared_prompts:  # else the decode attention reads each row's prompt from row src
            for cache in self.cache.keys + self.cache.values:  # rows 0..len(unique)-1: the distinct prompts; spread
                cache[: len(source), :, :width] = cache[: len(unique), :, :width].index_select(0, back)
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
            self.cache.keys[i][:rows, :, :width].copy_(k)
            self.cache.values[i][:rows, :, :width].copy_(v)
            return _repeat_kv(k, self.groups), _repeat_kv(v, self.groups)

        return self.lm.lm_head(self._layers(x, cos, sin, attend[:, None], write))[:, -1]  # model dtype, as decode

    # -- decode step -------------------------------------------------------------------------------
    def decode_logits(self, st: DecodeState, kv_len: int) -> torch.Tensor:
        """The decode step's forward: each row's token at st.pos into cache slot st.slot; its logits (model dtype)."""
        rows = st.tokens.shape[0]
        st.valid.index_fill_(1, st.slot, True)
        x = self.decoder.embed_tokens(st.tokens[:, None])
        cos, sin = self.decoder.rotary_emb(x, st.pos[:, None])
        mask = DecodeMask(st.valid[:, None, None, :kv_len], st.start, st.slot, st.src, st.prompt_end)

        def write(i, k, v):
            kc, vc = self.cache.keys[i][:rows], self.cache.values[i][:rows]
            kc.index_copy_(2, st.slot, k)
            vc.index_copy_(2, st.slot, v)
            return kc[:, :, :kv_len], vc[:, :, :kv_len]

        if self.compiles_layers and self.all_packed:
            h = self._compiled_layers(x, cos, sin, mask, kv_len, rows)
        else:
            h = self._layers(x, cos, sin, mask, write, decode=True)
        return self.lm.lm_head(h)[:, -1]  # the model's dtype: the sampler casts where it needs float32

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
            packs = self.packs[i]
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

    def _compiled_layers(self, x, cos, sin, mask: DecodeMask, kv_len: int, rows: int):
        """The decode step's layers through the compiled functions of engine/compiled.py (all projections packed)."""
        pre, post, final = (
            self.compiled(f, rows, self.cache.length)
            for f in (compiled.pre_attention, compiled.post_attention, compiled.final_norm)
        )
        delta = None
        for i, layer in enumerate(self.decoder.layers):
            p, ln1, ln2 = self.packs[i], layer.input_layernorm, layer.post_attention_layernorm
            kc, vc = self.cache.keys[i][:rows], self.cache.values[i][:rows]
            x, q = pre(
                x,
                delta,
                ln1.weight,
                ln1.variance_epsilon,
                p.qkv.weight,
                p.qkv.bias,
                self.rope,
                cos,
                sin,
                kc,
                vc,
                mask.slot,
                self.kv_heads * self.groups,
                self.kv_heads,
                self.head_dim,
            )
            out = self._attend(q, kc[:, :, :kv_len], vc[:, :, :kv_len], mask, layer.self_attn.scaling)
            x, delta = post(
                x,
                out,
                p.o.weight,
                p.o.bias,
                ln2.weight,
                ln2.variance_epsilon,
                p.gate_up.weight,
                p.gate_up.bias,
                p.down.weight,
                p.down.bias,
            )
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


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(rows, kv heads, length, dim) -> (rows, kv heads x groups, length, dim), as HF's repeat_kv."""
    if groups == 1:
        return x
    rows, heads, length, dim = x.shape
    return x[:, :, None].expand(rows, heads, groups, length, dim).reshape(rows, heads * groups, length, dim)
