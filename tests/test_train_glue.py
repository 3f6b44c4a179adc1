"""Training's compiled glue (tinyablate/train/glue.py): HF's numbers, v's gradient, the setting."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tinyablate.adapters import apply_adapter
from tinyablate.config import AdapterConfig, SVDConfig
from tinyablate.train.glue import compiled_glue, train_kernels

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    ),
]


def _tiny(family: str, dtype=torch.float32):
    torch.manual_seed(0)
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    cls, cfg = (Qwen2ForCausalLM, Qwen2Config) if family == "qwen2" else (LlamaForCausalLM, LlamaConfig)
    model = cls(cfg(**common)).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)  # norms that are not all ones, so the weight's rounding shows
    return model


def _loss_and_grad(model, adapter, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), adapter.trainable_parameters()[0].grad.clone()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_compiled_glue_gives_the_eager_loss_and_v_gradient(family, device):
    model = _tiny(family).to(device)
    adapter = apply_adapter(model, AdapterConfig(kind="tinylora", r=2, u=4, tie=1, svd=SVDConfig(cache_dir="")), "t")
    with torch.no_grad():
        adapter.trainable_parameters()[0].normal_(0, 0.1)
    model.train()
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(1)).to(device)
    rope = sys.modules[type(model.model.layers[0].self_attn).__module__].apply_rotary_pos_emb
    eager = _loss_and_grad(model, adapter, ids)
    with compiled_glue(model) as patched:
        assert patched == 2 * 2 + 1 + 2  # two norms a layer, the final norm, one MLP a layer
        assert "forward" in vars(model.model.norm)
        home = sys.modules[type(model.model.layers[0].self_attn).__module__]
        assert home.apply_rotary_pos_emb is not rope  # the compiled rotary embedding
        compiled = _loss_and_grad(model, adapter, ids)
        longer = torch.randint(0, 128, (2, 57), device=device)
        model(input_ids=longer, labels=longer).loss.backward()  # another length: dynamic shapes, no failure
    assert "forward" not in vars(model.model.norm)  # HF's own forwards again
    assert sys.modules[type(model.model.layers[0].self_attn).__module__].apply_rotary_pos_emb is rope
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-9)
    assert eager[1].abs().max() > 0  # the gradient reaches v: the comparison has something to compare


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_glue_forward_equals_hf_in_bf16(device):
    model = _tiny("qwen2", torch.bfloat16).to(device)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        with compiled_glue(model):
            compiled = model(input_ids=ids).logits
    assert torch.equal(compiled, eager)


def test_compiled_glue_leaves_other_architectures_alone():
    model = _tiny("qwen2")
    model.config.model_type = "gemma"  # another RMSNorm formula: not rms_norm's
    with compiled_glue(model) as patched:
        assert patched == 0


def test_train_kernels_setting_resolves_per_device_and_is_validated_outside_the_cell_id():
    from dataclasses import replace

    from tinyablate.config import AlgoConfig, CellSpec, cell_id, validate_spec

    def kernels(value, device):
        return train_kernels(AlgoConfig(train_kernels=value), device)

    assert kernels("auto", "cuda") == "compiled" and kernels("auto", "cpu") == "eager"
    assert kernels("eager", "cuda") == "eager" and kernels("compiled", "cpu") == "compiled"
    with pytest.raises(ValueError, match=r"algo.train_kernels='fused' is invalid"):
        validate_spec(CellSpec(algo=AlgoConfig(train_kernels="fused")))
    base = CellSpec()
    assert cell_id(replace(base, algo=AlgoConfig(train_kernels="compiled"))) == cell_id(base)


def test_the_old_name_train_glue_still_works_with_a_warning_and_a_conflict_is_refused():
    from dataclasses import replace

    from tinyablate.config import AlgoConfig, CellSpec, cell_id, spec_from_dict, spec_to_dict, validate_spec

    old = AlgoConfig(train_glue="compiled")
    validate_spec(CellSpec(algo=old))
    with pytest.warns(FutureWarning, match="algo.train_glue is the old name of algo.train_kernels"):
        assert train_kernels(old, "cpu") == "compiled"
    assert cell_id(replace(CellSpec(), algo=old)) == cell_id(CellSpec())
    with pytest.raises(ValueError, match=r"algo.train_glue='eager' is invalid.*old name of train_kernels"):
        validate_spec(CellSpec(algo=AlgoConfig(train_glue="eager", train_kernels="compiled")))
    validate_spec(CellSpec(algo=AlgoConfig(train_glue="eager", train_kernels="eager")))
    # a spec.json written before the rename (train_glue "auto", no train_kernels) reads back
    raw = spec_to_dict(CellSpec())
    del raw["algo"]["train_kernels"]
    raw["algo"]["train_glue"] = "auto"
    assert train_kernels(spec_from_dict(raw).algo, "cuda") == "compiled"


def test_a_function_whose_compile_fails_warns_once_and_runs_eager_from_the_one_memo(monkeypatch):
    """A compiler failure costs speed, never the cell: kernels.compiled's memo then hands training fn itself."""
    import warnings

    from tinyablate import kernels
    from tinyablate.train import glue

    def plus_one(x):
        return x + 1

    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setitem(kernels._COMPILED, (plus_one, ("train",), True, None, True), broken)
    assert glue._compiled(plus_one) is broken
    with pytest.warns(UserWarning, match="compiling plus_one failed"):
        assert glue._run(plus_one, 1) == 2
    assert glue._compiled(plus_one) is plus_one
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert glue._run(plus_one, 2) == 3
