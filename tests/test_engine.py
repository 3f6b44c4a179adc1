"""The generation engine (tinyablate/engine) against HF generate on CPU: its non-graph path.

The CUDA-graph path replays the same decode step; tests/test_engine_gpu.py covers its capture.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

from tinyablate.config import ModelConfig
from tinyablate.engine import EngineOptions, GenerationEngine, Sampling, resolve_engine
from tinyablate.models import load_model_and_tokenizer
from tinyablate.sampling import KeyedGumbelSampler, sequence_key

TEXTS = [
    "What is 2+3?",
    "Hi",
    "Tell me a long story about a cat and a dog who became friends one day",
    "7*8=?",
    "x",
    "Count from one to twenty, please, slowly and with care",
]


def _load(name, tmp_path=None):
    cache = {} if tmp_path is None else {"cache_dir": str(tmp_path)}
    return load_model_and_tokenizer(ModelConfig(name=name, **cache))[:2]


def _prompts(tok, texts=TEXTS):
    out = []
    for t in texts:
        ids = tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def _hf(model, tok, prompts, new, eos, **kwargs):
    """HF generate on the same left-padded batch; rows cut after their first EOS, as the engine returns them."""
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt", padding_side="left")
    sampling = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=new, pad_token_id=tok.pad_token_id, eos_token_id=eos, **{**sampling, **kwargs}
        )
    rows = out[:, batch["input_ids"].shape[1] :].tolist()
    return [r[: next((i + 1 for i, t in enumerate(r) if t in eos), len(r))] for r in rows]


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_greedy_tokens_match_hf_generate_on_tiny_models(name, tmp_path):
    model, tok = _load(name, tmp_path)
    prompts = _prompts(tok)
    # Random tiny models never say their EOS: stop instead on a token one row emits mid-way, so rows end
    # at different steps (finished rows padded, the others go on).
    free = _hf(model, tok, prompts, 64, [-1])
    eos = [free[2][20]]
    ref = _hf(model, tok, prompts, 64, eos)
    assert 1 < len({len(r) for r in ref}) and min(len(r) for r in ref) < 64 and max(len(r) for r in ref) == 64
    ours = GenerationEngine(model, tok.pad_token_id, eos, use_graphs=False).generate(prompts, 64)
    assert ours == ref


def test_greedy_tokens_match_hf_generate_on_smollm2():
    model, tok = _load("smollm2-135m")
    prompts = _prompts(tok)
    eos = [tok.eos_token_id]
    ref = _hf(model, tok, prompts, 64, eos)
    ends = [r[-1] in eos for r in ref]
    assert any(ends) and not all(ends), "the batch must hold rows that stop and rows that run to the limit"
    assert GenerationEngine(model, tok.pad_token_id, eos, use_graphs=False).generate(prompts, 64) == ref


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_keyed_samples_match_the_keyed_hf_path(top_p, tmp_path):
    """Also with each prompt repeated, as GRPO's generations are (their prefill is computed once)."""
    model, tok = _load("tiny-qwen2", tmp_path)
    prompts = [p for p in _prompts(tok) for _ in range(3)]
    keys = [sequence_key(3, 1, row, 0) for row in range(len(prompts))]
    sampler = KeyedGumbelSampler(keys, 0.7, top_p)
    ref = _hf(model, tok, prompts, 48, [-1], logits_processor=LogitsProcessorList([sampler]))
    ours = GenerationEngine(model, tok.pad_token_id, [-1], use_graphs=False).generate(
        prompts, 48, Sampling(temperature=0.7, top_p=top_p, keyed=True), keys=keys
    )
    assert ours == ref
    greedy = GenerationEngine(model, tok.pad_token_id, [-1], use_graphs=False).generate(prompts, 48)
    assert ours != greedy  # the noise is there


