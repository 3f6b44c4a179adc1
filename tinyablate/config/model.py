"""Which model a cell uses and how it is placed; the registry of known models (pure data).

The loaders (tinyablate/models.py) read `MODELS` and `ModelConfig`; adding a model is one
`ModelInfo` line here (see the README's "Extending").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from .checks import Checks, Section

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "nf4", "int8")  # tinyablate/quantization.py
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
SOURCES = ("hub", "gguf", "random")
FAMILIES = ("qwen2", "llama")
DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass(frozen=True)
class ModelInfo:
    """One registry entry: where a model comes from and what it is."""

    name: str
    source: str  # "hub" | "gguf" | "random"
    hub_id: Optional[str]  # Hub repo of the checkpoint (for gguf: the original repo; None for random)
    family: str  # "qwen2" | "llama": architecture and chat-template family
    size: str  # human-readable size, e.g. "7B"
    n_params: int  # approximate parameter count (tied embeddings counted once)


_HF_SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
MODELS: dict[str, ModelInfo] = {
    info.name: info
    for info in (
        ModelInfo("qwen2.5-0.5b", "hub", "Qwen/Qwen2.5-0.5B-Instruct", "qwen2", "0.5B", 494_032_768),
        ModelInfo("qwen2.5-1.5b", "hub", "Qwen/Qwen2.5-1.5B-Instruct", "qwen2", "1.5B", 1_543_714_304),
        ModelInfo("qwen2.5-3b", "hub", "Qwen/Qwen2.5-3B-Instruct", "qwen2", "3B", 3_085_938_688),
        ModelInfo("qwen2.5-7b", "hub", "Qwen/Qwen2.5-7B-Instruct", "qwen2", "7B", 7_615_616_512),
        ModelInfo("llama3.2-1b", "hub", "meta-llama/Llama-3.2-1B-Instruct", "llama", "1B", 1_235_814_400),
        ModelInfo("llama3.2-3b", "hub", "meta-llama/Llama-3.2-3B-Instruct", "llama", "3B", 3_212_749_824),
        ModelInfo("llama3.1-8b", "hub", "meta-llama/Llama-3.1-8B-Instruct", "llama", "8B", 8_030_261_248),
        ModelInfo("smollm2-135m", "gguf", _HF_SMOLLM2, "llama", "135M", 134_515_008),
        # Embedded Qwen2 (tinyablate/embedded.py): the GGUFs' lm_head is untied, so they count it apart.
        ModelInfo("qwen2.5-coder-0.5b", "gguf", "Qwen/Qwen2.5-Coder-0.5B-Instruct", "qwen2", "0.5B", 630_167_424),
        ModelInfo("qwen2.5-coder-1.5b", "gguf", "Qwen/Qwen2.5-Coder-1.5B-Instruct", "qwen2", "1.5B", 1_777_088_000),
        ModelInfo("tiny-qwen2", "random", None, "qwen2", "0.16M", 156_224),
        ModelInfo("tiny-llama", "random", None, "llama", "0.16M", 155_968),
    )
}


@dataclass
class ModelConfig(Section):
    """Which model to load and how to place it."""

    # Registry name: a key of MODELS above (e.g. "qwen2.5-7b", "smollm2-135m", "tiny-qwen2").
    name: str = "smollm2-135m"
    # Local directory holding a transformers model (config, weights, tokenizer). Overrides the Hub id
    # (and the embedded GGUF of smollm2-135m, qwen2.5-coder-*); nothing is downloaded. None: the Hub / embedded copy.
    path: Optional[str] = None
    # Hub repo id to download; None takes the registry's id. Setting it for an embedded model (smollm2-135m,
    # qwen2.5-coder-*) loads that repo from the Hub instead of the embedded GGUF.
    hub_id: Optional[str] = None
    # Hub revision (branch, tag or commit sha); None: the repo's default branch. Hub downloads only.
    revision: Optional[str] = None
    # Weight dtype: "auto" (bfloat16 on CUDA, float32 elsewhere), "float32", "bfloat16" or "float16".
    dtype: str = "auto"
    # Attention kernel: "eager", "sdpa" or "flash_attention_2" (CUDA and the flash-attn package only).
    attn_implementation: str = "sdpa"
    # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:<index>" or "mps".
    device: str = "auto"
    # Cache root for converted models; None: $TINYABLATE_CACHE, else ~/.cache/tinyablate. Hub
    # downloads stay in the Hugging Face cache (HF_HOME).
    cache_dir: Optional[str] = None
    # Seed of the random initialisation of source="random" models (tiny-*); unused by the others.
    init_seed: int = 0
    # The frozen base's weights (tinyablate/quantization.py, bitsandbytes): "none" (the dtype above),
    # "nf4" (QLoRA: 4-bit NormalFloat, double quantization, compute in the dtype above) or "int8"
    # (LLM.int8()). Every linear layer but lm_head is quantized; adapter=lora on nf4 is QLoRA.
    quantization: str = "none"

    section = "model"

    def check(self, c: Checks) -> None:
        known = c.choice("name", self.name, tuple(MODELS))
        c.choice("dtype", self.dtype, DTYPES)
        c.choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        c.choice("quantization", self.quantization, QUANTIZATIONS)
        if not isinstance(self.device, str) or not DEVICE_RE.fullmatch(self.device):
            c.fail("device", self.device, "'auto', 'cpu', 'cuda', 'cuda:<index>' or 'mps'")
        for name in ("path", "hub_id", "revision", "cache_dir"):
            c.string(name, getattr(self, name), optional=True)
        c.integer("init_seed", self.init_seed, minimum=0)
        if known:
            self._check_against_source(c, MODELS[self.name])

    def _check_against_source(self, c: Checks, info: ModelInfo) -> None:
        if info.source == "random":
            for name in ("path", "hub_id", "revision"):
                if getattr(self, name) is not None:
                    c.fail(name, getattr(self, name), f"None for the random model {info.name!r}")
        if self.revision is not None and load_kind(self, info) != "hub":
            c.fail(
                "revision",
                self.revision,
                "None unless the model is downloaded from the Hub (model.path and the embedded GGUF have no revisions)",
            )


def load_kind(cfg: ModelConfig, info: ModelInfo) -> str:
    """How `cfg` is loaded: "local" (model.path), "random", "gguf" (embedded copy) or "hub"."""
    if cfg.path is not None:
        return "local"
    if info.source == "random":
        return "random"
    if info.source == "gguf" and cfg.hub_id is None:
        return "gguf"
    return "hub"


@dataclass(frozen=True)
class Shape:
    """A decoder's sizes (from its config.json): what dry runs count parameters on and cost models read."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


