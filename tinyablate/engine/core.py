"""GenerationEngine: batched left-padded prefill, then a fixed-shape decode step, replayed from CUDA graphs.

The engine runs the model's own modules (embeddings, RMSNorms, q/k/v/o projections, MLPs, rotary
embedding, lm_head) in its own loop, so every adapter on them (TinyLoRA / LoRA-XS layers, merged or not, PEFT
LoRA) is in the computation; only the cache and the attention over it are the engine's:

- KV cache (engine/cache.py): one (batch, kv heads, length, head dim) tensor per layer for keys and one for
  values, allocated for the largest (batch, prompt + new tokens) asked so far and reused (`reserve`).
- prefill (engine/layers.py): the whole left-padded prompt batch in one forward; pad tokens attend only to
  themselves (so nothing is NaN) and no real token attends to a pad. Identical prompts (GRPO's generations
  of one prompt) are computed once and their cache rows and logits copied to the duplicates.
- decode step: embed the last tokens, every layer (the new key/value written at slot P + t; engine/layers.py),
  the logits of that position, sampling (engine/sampler.py: greedy, temperature + top-k + top-p, or the keyed
  Gumbel sampler of tinyablate/sampling.py), finished rows forced to pad, per-row EOS flags, counters
  advanced. All of it reads and writes fixed buffers (engine/cache.py DecodeState), so on CUDA it is
  captured once per (batch bucket, key-length bucket, sampling) and replayed (engine/graphs.py); the host
  only checks every few steps whether all rows are done (early exit).
- packed projections (engine/packing.py): q/k/v run as one matmul and gate/up as one, over stacked
  weights that hold each layer's effective weight (a merged adapter merges straight into its rows).
- weights: before a generation the merged adapters' weights are re-merged for the current v (in
  place, the same storage), the packed weights refreshed, and a signature of every weight tensor the
  step reads (addresses and adapter states) is compared with the one the graphs were captured with;
  any change (a dropped merged cache, adapters disabled or merged, a device move) drops the graphs, which
  are captured again. A replay therefore never reads a stale or freed weight.

Positions follow HF generate (cumulative attention mask minus one), so greedy tokens match it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..adapters.layers import remerge
from ..sampling import check_keys
from .cache import DecodeState, KVCache, dedupe, left_pad
from .graphs import DecodeGraphs, weight_signature
from .layers import DecoderLayers, causal_lm_parts
from .sampler import Sampler, Sampling


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs. A cell sets only `log` (engine_for); every other field is an experiment knob, set by
    benchmarks (rollout_bench.py --attention, mismatch_check.py, numerics_probe.py --engine) and tests, never by
    a setting: its default is what a cell runs. None of them changes what is sampled from. They stay here, not
    in the benchmarks, because the tests that pin the engine's numbers (tests/test_engine*.py) set them too."""

    # Experiment knob. Graphs are captured for key lengths in multiples of it; the cache's length is one too.
    length_bucket: int = 64
    # Experiment knob. The decode step's attention: "triton" (engine/attention.py), "sdpa" or "matmul"; None:
    # "triton" on CUDA with Triton installed, else "sdpa" (what a cell runs). "matmul" (HF eager attention's
    # rounding) exists for benchmarks and tests only.
    attention: Optional[str] = None
    # Experiment knob. None: on CUDA. With every projection packed, compile each decoder layer of the decode
    # step into two functions around the attention (engine/compiled.py) and the sampling draw into one kernel
    # (engine/sampler.py); otherwise compile the norms, rotary and SiLU x up one by one (CUDA only); the
    # prefill's norms, rotary and SiLU x up are compiled too (dynamic shapes: any batch and width). Its bf16
    # tokens agree with HF's as the uncompiled step's do (tests/test_engine_gpu.py); speed-ups are in
    # benchmarks/RESULTS.md.
    compile_glue: Optional[bool] = None
    # Experiment knob. Run q/k/v and gate/up as one matmul each over packed weights (engine/packing.py); layers
    # that cannot be packed (PEFT LoRA, a quantized base, an unmerged adapter) are called one by one.
    pack: bool = True
    # Experiment knob. The Triton attention reads the prompt keys of rows with identical prompts from one cache
    # row (engine/attention.py), so the copies are not each read from HBM.
    share_prompts: bool = True
    # The one a cell sets. Where the engine reports cache allocations and recaptures (one line each); None:
    # nowhere.
    log: Optional[Callable[[str], None]] = None