@pytest.mark.parametrize("top_k", [0, 5])
@pytest.mark.parametrize("compile_glue", [False, True])
def test_sampled_token_frequencies_match_softmax_at_temperature(top_k, compile_glue, tmp_path):
    model, tok = _load("tiny-llama", tmp_path)
    prompt = _prompts(tok, ["Hi"])[0]
    n, temperature = 6000, 0.5
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float() / temperature
    if top_k:
        logits[logits < logits.topk(top_k).values[-1]] = float("-inf")
    expected = logits.softmax(-1)
    torch.manual_seed(0)
    engine = GenerationEngine(
        model, tok.pad_token_id, [-1], use_graphs=False, options=EngineOptions(compile_glue=compile_glue)
    )
    assert engine.layers.compiles_layers == compile_glue  # the compiled exponential race (engine/sampler.py)
    first = [c[0] for c in engine.generate([prompt] * n, 1, Sampling(temperature=temperature, top_k=top_k))]
    freq = torch.bincount(torch.tensor(first), minlength=len(expected)).float() / n
    assert expected.max() < 0.9  # a spread distribution, so the check has teeth
    torch.testing.assert_close(freq, expected, atol=0.02, rtol=0)
    assert freq[expected == 0].sum() == 0


@pytest.mark.parametrize("pack", [True, False])
def test_next_rollout_uses_the_v_the_optimizer_just_changed(tmp_path, pack):
    """The engine reads the fused weights re-merged for the new v (fails if it kept the old ones)."""
    from tinyablate.adapters import apply_adapter
    from tinyablate.config import AdapterConfig, SVDConfig

    model, tok = _load("tiny-qwen2", tmp_path)
    adapter = apply_adapter(model, AdapterConfig(kind="tinylora", r=2, u=4, tie=1, svd=SVDConfig(cache_dir="")), "t")
    prompts = _prompts(tok)
    engine = GenerationEngine(adapter.model, tok.pad_token_id, [-1], use_graphs=False, options=EngineOptions(pack=pack))
    before = engine.generate(prompts, 24)
    assert before == _hf(adapter.model, tok, prompts, 24, [-1])
    params = adapter.trainable_parameters()
    layer = next(iter(adapter.layers.values()))
    w_eff = layer._w_eff
    engine.graphs.table["sentinel"] = object()  # stands for captured graphs (CPU has none)
    opt = torch.optim.SGD(params, lr=50.0)
    ids = torch.tensor([prompts[0]])
    adapter.model.train()
    (-adapter.model(ids).logits[0, -1, :7].sum()).backward()
    opt.step()
    after = engine.generate(prompts, 24)
    assert after == _hf(adapter.model, tok, prompts, 24, [-1]) and after != before
    assert layer._w_eff is w_eff and "sentinel" in engine.graphs.table  # re-merged in place: graphs stay valid
    torch.testing.assert_close(layer._w_eff, layer.weight + layer.delta_weight(), atol=1e-5, rtol=0)
    if pack:  # the merged weight lives in the engine's packed q/k/v rows
        packed = engine.layers.packs[0].qkv.weight
        assert w_eff.data_ptr() == packed.data_ptr()
        layer.drop_cache()  # the layer lets go of the rows; the engine hands them back and merges there again
        assert engine.generate(prompts, 24) == after and "sentinel" in engine.graphs.table
        assert layer._w_eff.data_ptr() == packed.data_ptr()
    else:
        layer.drop_cache()  # the merged weight will be a new tensor: graphs must be captured again
        engine.generate(prompts, 2)
        assert "sentinel" not in engine.graphs.table
        engine.graphs.table["sentinel"] = object()
    adapter.merge()  # ΔW folded into the weights, fused path off: again a different computation
    merged = engine.generate(prompts, 24)
    assert "sentinel" not in engine.graphs.table and merged == after


def test_weight_signature_reads_and_remerge_merges(tmp_path):
    """The signature of the weights changes nothing; the merge for a new v is remerge's (refresh_weights calls
    it before the signature), and a first merge changes the signature (a new merged weight's address)."""
    from tinyablate.adapters import apply_adapter
    from tinyablate.adapters.layers import remerge
    from tinyablate.config import AdapterConfig, SVDConfig
    from tinyablate.engine.graphs import weight_signature

    model, _ = _load("tiny-qwen2", tmp_path)
    adapter = apply_adapter(model, AdapterConfig(kind="tinylora", r=2, u=4, tie=1, svd=SVDConfig(cache_dir="")), "t")
    layer = next(iter(adapter.layers.values()))
    modules = list(adapter.model.modules())
    assert layer.merges and layer._w_eff is None
    unmerged = weight_signature(modules, [])
    assert layer._w_eff is None and weight_signature(modules, []) == unmerged
    remerge(modules)
    merged = weight_signature(modules, [])
    assert merged != unmerged and layer.state_signature()[3] == layer._w_eff.data_ptr()
    with torch.no_grad():
        layer.v.add_(1.0)
    stale = layer._w_eff.clone()
    assert weight_signature(modules, []) == merged and torch.equal(layer._w_eff, stale)  # no merge
    remerge(modules)
    assert not torch.equal(layer._w_eff, stale) and weight_signature(modules, []) == merged  # in place
    torch.testing.assert_close(layer._w_eff, layer.weight + layer.delta_weight(), atol=1e-5, rtol=0)