# From each model's config.json on the Hugging Face Hub (tiny-*: tinyablate.models.build_tiny_model's defaults).
SHAPES = {
    "qwen2.5-0.5b": Shape(24, 896, 4864, 14, 2, 64, 151936),
    "qwen2.5-1.5b": Shape(28, 1536, 8960, 12, 2, 128, 151936),
    "qwen2.5-3b": Shape(36, 2048, 11008, 16, 2, 128, 151936),
    "qwen2.5-7b": Shape(28, 3584, 18944, 28, 4, 128, 152064),
    "llama3.2-1b": Shape(16, 2048, 8192, 32, 8, 64, 128256),
    "llama3.2-3b": Shape(28, 3072, 8192, 24, 8, 128, 128256),
    "llama3.1-8b": Shape(32, 4096, 14336, 32, 8, 128, 128256),
    "smollm2-135m": Shape(30, 576, 1536, 9, 3, 64, 49152),
    "qwen2.5-coder-0.5b": Shape(24, 896, 4864, 14, 2, 64, 151936),
    "qwen2.5-coder-1.5b": Shape(28, 1536, 8960, 12, 2, 128, 151936),
    "tiny-qwen2": Shape(2, 64, 128, 4, 2, 16, 640),
    "tiny-llama": Shape(2, 64, 128, 4, 2, 16, 640),
}