class GenerationEngine:
    """Batched generation for one model; see the module docstring. One engine per cell and rank.

    use_graphs: replay the decode step from CUDA graphs (default: on CUDA); the host checks for all rows done
    every 8 steps with graphs, every step without. options: EngineOptions (the defaults unless experimenting).
    """

    def __init__(
        self,
        model,
        pad_token_id: int,
        eos_token_ids: Sequence[int],
        use_graphs: Optional[bool] = None,
        *,
        options: Optional[EngineOptions] = None,
    ):
        options = options or EngineOptions()
        self.model = model
        self.lm, self.decoder = causal_lm_parts(model)
        self.pad, self.eos, self._eos_t = None, None, None
        self.cache = KVCache(self.decoder)
        device = self.device = self.cache.device
        self.dtype = self.cache.dtype
        compile_glue = device.type == "cuda" if options.compile_glue is None else bool(options.compile_glue)
        self.use_graphs = device.type == "cuda" if use_graphs is None else bool(use_graphs)
        if self.use_graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        # Fixed shapes (power-of-two batches, key lengths in multiples of length_bucket): what capture
        # needs; also settable without graphs, so CPU tests run the captured step's exact shapes.
        self.fixed_shapes = self.use_graphs
        self.length_bucket = int(options.length_bucket)
        self.check_every = 8 if self.use_graphs else 1  # decode steps between the host's checks for all rows done
        self.log = options.log or (lambda msg: None)
        self.layers = DecoderLayers(
            self.lm, self.decoder, self.cache, options.attention, options.share_prompts, compile_glue, options.pack
        )
        self.sampler = Sampler(self.layers.compiled, self.layers.compiles_layers)
        self.graphs = DecodeGraphs(self._decode_step, self.log)
        self._states: dict = {}  # rows -> the DecodeState of that batch bucket
        self.set_special_tokens(pad_token_id, eos_token_ids)

    @property
    def captures(self) -> int:
        """Decode graphs captured so far (each costs a warm-up and a capture)."""
        return self.graphs.captures

    def set_special_tokens(self, pad_token_id: int, eos_token_ids: Sequence[int]) -> None:
        """The token finished rows are filled with and the tokens that finish a row.

        A captured decode graph bakes the pad id in and reads the EOS ids from `_eos_t`'s memory, so a change
        drops the graphs, and an unchanged call keeps the very same tensor: replacing it would free the memory
        the graphs read, and a later allocation (a training step's activations) would then decide which rows
        stop (rows ended mid-answer on a token they never sampled, a large training-rollout mismatch;
        measured: benchmarks/RESULTS.md, "GPU numerics").
        """
        pad, eos = int(pad_token_id), sorted({int(e) for e in eos_token_ids})
        if pad == self.pad and eos == self.eos:
            return
        self.pad, self.eos = pad, eos
        self._eos_t = torch.tensor(eos or [-1], device=self.device)
        if self.graphs.table:
            self.log("generation engine: pad or EOS tokens changed, recapturing the decode graphs")
            self.graphs.clear()

    # -- memory --------------------------------------------------------------------------------
    def reserve(self, rows: int, length: int) -> int:
        """Allocate the KV cache for `rows` x `length` tokens (rounded up to the length bucket); returns its bytes.

        Grows only: an existing larger cache is kept. Growing drops the captured graphs.
        """
        length = -(-length // self.length_bucket) * self.length_bucket
        if self.cache.keys is not None and rows <= self.cache.rows and length <= self.cache.length:
            return self.cache_bytes
        rows, length = max(rows, self.cache.rows), max(length, self.cache.length)
        self.cache.free()
        self._drop_graphs()
        self.cache.allocate(rows, length)
        self.log(f"generation engine: KV cache {rows} rows x {length} tokens = {self.cache_bytes / 2**30:.2f} GiB")
        return self.cache_bytes

    @property
    def cache_bytes(self) -> int:
        return self.cache.bytes

    def release(self) -> None:
        """Free the cache and the graphs (a later generate() allocates them again)."""
        self.cache.free()
        self._drop_graphs()
        self.layers.drop_packs()

    def _drop_graphs(self) -> None:
        self.graphs.reset()
        self._states.clear()

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        keys: Optional[Sequence[int]] = None,
        logprobs: bool = False,
    ):
        """One completion per prompt (token ids, up to and including the first EOS), in input order; with
        `logprobs`, also each token's log-probability under softmax(logits / temperature) as sampled (GRPO's
        training-rollout mismatch, train/mismatch.py): (completions, logprobs)."""
        if sampling.keyed:
            check_keys(keys, len(prompts))
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
        completions = [self._cut(row) for row in tokens[: len(prompts)]]
        if not logprobs:
            return completions
        return completions, [lp[: len(c)] for c, lp in zip(completions, logps)]

    def _run(self, prompts, rows, width, max_new, sampling, keys, logprobs: bool = False) -> tuple:
        """The decode loop: prefill, the first token, then a decode step (replayed or eager) per new token."""
        state = self._state(rows, max_new)
        ids, mask = left_pad(prompts, rows, width, self.pad)
        unique, source = dedupe(ids)
        ids, mask = ids.to(self.device), mask.to(self.device)
        state.begin(len(prompts), keys)
        logits = self.layers.prefill(ids, mask, state, unique, source)
        state.step.zero_()
        self.sampler.sample_next(logits, state, sampling, self.pad, self._eos_t)  # from the prompt's last position
        done_at = max_new
        for t in range(1, max_new):
            # Early exit: a host sync every check_every steps (none without an EOS token: no row can finish)
            if self.eos and t % self.check_every == 0 and bool(state.done.all()):
                done_at = t
                break
            kv_len = self._kv_len(width + t)
            if self.use_graphs:
                self.graphs.replay(rows, kv_len, sampling, state)
            else:
                self._decode_step(state, kv_len, sampling)
        return state.out[:, :done_at].tolist(), (state.logp[:, :done_at].tolist() if logprobs else None)

    def _decode_step(self, state: DecodeState, kv_len: int, sampling: Sampling) -> None:
        """One new token per row: what a CUDA graph captures."""
        logits = self.layers.decode_logits(state, kv_len)
        state.advance()
        self.sampler.sample_next(logits, state, sampling, self.pad, self._eos_t)

    def _cut(self, row: list) -> list:
        if not self.eos:
            return row
        for i, token in enumerate(row):
            if token in self.eos:
                return row[: i + 1]
        return row

    def _bucket_rows(self, n: int) -> int:
        if not self.fixed_shapes:
            return n
        rows = 1 << (n - 1).bit_length()  # graphs are captured for power-of-two batches
        return max(n, min(rows, max(self.cache.rows, n)))

    def _kv_len(self, used: int) -> int:
        if not self.fixed_shapes:
            return used  # exactly the keys written so far, as HF's dynamic cache
        return min(-(-used // self.length_bucket) * self.length_bucket, self.cache.length)

    def _state(self, rows: int, max_new: int) -> DecodeState:
        state = self._states.get(rows)
        if state is None or state.out.shape[1] < max_new:
            if state is not None:  # graphs write into the old buffers
                self.graphs.drop_rows(rows)
            state = self._states[rows] = DecodeState(rows, self.cache.length, max_new, self.device)
        return state

    # -- fresh weights ----------------------------------------------------------------------------
    def refresh_weights(self) -> None:
        """Re-merge the merged adapters' weights for the current v and refresh the packed weights; drop the
        captured graphs if any weight tensor the decode step reads moved or changed state."""
        if self.layers.pack:
            self.layers.refresh_packs()  # merges the packed adapters into their rows of the packs
        modules = list(self.model.modules())
        remerge(modules)  # and the others (pack off, or a group that cannot be packed) into their own buffers
        self.graphs.check_weights(weight_signature(modules, self.layers.packs))


_ATTR = "_tinyablate_engine"


def engine_for(model, pad_token_id: int, eos_token_ids: Sequence[int], use_graphs: bool, log=None) -> GenerationEngine:
    """The engine of `model`, kept on the model object, so a cell (rank) allocates its cache and captures once. A
    `log` given here is where the engine reports from now on, also when an earlier caller (the base evaluation,
    without one) built it."""
    engine = model.__dict__.get(_ATTR)
    if engine is None or engine.use_graphs != use_graphs:
        engine = GenerationEngine(
            model, pad_token_id, eos_token_ids, use_graphs=use_graphs, options=EngineOptions(log=log)
        )
        model.__dict__[_ATTR] = engine  # not a submodule: no state dict entry
    elif log is not None:
        engine.log = engine.graphs.log = log
    engine.set_special_tokens(pad_token_id, eos_token_ids)
    return engine