def test_engine_setting_resolves_per_device():
    assert resolve_engine("auto", "cuda") == "graph" and resolve_engine("auto", "cpu") == "hf"
    assert resolve_engine("eager", "cpu") == "eager"
    with pytest.raises(ValueError, match="'graph' needs a CUDA device"):
        resolve_engine("graph", "cpu")
    # LLM.int8's outlier split cannot be captured (tests/test_quantization_gpu.py): auto = HF generate there
    assert resolve_engine("auto", "cuda", "int8") == "hf" and resolve_engine("auto", "cuda", "nf4") == "graph"
    with pytest.raises(ValueError, match="cannot capture a model.quantization=int8 base"):
        resolve_engine("graph", "cuda", "int8")


def test_unsupported_sampling_and_architecture_are_refused(tmp_path):
    with pytest.raises(ValueError, match="keyed sampling needs a temperature"):
        Sampling(keyed=True)
    model, tok = _load("tiny-qwen2", tmp_path)
    model.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="rollout_engine=hf"):
        GenerationEngine(model, 0, [1])


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_the_fixed_shapes_graphs_capture_give_the_same_tokens(name, tmp_path):
    """Power-of-two batch (filler rows) and key lengths padded to a bucket (masked keys): as HF generate."""
    model, tok = _load(name, tmp_path)
    prompts = _prompts(tok)[:5]
    keys = [sequence_key(0, 0, row, 0) for row in range(len(prompts))]
    engine = GenerationEngine(model, tok.pad_token_id, [-1], use_graphs=False, options=EngineOptions(length_bucket=16))
    engine.fixed_shapes = True
    engine.reserve(8, 160)
    assert engine.generate(prompts, 40) == _hf(model, tok, prompts, 40, [-1])
    sampler = KeyedGumbelSampler(keys, 1.0)
    ref = _hf(model, tok, prompts, 40, [-1], logits_processor=LogitsProcessorList([sampler]))
    assert engine.generate(prompts, 40, Sampling(temperature=1.0, keyed=True), keys=keys) == ref


def test_matmul_decode_attention_gives_the_same_tokens(tmp_path):
    model, tok = _load("tiny-llama", tmp_path)
    prompts = _prompts(tok)
    engine = GenerationEngine(
        model, tok.pad_token_id, [-1], use_graphs=False, options=EngineOptions(attention="matmul")
    )
    assert engine.generate(prompts, 32) == _hf(model, tok, prompts, 32, [-1])


# -- settings and the seams (GRPO through TRL, evaluation) ---------------------------------------
def test_engine_settings_are_validated_with_the_cell_and_left_out_of_its_id():
    from dataclasses import replace

    from tinyablate.config import AlgoConfig, CellSpec, EvalConfig, TaskConfig, cell_id, validate_spec
    from tinyablate.evaluation import base_cache_key

    with pytest.raises(ValueError, match=r"algo.rollout_engine='fast' is invalid"):
        validate_spec(CellSpec(algo=AlgoConfig(rollout_engine="fast")))
    with pytest.raises(ValueError, match=r"eval.engine='fast' is invalid"):
        validate_spec(CellSpec(eval=EvalConfig(engine="fast")))
    with pytest.raises(ValueError, match=r"algo.rollout_engine=graph needs a CUDA GPU.*algo.rollout_engine=eager"):
        validate_spec(CellSpec(gpus=0, algo=AlgoConfig(rollout_engine="graph")))
    with pytest.raises(ValueError, match=r"eval.engine=graph needs a CUDA GPU"):
        validate_spec(CellSpec(gpus=0, eval=EvalConfig(engine="graph")))
    validate_spec(CellSpec(gpus=1, algo=AlgoConfig(rollout_engine="graph"), eval=EvalConfig(engine="graph")))
    from tinyablate.config import ModelConfig

    with pytest.raises(ValueError, match=r"eval.engine=graph cannot run on model.quantization=int8.*eval.engine=auto"):
        validate_spec(CellSpec(gpus=1, model=ModelConfig(quantization="int8"), eval=EvalConfig(engine="graph")))
    validate_spec(CellSpec(gpus=1, model=ModelConfig(quantization="nf4"), eval=EvalConfig(engine="graph")))
    base = CellSpec()
    other = replace(base, algo=AlgoConfig(rollout_engine="hf"), eval=EvalConfig(engine="eager"))
    assert cell_id(other) == cell_id(base)
    key = base_cache_key("m", TaskConfig(), EvalConfig(), "torch.float32")
    assert key == base_cache_key("m", TaskConfig(), EvalConfig(engine="hf", engine_batch_size=8), "torch.float32")


