"""Tests of the model registry and loaders (CPU; tiny random models, plus the embedded SmolLM2 when installed;
the embedded models' chunks, conversion and cache: tests/test_embedded.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tinyablate import models as M
from tinyablate.config import ModelConfig
from tinyablate.config import model as registry
from tinyablate.embedded import missing_problem
from tinyablate.models import ModelNotAvailableError

FAMILIES = ["qwen2", "llama"]
QUESTION = [{"role": "user", "content": "What is 2+3? Answer with just the number."}]
SMOLLM2_MISSING = missing_problem("smollm2-135m")


def _tiny_cfg(family: str, **kw) -> ModelConfig:
    return ModelConfig(**{"name": f"tiny-{family}", "device": "cpu", **kw})


# ------------------------------------------------------------------------------------------
# Tiny random models
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_loads_frozen_with_chat_tokenizer(family):
    model, tok, info = M.load_model_and_tokenizer(_tiny_cfg(family, attn_implementation="eager"))
    assert info is M.MODELS[f"tiny-{family}"] and info.family == family
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.config._attn_implementation == "eager"
    assert model.config.tie_word_embeddings is False
    assert model.config.vocab_size == len(tok)
    assert M.count_parameters(model) == info.n_params
    assert tok.padding_side == "left" and tok.pad_token is not None and tok.pad_token != tok.eos_token
    assert tok.chat_template == M.trl_chat_template(family)


def test_tiny_chat_templates_use_the_family_special_tokens():
    qwen = M.build_local_tokenizer("qwen2")
    text = qwen.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert qwen.eos_token == "<|im_end|>" and qwen.bos_token is None
    llama = M.build_local_tokenizer("llama")
    text = llama.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert llama.eos_token == "<|eot_id|>"
    for tok in (qwen, llama):  # every special token of the template is one token, not pieces
        ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True)["input_ids"]
        specials = [t for t in tok.convert_ids_to_tokens(ids) if t.startswith("<|")]
        assert specials and all(t in tok.all_special_tokens or t in tok.get_vocab() for t in specials)
        assert tok.decode(ids) == tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)


def test_llama_tokenizer_adds_bos_once():
    tok = M.build_local_tokenizer("llama")
    bos = tok.bos_token_id
    assert tok("7 + 8")["input_ids"][0] == bos
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids.count(bos) == 1 and ids[0] == bos


def test_tiny_tokenizer_splits_digits_and_round_trips():
    tok = M.build_local_tokenizer("qwen2")
    text = "Tom has 1234 apples; 56 * 7 = 392."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert [t for t in tok.tokenize("1234") if t.strip("Ġ")] == ["1", "2", "3", "4"]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_runs_and_left_pads_a_batch(family):
    model, tok, _ = M.load_model_and_tokenizer(_tiny_cfg(family))
    prompts = [QUESTION, [{"role": "user", "content": "Hi"}]]
    enc = tok.apply_chat_template(
        prompts, add_generation_prompt=True, return_dict=True, return_tensors="pt", padding=True
    )
    assert (enc["attention_mask"][:, -1] == 1).all()  # left padding: every row ends with real tokens
    out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    again = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert out.shape[0] == 2 and enc["input_ids"].shape[1] < out.shape[1] <= enc["input_ids"].shape[1] + 6
    assert torch.equal(out, again)


@pytest.mark.parametrize("family,stop", [("qwen2", "<|im_end|>"), ("llama", "<|eot_id|>")])
def test_generation_stops_at_the_end_of_turn_token(family, stop):
    model, tok, _ = M.load_model_and_tokenizer(_tiny_cfg(family))
    stop_id = tok.convert_tokens_to_ids(stop)
    assert stop_id in model.generation_config.eos_token_id and tok.eos_token_id == stop_id

    def force_stop(_module, _inputs, logits):  # make the end-of-turn token the greedy choice
        logits[..., stop_id] += 1e4
        return logits

    handle = model.lm_head.register_forward_hook(force_stop)
    try:
        enc = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    finally:
        handle.remove()
    assert out[0, enc["input_ids"].shape[1] :].tolist() == [stop_id]


def test_tiny_models_are_deterministic_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = M.build_tiny_model("qwen2", seed=5)
    assert torch.equal(torch.rand(3), expected)
    b = M.build_tiny_model("qwen2", seed=5)
    c = M.build_tiny_model("qwen2", seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert M.model_identity("tiny-qwen2", a) == M.model_identity("tiny-qwen2", b)
    assert M.model_identity("tiny-qwen2", a) != M.model_identity("tiny-qwen2", c)


def test_tiny_model_overrides_and_build_speed():
    M.build_tiny_model("llama")  # warm the lazy imports of the modeling code
    start = time.perf_counter()
    model = M.build_tiny_model("llama", seed=1, hidden_size=32, num_hidden_layers=1)
    assert time.perf_counter() - start < 2.0
    assert model.config.hidden_size == 32 and len(model.model.layers) == 1


def test_init_seed_reaches_the_random_model():
    m0, _, _ = M.load_model_and_tokenizer(_tiny_cfg("llama", init_seed=0))
    m1, _, _ = M.load_model_and_tokenizer(_tiny_cfg("llama", init_seed=1))
    ref = M.build_tiny_model("llama", seed=1)
    assert torch.equal(m1.lm_head.weight, ref.lm_head.weight)
    assert not torch.equal(m0.lm_head.weight, m1.lm_head.weight)


# ------------------------------------------------------------------------------------------
# Config validation and registry
# ------------------------------------------------------------------------------------------


def test_registry_entries():
    assert set(M.MODELS) == {
        "qwen2.5-0.5b",
        "qwen2.5-1.5b",
        "qwen2.5-3b",
        "qwen2.5-7b",
        "llama3.2-1b",
        "llama3.2-3b",
        "llama3.1-8b",
        "smollm2-135m",
        "qwen2.5-coder-0.5b",
        "qwen2.5-coder-1.5b",
        "tiny-qwen2",
        "tiny-llama",
    }
    for name, info in M.MODELS.items():
        assert info.name == name and info.source in registry.SOURCES and info.family in registry.FAMILIES
        assert (info.hub_id is None) == (info.source == "random")
    assert M.MODELS["qwen2.5-7b"].hub_id == "Qwen/Qwen2.5-7B-Instruct"
    assert M.MODELS["llama3.1-8b"].hub_id == "meta-llama/Llama-3.1-8B-Instruct"
    assert 7.0e9 < M.MODELS["qwen2.5-7b"].n_params < 8.0e9 and M.MODELS["llama3.2-1b"].size == "1B"
    with pytest.raises(Exception):
        M.MODELS["qwen2.5-7b"].size = "8B"  # frozen


def test_default_config_is_valid():
    ModelConfig().validate()
    assert ModelConfig().name == "smollm2-135m"


@pytest.mark.parametrize(
    "field,value",
    [
        ("name", "gpt-5"),
        ("dtype", "fp32"),
        ("attn_implementation", "flash"),
        ("device", "gpu"),
        ("device", "cuda:x"),
        ("path", ""),
        ("hub_id", " "),
        ("cache_dir", ""),
        ("init_seed", -1),
        ("init_seed", 1.5),
        ("revision", ""),
    ],
)
def test_validation_names_field_value_and_allowed(field, value):
    cfg = ModelConfig(**{"name": "qwen2.5-0.5b", field: value})
    with pytest.raises(ValueError) as err:
        cfg.validate()
    msg = str(err.value)
    assert f"model.{field}=" in msg and repr(value) in msg and "is invalid: expected" in msg


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError) as err:
        M.load_model_and_tokenizer(ModelConfig(name="qwen9-1t"))
    assert "model.name='qwen9-1t'" in str(err.value)
    assert all(name in str(err.value) for name in M.MODELS)
    with pytest.raises(ValueError, match="tiny-llama"):
        M.get_model_info("nope")


@pytest.mark.parametrize("field,value", [("path", "/some/dir"), ("hub_id", "a/b"), ("revision", "main")])
def test_random_models_refuse_weight_locations(field, value):
    with pytest.raises(ValueError, match=f"model.{field}="):
        ModelConfig(name="tiny-qwen2", **{field: value}).validate()


def test_revision_only_for_hub_downloads(tmp_path):
    ModelConfig(name="qwen2.5-0.5b", revision="main").validate()
    ModelConfig(name="smollm2-135m", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", revision="main").validate()
    for cfg in (
        ModelConfig(name="qwen2.5-0.5b", path=str(tmp_path), revision="main"),
        ModelConfig(name="smollm2-135m", revision="main"),
    ):
        with pytest.raises(ValueError, match="model.revision="):
            cfg.validate()


def test_cuda_and_flash_attention_need_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="model.device='cuda'"):
        M.load_model_and_tokenizer(_tiny_cfg("qwen2", device="cuda"))
    with pytest.raises(ValueError, match="model.attn_implementation='flash_attention_2'"):
        M.load_model_and_tokenizer(_tiny_cfg("qwen2", attn_implementation="flash_attention_2"))


def test_dtype_and_device_resolution():
    cpu = torch.device("cpu")
    assert M.resolve_device("cpu") == cpu
    assert M.resolve_dtype("auto", cpu) == torch.float32
    assert M.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    model, _, _ = M.load_model_and_tokenizer(_tiny_cfg("llama", dtype="bfloat16"))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYABLATE_CACHE", str(tmp_path / "env"))
    assert M.resolve_cache_dir(ModelConfig()) == tmp_path / "env"
    assert M.resolve_cache_dir(ModelConfig(cache_dir=str(tmp_path / "cfg"))) == tmp_path / "cfg"
    monkeypatch.delenv("TINYABLATE_CACHE")
    assert M.resolve_cache_dir(ModelConfig()) == Path.home() / ".cache" / "tinyablate"


# ------------------------------------------------------------------------------------------
# Hub / local-path loading and its errors
# ------------------------------------------------------------------------------------------


def test_missing_path_says_how_to_provide_the_model_and_imports_nothing(tmp_path):
    missing = tmp_path / "nowhere"
    script = (
        "import sys; import tinyablate.models as M; before = set(sys.modules)\n"
        f"cfg = M.ModelConfig(name='qwen2.5-7b', path={str(missing)!r})\n"
        "try:\n    M.load_model_and_tokenizer(cfg)\nexcept M.ModelNotAvailableError as e:\n    print(e)\n"
        "new = set(sys.modules) - before\n"
        "print('HEAVY' if {'torch', 'transformers'} & new else 'LIGHT')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"model.path='{missing}' does not exist" in out.stdout
    assert "Qwen/Qwen2.5-7B-Instruct" in out.stdout and "HF_HUB_OFFLINE" in out.stdout
    assert out.stdout.strip().endswith("LIGHT")


def test_path_without_a_model_is_reported(tmp_path):
    cfg = ModelConfig(name="llama3.2-1b", path=str(tmp_path), device="cpu")
    with pytest.raises(ModelNotAvailableError) as err:
        M.load_model_and_tokenizer(cfg)
    msg = str(err.value)
    assert f"model.path='{tmp_path}' has no config.json" in msg
    assert "hf download meta-llama/Llama-3.2-1B-Instruct" in msg and "hf auth login" in msg
    M.build_tiny_model("llama").config.save_pretrained(tmp_path)  # a config but no weights/tokenizer
    with pytest.raises(ModelNotAvailableError, match="could not be loaded as a transformers model"):
        M.load_model_and_tokenizer(cfg)


def test_unreachable_hub_says_how_to_provide_the_model(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ModelConfig(name="qwen2.5-0.5b", hub_id="tinyablate-test/does-not-exist", device="cpu")
    with pytest.raises(ModelNotAvailableError) as err:
        M.load_model_and_tokenizer(cfg)
    msg = str(err.value)
    assert "tinyablate-test/does-not-exist" in msg and "model.path=" in msg and "HF_HUB_OFFLINE" in msg


@pytest.mark.parametrize("family,name", [("qwen2", "qwen2.5-0.5b"), ("llama", "llama3.2-1b")])
def test_local_path_loads_a_saved_model(tmp_path, family, name):
    source = M.build_tiny_model(family, seed=2)
    M.build_local_tokenizer(family).save_pretrained(tmp_path)
    source.save_pretrained(tmp_path)
    cfg = ModelConfig(name=name, path=str(tmp_path), device="cpu", attn_implementation="eager")
    model, tok, info = M.load_model_and_tokenizer(cfg)
    assert info.name == name and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.equal(model.lm_head.weight, source.lm_head.weight)
    assert tok.padding_side == "left" and tok.chat_template == M.trl_chat_template(family)
    identity = M.model_identity(cfg, model)
    assert identity.startswith(f"{name}__path-") and "/" not in identity
    assert identity == M.model_identity(cfg, model)


def test_missing_chat_template_is_taken_from_the_family(tmp_path):
    tok = M.build_local_tokenizer("qwen2")
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    M.build_tiny_model("qwen2").save_pretrained(tmp_path)
    _, loaded, _ = M.load_model_and_tokenizer(ModelConfig(name="qwen2.5-0.5b", path=str(tmp_path), device="cpu"))
    assert loaded.chat_template == M.trl_chat_template("qwen2")


def test_model_identity_for_hub_and_gguf():
    class Stub:
        class config:
            _commit_hash = "abc123"

    assert M.model_identity("qwen2.5-7b", Stub()) == "qwen2.5-7b__Qwen--Qwen2.5-7B-Instruct@abc123"
    pinned = ModelConfig(name="qwen2.5-7b", revision="refs/pr/1")
    assert M.model_identity(pinned, Stub()) == "qwen2.5-7b__Qwen--Qwen2.5-7B-Instruct@refs_pr_1"
    assert M.model_identity("smollm2-135m", Stub()) == "smollm2-135m__gguf-SmolLM2-135M-Instruct.Q4_1"
    coder = "qwen2.5-coder-0.5b__gguf-Qwen2.5-Coder-0.5B-Instruct.Q4_K_M"
    assert M.model_identity("qwen2.5-coder-0.5b", Stub()) == coder


# ------------------------------------------------------------------------------------------
# Embedded SmolLM2: the real conversion (slow)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    if SMOLLM2_MISSING:
        pytest.skip(SMOLLM2_MISSING)
    cache = tmp_path_factory.mktemp("tinyablate-cache")
    M.ensure_converted(cache, M.EMBEDDED["smollm2-135m"])
    return cache


@pytest.mark.slow
def test_smollm2_converts_to_a_plain_model_that_saves_and_reloads(smollm2_cache, tmp_path):
    cfg = ModelConfig(name="smollm2-135m", cache_dir=str(smollm2_cache), device="cpu")
    model, tok, info = M.load_model_and_tokenizer(cfg)
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    assert type(model).__name__ == "LlamaForCausalLM" and info.family == "llama"
    assert abs(M.count_parameters(model) - info.n_params) < 0.01 * info.n_params
    assert tok.chat_template and "<|im_start|>" in tok.chat_template and tok.padding_side == "left"

    enc = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "5" in answer, answer
    assert out[0, -1].item() == tok.eos_token_id  # stopped at <|im_end|>, not at max_new_tokens

    model.save_pretrained(tmp_path)  # refused for GGUF-quantized models
    tok.save_pretrained(tmp_path)
    again, tok2, _ = M.load_model_and_tokenizer(ModelConfig(name="smollm2-135m", path=str(tmp_path), device="cpu"))
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    assert tok2.chat_template == tok.chat_template
