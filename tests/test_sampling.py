"""Keyed rollout sampling: an exact categorical draw whose outcome depends only on its key."""

from __future__ import annotations

import pytest
import torch

from tinyablate.sampling import KeyedGumbelSampler, mix32, rollout_keys, sequence_key, top_p_filter


def test_mix32_is_the_same_on_tensors_and_ints():
    xs = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1]
    tensor = mix32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert tensor == [mix32(x) for x in xs]
    assert all(0 <= v < 2**32 for v in tensor) and len(set(tensor)) == len(xs)


def test_keyed_gumbel_draws_follow_softmax_at_temperature():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])
    n, temperature = 40000, 0.7
    sampler = KeyedGumbelSampler([sequence_key(0, 0, row, 0) for row in range(n)], temperature)
    scores = sampler(torch.zeros(n, 3, dtype=torch.long), logits.expand(n, -1).clone())
    freq = torch.bincount(scores.argmax(-1), minlength=5).float() / n
    torch.testing.assert_close(freq, (logits / temperature).softmax(-1), atol=0.01, rtol=0)


def test_noise_depends_on_key_and_position_only():
    a = KeyedGumbelSampler([7, 8, 9], 1.0)
    b = KeyedGumbelSampler([9], 1.0)
    assert torch.equal(a.noise(3, 50, "cpu")[2], b.noise(3, 50, "cpu")[0])
    assert not torch.equal(a.noise(3, 50, "cpu")[2], a.noise(4, 50, "cpu")[2])
    assert not torch.equal(a.noise(3, 50, "cpu")[0], a.noise(3, 50, "cpu")[1])


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = torch.tensor([[0.5, 0.1, 0.3, 0.1]])
    kept = torch.isfinite(top_p_filter(probs.log(), 0.75))
    assert kept.tolist() == [[True, False, True, False]]


def test_sample_numbers_do_not_depend_on_the_split():
    rows = [4, 4, 4, 4, 9, 9, 9, 9]
    one = rollout_keys(0, 5, [rows], 0)
    halves = [rows[:4], rows[4:]]
    two = rollout_keys(0, 5, halves, 0) + rollout_keys(0, 5, halves, 1)
    thirds = [rows[:2], rows[2:6], rows[6:]]
    odd = sum((rollout_keys(0, 5, thirds, r) for r in range(3)), [])
    assert one == two == odd and len(set(one)) == 8
    assert rollout_keys(1, 5, [rows], 0) != one and rollout_keys(0, 6, [rows], 0) != one


def test_same_key_same_completion_whatever_the_batch(tmp_path):
    """Padding and batch-mates change nothing: a completion is a function of its prompt and key."""
    from transformers import LogitsProcessorList

    from tinyablate.config import ModelConfig
    from tinyablate.models import load_model_and_tokenizer

    model, tok, _ = load_model_and_tokenizer(ModelConfig(name="tiny-qwen2", cache_dir=str(tmp_path)))

    def sample(prompts, keys):
        batch = tok(prompts, return_tensors="pt", padding=True)
        out = model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=10,
            pad_token_id=tok.pad_token_id,
            logits_processor=LogitsProcessorList([KeyedGumbelSampler(keys, 1.0)]),
            temperature=None,
            top_p=None,
            top_k=None,
        )
        return out[:, batch["input_ids"].shape[1] :].tolist()

    alone = sample(["1 + 2 ="], [11])[0]
    together = sample(["a much longer prompt that forces left padding: 3 + 4 =", "1 + 2 ="], [12, 11])
    assert together[1] == alone
    assert sample(["1 + 2 ="], [13])[0] != alone  # another key, another draw


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_cuda_noise_draws_what_the_cpu_draws():
    """The compiled CUDA path hashes the same integers; float rounding may differ in the last ulp only."""
    n, vocab = 64, 152064
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(0))
    keys = [sequence_key(0, 3, row, 0) for row in range(n)]
    ids = torch.zeros(n, 5, dtype=torch.long)
    cpu = KeyedGumbelSampler(keys, 0.7)(ids, logits.clone())
    cuda = KeyedGumbelSampler(keys, 0.7)(ids.cuda(), logits.cuda()).cpu()
    torch.testing.assert_close(cuda, cpu, rtol=1e-5, atol=1e-5)
    assert (cuda.argmax(-1) == cpu.argmax(-1)).all()


def test_keyed_sampling_needs_one_key_per_prompt_in_one_check():
    from tinyablate.sampling import check_keys

    check_keys([1, 2], 2)
    with pytest.raises(ValueError, match="one key per prompt: 1 keys for 2 prompts"):
        check_keys([1], 2)
    with pytest.raises(ValueError, match="one key per prompt: no keys for 2 prompts"):
        check_keys(None, 2)