def test_evaluation_through_the_engine_gives_hf_generates_completions():
    from tinyablate.config import EvalConfig, TaskConfig
    from tinyablate.evaluation import evaluate
    from tinyablate.tasks import load_task

    model, tok = _load("smollm2-135m")
    task = load_task(TaskConfig(name="arithmetic", max_value=9, train_size=4, eval_size=10, scorer="flexible"))
    problems = task.eval_problems()
    hf = evaluate(model, tok, task, problems, EvalConfig(batch_size=5, max_new_tokens=24, engine="hf"))
    ours = evaluate(model, tok, task, problems, EvalConfig(engine_batch_size=4, max_new_tokens=24, engine="eager"))
    assert [r["completion"] for r in ours.records] == [r["completion"] for r in hf.records]
    assert ours.accuracy_flexible == hf.accuracy_flexible


def test_keyed_grpo_cell_trains_the_same_v_with_the_engine(tmp_path, monkeypatch):
    """TRL's seam: rollouts from the engine (keyed) are HF's keyed rollouts, so the cells train the same v."""
    from safetensors.torch import load_file

    import tinyablate.train.trl_seam as seam
    from tinyablate.tasks.base import Task

    # The task's reward is always 0 for a random tiny model; digits in the text are earned unevenly
    # (GRPO takes its reward from the task: Task.reward_fn).
    monkeypatch.setattr(
        Task,
        "reward_fn",
        lambda self: lambda completions, **kw: [float(sum(ch.isdigit() for ch in str(c))) for c in completions],
    )
    calls = []
    real = seam.engine_rollouts
    monkeypatch.setattr(seam, "engine_rollouts", lambda *a, **k: calls.append(1) or real(*a, **k))
    from test_cell import tiny_spec  # tests/ is on sys.path, as test_distributed.py relies on
    from tinyablate.cell import run_cell
    from tinyablate.cell_folder import ADAPTER_NATIVE_DIR, CellFolder
    from tinyablate.config import LoggerConfig

    vectors = {}
    for engine in ("hf", "eager"):
        spec = tiny_spec(tmp_path / engine, rollout_sampler="keyed", rollout_engine=engine, max_steps=2, save_steps=2)
        spec.logger = LoggerConfig(mode="disabled")
        result = run_cell(spec)
        assert result["status"] == "completed", result.get("error")
        vectors[engine] = load_file(str(CellFolder.of(spec).file(ADAPTER_NATIVE_DIR) / "vectors.safetensors"))
        rewards = result["metrics"]["reward"]
        vectors[engine + "_reward"] = rewards
    assert len(calls) == 2  # one rollout batch per step, through the engine (none in the hf cell)
    assert vectors["hf_reward"] == vectors["eager_reward"]
    for name, v in vectors["hf"].items():
        assert v.abs().max() > 0 and torch.equal(v, vectors["eager"][name]), name


def test_paper_setting_kv_cache_fits_one_80gb_gpu_and_too_much_names_the_settings():
    """256 completions of a GSM8K prompt (< 256 tokens) + 512 new tokens, Qwen2.5-7B, bf16."""
    from transformers import Qwen2Config

    from tinyablate.engine import kv_cache_bytes
    from tinyablate.train.rollouts import check_cache_fits

    cfg = Qwen2Config(
        hidden_size=3584,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        num_hidden_layers=28,
        vocab_size=152064,
    )
    need = kv_cache_bytes(cfg, 256, 256 + 512, torch.bfloat16)
    assert need == 2 * 28 * 4 * 128 * 2 * 256 * 768  # 10.5 GiB
    gib = 2**30
    weights = 15.2 * gib + 13.1 * gib  # bf16 base + TinyLoRA's merged copies of all 196 projections
    check_cache_fits(need, free=int(80 * gib - weights), total=80 * gib, batch=256, length=768, world_size=1)
    with pytest.raises(
        ValueError,
        match="lower algo.prompts_per_step, algo.num_generations or algo.max_completion_length.*algo.rollout_engine=hf",
    ):
        check_cache_fits(4 * need, free=int(80 * gib - weights), total=80 * gib, batch=1024, length=768, world_size=1)


