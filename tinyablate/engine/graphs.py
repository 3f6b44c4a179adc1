"""CUDA-graph capture of the decode step, and the weight signature that keeps replays from reading stale weights.

The decode step reads and writes only fixed buffers (the KV cache, engine/cache.py DecodeState, the packed
weights), so on CUDA it is captured once per (rows, key length, sampling) and replayed:

    graphs = DecodeGraphs(engine._decode_step, log)
    graphs.replay(rows, kv_len, sampling, state)    # captures on first use

A graph bakes in the addresses of every tensor it reads. The engine therefore drops graphs whenever those
could change: the cache grows (`reset`), a bucket's state is replaced (`drop_rows`), the pad or EOS ids change
(`clear`), or a weight tensor moves or changes state (`check_weights` with `weight_signature`).
"""

from __future__ import annotations

import torch

from ..adapters.layers import SVDAdapterLinear


class DecodeGraphs:
    """The captured decode graphs of one engine: (rows, kv length, sampling) -> torch.cuda.CUDAGraph.

    step(state, kv_len, sampling): the decode step to capture; log: where recaptures are announced."""

    def __init__(self, step, log):
        self.step = step
        self.log = log
        self.table: dict = {}
        self.pool = None  # the memory pool the graphs share
        self.signature = None  # the weights' signature the graphs were captured with (weight_signature)
        self.captures = 0  # decode graphs captured so far (each costs a warm-up and a capture)

    def replay(self, rows: int, kv_len: int, sampling, state) -> None:
        """Replay the step for this shape and sampling on `state` (the bucket's DecodeState), captured if new."""
        self._graph(rows, kv_len, sampling, state).replay()

    def _graph(self, rows: int, kv_len: int, sampling, st):
        key = (rows, kv_len, sampling)
        graph = self.table.get(key)
        if graph is not None:
            return graph
        saved = st.snapshot()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (allocator, cuBLAS workspaces, compiled sampler)
            for _ in range(2):
                self.step(st, kv_len, sampling)
                st.restore(saved)
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None or not self.table:
            # The graphs share one memory pool. Once every graph that used it is gone, the allocator keeps the
            # pool (use count 0) until it can free its memory, and capturing into it again fails an internal
            # assert: a new pool whenever no graph is alive.
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.step(st, kv_len, sampling)
        st.restore(saved)  # capture records kernels without running them; keep the state exact anyway
        self.table[key] = graph
        self.captures += 1
        return graph

    def clear(self) -> None:
        """Drop every graph (the memory pool is replaced at the next capture)."""
        self.table.clear()

    def drop_rows(self, rows: int) -> None:
        """Drop the graphs of one batch bucket (its state buffers are replaced)."""
        self.table = {k: g for k, g in self.table.items() if k[0] != rows}

    def reset(self) -> None:
        """Drop every graph, the memory pool and the weights' signature (the cache is reallocated or freed)."""
        self.table.clear()
        self.pool = None
        self.signature = None

    def check_weights(self, signature: tuple) -> None:
        """Drop the graphs if the weights' signature differs from the one they were captured with."""
        if signature != self.signature:
            if self.table:
                self.log("generation engine: weights changed place or state, recapturing the decode graphs")
            self.table.clear()
            self.signature = signature


def weight_signature(modules, packs: list) -> tuple:
    """A signature of every weight tensor the decode step reads, from the model's `modules` (a list of
    model.modules(), its adapters' merged weights already brought up to v: adapters.layers.remerge): the packed
    weights (engine/packing.py, `packs` per layer), each adapter's (SVDAdapterLinear.state_signature) and PEFT
    LoRA layer's state, and the address of every parameter and buffer. It changes nothing."""
    signature = [tuple(p.signature() if p is not None else None for p in layer) for layer in packs]
    for module in modules:
        if isinstance(module, SVDAdapterLinear):
            signature.append(module.state_signature())
        else:
            for flag in ("merged", "disable_adapters", "active_adapters"):  # PEFT LoRA layers
                if hasattr(type(module), flag) or flag in vars(module):
                    value = getattr(module, flag, None)
                    signature.append(tuple(value) if isinstance(value, list) else value)
        for tensors in (module._parameters, module._buffers):  # recurse=False, without the generators' cost
            signature.extend(t.data_ptr() for t in tensors.values() if t is not None)
    return tuple(signature)
