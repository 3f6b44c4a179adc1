"""Small GGUF files written in the tests with the gguf package: a tiny Qwen2 instruct model in Q8_0 (its
tokenizer the tiny qwen2 BPE of tinyablate.models, its chat template TRL's), and helpers that split a file
into the chunk packages an embedded model is installed as (tinyablate/embedded.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import torch

from tinyablate import models as M


def write_tiny_qwen2_gguf(path: Path, seed: int = 0) -> "torch.nn.Module":
    """A tiny random Qwen2 model written as a GGUF (matrices Q8_0, the rest F32); returns the model."""
    model = M.build_tiny_model("qwen2", seed=seed)
    tok = M.build_local_tokenizer("qwen2")
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny qwen2 instruct")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    _add_tokenizer(w, tok)
    for name, tensor in _gguf_tensors(model).items():
        array = tensor.detach().float().numpy()
        if array.ndim == 2:
            w.add_tensor(
                name,
                gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                raw_shape=gguf.quant_shape_to_byte_shape(array.shape, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def _add_tokenizer(w: "gguf.GGUFWriter", tok) -> None:
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {t["content"] for t in spec["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    merges = spec["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.convert_tokens_to_ids("<|endoftext|>"))
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)


def _gguf_tensors(model) -> dict:
    sd, names = model.state_dict(), {}
    names["token_embd.weight"] = sd["model.embed_tokens.weight"]
    names["output_norm.weight"] = sd["model.norm.weight"]
    names["output.weight"] = sd["lm_head.weight"]
    hf_to_gguf = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for i in range(model.config.num_hidden_layers):
        for hf, gg in hf_to_gguf.items():
            names[f"blk.{i}.{gg}"] = sd[f"model.layers.{i}.{hf}"]
    return names


def install_chunk_packages(site: Path, entry, data: bytes, monkeypatch) -> list[Path]:
    """Split `data` as `entry` (an EmbeddedGGUF) describes into importable package folders under `site`,
    put `site` on sys.path, and return the chunk files (each chunk_bytes[i] long; `data` must have the total)."""
    assert len(data) == entry.total_bytes
    monkeypatch.syspath_prepend(str(site))
    paths, start = [], 0
    for i, size in enumerate(entry.chunk_bytes):
        pkg = site / entry.chunk_module(i)
        member = pkg / entry.chunk_member(i)
        member.parent.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text("")
        member.write_bytes(data[start : start + size])
        paths.append(member)
        start += size
    sys.modules.pop(entry.chunk_module(0), None)
    return paths