def test_compiled_glue_rounds_where_hf_rounds_in_bf16():
    """The decode step's compiled norm + residual add gives HF's eager bf16 numbers bit for bit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tinyablate.engine.compiled import _Glue

    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).bfloat16()
    norm = llama.model.layers[0].input_layernorm
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    glue = _Glue(llama.model, None, compiled=True)
    x, delta = torch.randn(2, 32, 1, 256).bfloat16()
    summed, normed = glue.add_norm(norm, x, delta)
    with torch.no_grad():
        assert torch.equal(summed, x + delta) and torch.equal(normed, norm(x + delta))


def test_packed_projections_follow_edited_weights_and_skip_what_cannot_be_packed(tmp_path):
    """q/k/v and gate/up run packed; a frozen weight edited in place is re-copied (fails if the stale copy
    were read); a PEFT LoRA model's layers are not packed and still give HF's tokens."""
    from tinyablate.adapters import apply_adapter
    from tinyablate.config import AdapterConfig

    model, tok = _load("tiny-llama", tmp_path)
    prompts = _prompts(tok)
    engine = GenerationEngine(model, tok.pad_token_id, [-1], use_graphs=False)
    assert engine.generate(prompts, 32) == _hf(model, tok, prompts, 32, [-1])
    assert engine.layers.all_packed
    before = engine.generate(prompts, 32)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(-3.0)
        model.model.layers[1].mlp.up_proj.weight.mul_(2.0)
    after = engine.generate(prompts, 32)
    assert after == _hf(model, tok, prompts, 32, [-1]) and after != before
    unpacked = GenerationEngine(model, tok.pad_token_id, [-1], use_graphs=False, options=EngineOptions(pack=False))
    assert unpacked.generate(prompts, 32) == after and not any(unpacked.layers.packs[0])

    lora = apply_adapter(model, AdapterConfig(kind="lora", r=4, lora_alpha=8.0), "t").model
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    engine = GenerationEngine(lora, tok.pad_token_id, [-1], use_graphs=False)
    assert engine.generate(prompts, 32) == _hf(lora, tok, prompts, 32, [-1])
    assert not any(p for packs in engine.layers.packs for p in packs)


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_compiled_decode_layers_give_hf_generates_tokens(name, tmp_path):
    """With every projection packed, compile_glue runs each decoder layer of the decode step as two
    compiled functions (engine/compiled.py); they write the same KV cache and give HF's greedy tokens in fp32."""
    from tinyablate.adapters import apply_adapter
    from tinyablate.config import AdapterConfig, SVDConfig

    model, tok = _load(name, tmp_path)
    adapter = apply_adapter(model, AdapterConfig(kind="tinylora", r=2, u=4, tie=1, svd=SVDConfig(cache_dir="")), "t")
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.normal_(0, 0.5)
    prompts = _prompts(tok)
    ref = _hf(adapter.model, tok, prompts, 40, [-1])
    fused = GenerationEngine(
        adapter.model, tok.pad_token_id, [-1], use_graphs=False, options=EngineOptions(compile_glue=True)
    )
    plain = GenerationEngine(adapter.model, tok.pad_token_id, [-1], use_graphs=False)
    assert fused.layers.compiles_layers
    assert fused.generate(prompts, 40) == ref and fused.layers.all_packed
    assert plain.generate(prompts, 40) == ref
    for a, b in zip(
        fused.cache.keys + fused.cache.values, plain.cache.keys + plain.cache.values
    ):  # the compiled cache writes land in place
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_repeated_prompts_are_prefilled_once_and_spread_to_their_rows(tmp_path, monkeypatch):
    from tinyablate.engine import cache, layers

    model, tok = _load("tiny-llama", tmp_path)
    distinct = _prompts(tok)
    prompts = [distinct[i] for i in (0, 1, 0, 2, 1, 0, 3, 3)]
    assert cache.dedupe(torch.tensor([[1, 2], [3, 4], [1, 2], [1, 2], [5, 6]])) == ([0, 1, 4], [0, 1, 0, 0, 2])
    seen = []
    forward = layers.DecoderLayers._forward_prompts
    monkeypatch.setattr(
        layers.DecoderLayers,
        "_forward_prompts",
        lambda self, ids, *a: seen.append(ids.shape[0]) or forward(self, ids, *a),
    )
    engine = GenerationEngine(model, tok.pad_token_id, [-1], use_graphs=False)
    assert engine.generate(prompts, 24) == _hf(model, tok, prompts, 24, [-1])
    assert seen == [4]  # 4 distinct prompts of 8 rows


