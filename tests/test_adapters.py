"""Exactness, accounting, export and bad-input tests of the adapter family (CPU, tiny models)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tinyablate.adapters import apply_adapter, load_native
from tinyablate.adapters.layers import projection
from tinyablate.config import AdapterConfig, SVDConfig

N_LAYERS = 3
TYPES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny(family: str, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    common = dict(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = Qwen2ForCausalLM(Qwen2Config(**common)) if family == "qwen2" else LlamaForCausalLM(LlamaConfig(**common))
    return model.to(dtype).eval()


def cfg(**kw) -> AdapterConfig:
    kw.setdefault("svd", SVDConfig(cache_dir=""))
    return AdapterConfig(**kw)


def randomize(adapter, scale=0.5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("kind", ["tinylora", "lora_xs", "lora", "none"])
def test_zero_init_logits_equal(family, kind):
    model = tiny(family)
    ref = model(IDS).logits
    adapter = apply_adapter(model, cfg(kind=kind, u=5, tie=2), "t")
    assert torch.equal(adapter.model(IDS).logits, ref)


def _analytic(kind, r, u, tie, sharing, n_layers=N_LAYERS, types=TYPES):
    n = n_layers * len(types)
    per = r * r if kind == "lora_xs" else u
    if tie == "all":
        return per
    if sharing == "tiled":
        return per * math.ceil(n / tie)
    return per * len(types) * math.ceil(n_layers / tie)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize(
    "kind,r,u,tie,sharing,precision",
    [
        ("tinylora", 2, 1, 1, "tiled", "fp32"),
        ("tinylora", 2, 13, "all", "tiled", "fp32"),
        ("tinylora", 1, 4, 2, "tiled", "bf16"),
        ("tinylora", 4, 3, 5, "tiled", "fp16"),
        ("tinylora", 2, 4, 1, "structured", "fp32"),
        ("tinylora", 2, 4, 2, "structured", "bf16"),
        ("tinylora", 2, 7, 3, "structured", "fp32"),
        ("tinylora", 2, 7, "all", "structured", "fp32"),
        ("lora_xs", 2, 1, 1, "tiled", "fp32"),
        ("lora_xs", 3, 1, 4, "structured", "fp16"),
    ],
)
def test_parameter_accounting(family, kind, r, u, tie, sharing, precision):
    adapter = apply_adapter(tiny(family), cfg(kind=kind, r=r, u=u, tie=tie, sharing=sharing, precision=precision), "t")
    want = _analytic(kind, r, u, tie, sharing)
    assert adapter.trainable_params == want
    assert adapter.trainable_bytes == want * {"fp32": 4, "bf16": 2, "fp16": 2}[precision]
    assert adapter.summary()["expected_trainable_params"] == want


def test_lora_accounting_and_none():
    model = tiny("llama")
    h, i = 48, 80
    kv = 2 * (48 // 4)  # k/v output size with 2 kv heads
    r = 2
    per_layer = 2 * r * (h + h) + 2 * r * (h + kv) + 3 * r * (h + i)  # q,o + k,v + gate,up,down
    adapter = apply_adapter(model, cfg(kind="lora", r=2, precision="bf16"), "t")
    assert adapter.trainable_params == N_LAYERS * per_layer
    assert adapter.trainable_bytes == 2 * N_LAYERS * per_layer
    assert apply_adapter(tiny("qwen2"), cfg(kind="none"), "t").trainable_params == 0


def test_tied_modules_share_one_parameter():
    adapter = apply_adapter(tiny("qwen2"), cfg(kind="tinylora", tie=2, sharing="structured"), "t")
    layers = adapter.layers
    q0, q1, q2 = (layers[f"model.layers.{i}.self_attn.q_proj"] for i in range(3))
    k0 = layers["model.layers.0.self_attn.k_proj"]
    assert q0.v is q1.v and q0.v is not q2.v and q0.v is not k0.v
    tiled = apply_adapter(tiny("qwen2"), cfg(kind="tinylora", tie=2, sharing="tiled"), "t").layers
    assert tiled["model.layers.0.self_attn.q_proj"].v is tiled["model.layers.0.self_attn.k_proj"].v
    assert tiled["model.layers.0.self_attn.k_proj"].v is not tiled["model.layers.0.self_attn.v_proj"].v


def _reference_delta(W: torch.Tensor, r: int, v: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """ΔW = U Σ (Σ v_i P_i) Vᵀ in float64 from a full SVD, with the same sign convention."""
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U.gather(0, idx[None, :]).squeeze(0))
    U, Vh = U * signs, Vh * signs[:, None]
    M = torch.einsum("i,ijk->jk", v.double(), P.double())
    return U @ torch.diag(S) @ M @ Vh


@pytest.mark.parametrize("mode", ["unmerged", "fused"])
def test_forward_equals_float64_reference(mode):
    model = tiny("qwen2")
    name = "model.layers.1.mlp.down_proj"
    W = model.get_submodule(name).weight.detach().clone()
    adapter = apply_adapter(model, cfg(kind="tinylora", r=2, u=5, forward=mode, projection_seed=3), "t")
    randomize(adapter)
    layer = adapter.layers[name]
    index = [t.index for t in adapter.targets if t.name == name][0]
    P = projection(3, index, 5, 2)
    ref_w = W.double() + _reference_delta(W, 2, layer.v.detach(), P)
    x = torch.randn(4, 7, W.shape[1])
    got = layer(x)
    want = x.double() @ ref_w.T
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)


def _outputs_and_grads(family, mode, kind="tinylora", dtype=torch.float32):
    model = tiny(family, dtype=dtype)
    adapter = apply_adapter(model, cfg(kind=kind, r=2, u=4, tie=3, forward=mode), "t")
    randomize(adapter, scale=0.3)
    logits = model(IDS).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), [p.grad.clone() for p in adapter.trainable_parameters()]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("kind", ["tinylora", "lora_xs"])
def test_fused_matches_unmerged_values_and_gradients(family, kind):
    out_u, g_u = _outputs_and_grads(family, "unmerged", kind)
    out_f, g_f = _outputs_and_grads(family, "fused", kind)
    assert torch.allclose(out_f, out_u, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_f, g_u):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["tinylora", "lora_xs", "lora"])
def test_merge_matches_unmerged_and_unmerge_is_bit_exact(kind):
    model = tiny("llama")
    pristine = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapter = apply_adapter(model, cfg(kind=kind, r=2, u=4, forward="unmerged"), "t")
    randomize(adapter, scale=0.3)
    unmerged = adapter.model(IDS).logits
    adapter.merge()
    merged = adapter.model(IDS).logits
    assert torch.allclose(merged, unmerged, rtol=1e-5, atol=1e-5)
    adapter.unmerge()
    with adapter.disabled():
        base_named = dict(adapter.model.named_parameters())
    for name, value in pristine.items():
        match = [
            v
            for n, v in base_named.items()
            if n.endswith(name.replace(".weight", ".base_layer.weight")) or n.endswith(name)
        ]
        assert any(torch.equal(m, value) for m in match), name
    assert torch.equal(adapter.model(IDS).logits, unmerged)


def test_bf16_merged_vs_unmerged_bound():
    """Measured bound: bf16 merged vs unmerged logits differ by < 3% of the logit scale."""
    model = tiny("qwen2", dtype=torch.bfloat16)
    adapter = apply_adapter(model, cfg(kind="tinylora", r=2, u=4, forward="unmerged"), "t")
    randomize(adapter, scale=0.3)
    unmerged = model(IDS).logits.float()
    adapter.merge()
    merged = model(IDS).logits.float()
    rel = (merged - unmerged).abs().max() / unmerged.abs().max()
    assert rel < 0.03, rel


@pytest.mark.parametrize("r", [1, 2, 4])
def test_delta_has_rank_r_in_top_singular_subspaces(r):
    model = tiny("qwen2")
    adapter = apply_adapter(model, cfg(kind="tinylora", r=r, u=6), "t")
    randomize(adapter)
    for name, layer in list(adapter.layers.items())[::5]:
        W = layer.weight.double()
        delta = layer.delta_weight(torch.float64)
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        Ur, Vr = U[:, :r], Vh[:r].T
        assert torch.linalg.matrix_rank(delta, atol=1e-8 * delta.abs().max()) <= r
        scale = delta.norm()
        assert (delta - Ur @ (Ur.T @ delta)).norm() < 1e-4 * scale, name
        assert (delta - (delta @ Vr) @ Vr.T).norm() < 1e-4 * scale, name


def test_gradients_reach_only_adapter_and_fp32_v_on_bf16_model():
    model = tiny("qwen2", dtype=torch.bfloat16)
    adapter = apply_adapter(model, cfg(kind="tinylora", r=2, u=4, precision="fp32"), "t")
    opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2)
    model(IDS).logits.float().pow(2).mean().backward()
    trainable = {id(p) for p in adapter.trainable_parameters()}
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    opt.step()
    for p in adapter.trainable_parameters():
        assert p.dtype == torch.float32
        assert all(s.dtype == torch.float32 for s in opt.state[p].values() if torch.is_tensor(s) and s.ndim)


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_low_precision_v_trains(precision, dtype):
    model = tiny("llama")
    adapter = apply_adapter(model, cfg(kind="tinylora", precision=precision), "t")
    # fp16 optimizer state: eps=1e-8 rounds to 0 and grad**2 underflows, so Adam needs eps >= 1e-7
    opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2, eps=1e-4)
    model(IDS).logits.pow(2).mean().backward()
    opt.step()
    for p in adapter.trainable_parameters():
        assert p.dtype == dtype and p.abs().sum() > 0
        assert opt.state[p]["exp_avg"].dtype == dtype


def test_fused_cache_follows_optimizer_steps():
    model = tiny("qwen2")
    adapter = apply_adapter(model, cfg(kind="tinylora", forward="fused"), "t")
    opt = torch.optim.SGD(adapter.trainable_parameters(), lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(IDS).logits.pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        fused = model(IDS).logits
        for layer in adapter.layers.values():
            layer.forward_mode = "unmerged"
        reference = model(IDS).logits
    assert not torch.allclose(fused, tiny("qwen2")(IDS).logits)
    assert torch.allclose(fused, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["tinylora", "lora_xs", "lora"])
def test_peft_export_reproduces_outputs(tmp_path, kind):
    from peft import PeftModel

    adapter = apply_adapter(tiny("qwen2"), cfg(kind=kind, r=2, u=3, tie=4, sharing="structured"), "t")
    randomize(adapter, scale=0.3)
    with torch.no_grad():
        ours = adapter.model(IDS).logits
    adapter.export_peft(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(tiny("qwen2"), str(tmp_path)).eval()
    assert loaded.peft_config["default"].r == 2
    with torch.no_grad():
        theirs = loaded(IDS).logits
    assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5)


def test_native_save_roundtrip_and_identity_check(tmp_path):
    adapter = apply_adapter(tiny("llama"), cfg(kind="tinylora", r=2, u=5, tie="all", projection_seed=7), "t")
    randomize(adapter)
    with torch.no_grad():
        ours = adapter.model(IDS).logits
    adapter.save_native(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["adapter_native.json", "vectors.safetensors"]
    assert (tmp_path / "vectors.safetensors").stat().st_size < 1024
    loaded = load_native(tiny("llama"), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.model(IDS).logits, ours)
    with pytest.raises(ValueError, match="SVD factors"):
        load_native(tiny("llama", seed=5), tmp_path)


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(r=0), "adapter.r"),
        (dict(r=49), "adapter.r=49"),
        (dict(u=0), "adapter.u"),
        (dict(u=2.5), "adapter.u"),
        (dict(tie=0), "adapter.tie"),
        (dict(tie=1.5), "adapter.tie"),
        (dict(tie="some"), "adapter.tie"),
        (dict(sharing="diagonal"), "adapter.sharing"),
        (dict(precision="fp8"), "adapter.precision"),
        (dict(kind="dora"), "adapter.kind"),
        (dict(target_modules=["qkv_proj"]), "adapter.target_modules"),
        (dict(target_modules=[]), "adapter.target_modules"),
        (dict(layers=[7]), "adapter.layers"),
        (dict(forward="lazy"), "adapter.forward"),
    ],
)
def test_bad_input_names_the_field_and_touches_nothing(kw, field):
    model = tiny("qwen2")
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    modules_before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError) as err:
        apply_adapter(model, cfg(**kw), "t")
    assert field in str(err.value)
    assert [type(m) for m in model.modules()] == modules_before
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1]


def test_layers_subset_and_targets():
    adapter = apply_adapter(
        tiny("qwen2"), cfg(kind="tinylora", layers=[0, 2], target_modules=["q_proj", "down_proj"]), "t"
    )
    assert sorted(adapter.layers) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.2.mlp.down_proj",
        "model.layers.2.self_attn.q_proj",
    ]
    assert adapter.trainable_params == 4 * 4
