"""The decode attention's Triton kernels (engine/attention.py) run by Triton's CPU interpreter, against a
float64 reference. Runs where `triton` is installed (it is not a dependency on CPU; CI skips this file);
the same kernels on CUDA: tests/test_engine_gpu.py.

Run: pip install triton && python -m pytest tests/test_attention_interpreter.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

# Run in a child process: TRITON_INTERPRET must be set before triton is imported.
CHECK = textwrap.dedent("""
    import itertools, sys
    import torch
    from tinyablate.engine.attention import decode_attention

    def reference(q, k, v, start, slot, scale, src, pend):
        out = torch.empty_like(q)
        for b, h in itertools.product(range(q.shape[0]), range(q.shape[1])):
            keys = torch.cat([k[src[b], h, :pend], k[b, h, pend:slot + 1]]).double()
            values = torch.cat([v[src[b], h, :pend], v[b, h, pend:slot + 1]]).double()
            scores = (q[b, h].double() @ keys.T) * scale
            scores[:, :start[b]] = float("-inf")
            out[b, h] = (scores.softmax(-1) @ values).to(q.dtype)
        return out

    torch.manual_seed(0)
    worst = 0.0
    # rows per prompt, key slices, prompt end (a multiple of the key block or not), current slot
    for per, splits, pend, slot in itertools.product((1, 2, 4), (1, 3), (20, 32), (40, 70)):
        # per: consecutive rows sharing one prompt, read from one cache row
        rows = 8
        q = torch.randn(rows, 2, 3, 16)
        k, v = torch.randn(rows, 2, 80, 16), torch.randn(rows, 2, 80, 16)  # every row's slots differ
        start = torch.randint(0, 6, (rows // per,)).repeat_interleave(per)  # one left padding per prompt
        src = torch.arange(rows) // per  # group g's prompt in row g, as the engine keeps it
        out = decode_attention(q, k, v, start, torch.tensor([slot]), 0.3, splits, src, torch.tensor([pend]),
                               block_n=16)
        worst = max(worst, (out - reference(q, k, v, start, slot, 0.3, src, pend)).abs().max().item())
    print(worst)
    sys.exit(0 if worst < 1e-5 else 1)
""")


def test_decode_attention_kernels_match_a_float64_reference_in_the_interpreter():
    """Rows alone and in groups sharing a prompt's cache row, 1 and 3 key slices, a prompt end inside a key
    block and on its edge; each row's own prompt slots hold other numbers."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-c", CHECK],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]


ENGINE_CHECK = textwrap.dedent("""
    import sys
    import torch
    from transformers import LogitsProcessorList, Qwen2Config, Qwen2ForCausalLM
    from tinyablate.engine import EngineOptions, GenerationEngine, Sampling
    from tinyablate.sampling import KeyedGumbelSampler, sequence_key

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.5)).eval()
    gen = torch.Generator().manual_seed(2)
    distinct = [torch.randint(1, 512, (n,), generator=gen).tolist() for n in (5, 19, 33)]
    ps = [p for p in distinct for _ in range(2)]  # 6 rows: groups of 2, the bucket's 2 filler rows a third
    width = max(map(len, ps))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in ps])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])

    def hf(new, **kwargs):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             pad_token_id=0, **kwargs)
        return out[:, width:].tolist()

    engine = GenerationEngine(model, 0, [-1], use_graphs=False,
                              options=EngineOptions(attention="sdpa", share_prompts=sys.argv[1] == "True"))
    engine.fixed_shapes = True  # the captured step's shapes: a batch bucket of 8 rows
    engine.layers.attention = "triton"  # the Triton kernels, run by the interpreter on CPU
    greedy = engine.generate(ps, 24)
    assert greedy == hf(24, do_sample=False), "greedy"
    keys = [sequence_key(0, 0, i, 0) for i in range(len(ps))]
    ref = hf(24, do_sample=False, logits_processor=LogitsProcessorList([KeyedGumbelSampler(keys, 0.8)]))
    ours = engine.generate(ps, 24, Sampling(temperature=0.8, keyed=True), keys=keys)
    assert ours == ref and ours[0] != ours[1], "keyed"
""")


@pytest.mark.parametrize("share_prompts", [True, False])
def test_engine_with_shared_prompts_matches_hf_generate_in_the_interpreter(share_prompts):
    """The engine's Triton decode attention with repeated prompts (read from the one cache row that holds
    each, or each row from its own), fp32: HF generate's greedy and keyed tokens."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-c", ENGINE_CHECK, str(share_prompts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