def test_compiled_glue_of_decode_prefill_and_training_keep_separate_recompile_budgets():
    """Dynamo allows a code object 8 compiled versions; the decode step (fixed shapes, fullgraph), the prefill
    and training (dynamic shapes) each compile rms_norm on their own copy of its code (kernels.own_code), so
    many decode shapes plus prefill and training calls never hit that limit (it failed so before)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tinyablate.engine.compiled import _Glue
    from tinyablate.kernels import rms_norm
    from tinyablate.train.glue import _compiled

    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    norm = llama.model.norm
    decode, prefill = _Glue(llama.model, None, compiled=True), _Glue(llama.model, None, compiled=True, dynamic=True)
    for rows, width in ((2, 7), (3, 9), (1, 5), (1, 1)):
        x = torch.randn(rows, width, 32)
        torch.testing.assert_close(prefill.norm(norm, x), norm(x))
        torch.testing.assert_close(_compiled(rms_norm)(x, norm.weight, norm.variance_epsilon), norm(x))
    for rows in (1, 2, 3, 4, 5, 6, 7):  # fullgraph: past the budget this would raise
        x = torch.randn(rows, 1, 32)
        torch.testing.assert_close(decode.norm(norm, x), norm(x))


def test_engine_for_keeps_the_eos_tensor_the_graphs_read_and_drops_graphs_when_the_tokens_change(tmp_path):
    """engine_for runs before every rollout batch; a captured graph reads the EOS ids from the engine's tensor,
    so the same tokens must keep that very tensor (a new one frees the memory the graphs read: rows stopped on
    whatever a training step later wrote there), and other tokens must drop the graphs."""
    from tinyablate.engine import engine_for

    model, tok = _load("tiny-qwen2", tmp_path)
    engine = engine_for(model, 0, [5, 3], use_graphs=False)
    eos_tensor = engine._eos_t
    engine.graphs.table["sentinel"] = object()  # stands for a captured graph (CPU: none are captured)
    assert engine_for(model, 0, [3, 5, 5], use_graphs=False) is engine
    assert engine._eos_t is eos_tensor and "sentinel" in engine.graphs.table
    engine_for(model, 0, [7], use_graphs=False)
    assert engine.eos == [7] and engine._eos_t.tolist() == [7] and not engine.graphs.table
    engine.graphs.table["sentinel"] = object()
    engine_for(model, 1, [7], use_graphs=False)  # the pad id is baked into a graph too
    assert engine.pad == 1 and not engine.graphs.table
    ps = _prompts(tok)[:3]
    first = engine.generate(ps, 6)
    stop = first[0][2]
    engine_for(model, 1, [stop], use_graphs=False)
    assert engine.generate(ps, 6)[0] == first[0][:3]  # the new EOS ends the row


def test_engine_for_reports_to_the_log_of_its_latest_caller(tmp_path):
    """The base evaluation builds a cell's engine without a log; the rollouts then ask for it with theirs. Their
    lines (the KV cache, recaptures) used to be lost: the engine kept its first caller's silent log."""
    from tinyablate.engine import engine_for

    model, _ = _load("tiny-qwen2", tmp_path)
    engine = engine_for(model, 0, [5], use_graphs=False)  # the base evaluation
    engine.reserve(2, 16)
    lines = []
    assert engine_for(model, 0, [5], use_graphs=False, log=lines.append) is engine  # the rollouts
    engine.reserve(8, 64)
    assert lines == [f"generation engine: KV cache 8 rows x 64 tokens = {engine.cache_bytes / 2**30:.2f} GiB"]
    engine.graphs.log("recapturing")
    assert lines[-1] == "recapturing"
    engine_for(model, 0, [5], use_graphs=False)  # a later caller without a log keeps the rollouts'
    engine.reserve(16, 64)
    assert len(lines) == 3
