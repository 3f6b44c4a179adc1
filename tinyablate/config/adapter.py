"""The adapter schema: every ablation axis of TinyLoRA, LoRA-XS and LoRA as one typed config.

`AdapterConfig.check` states everything that can be checked without a model; the model-dependent
checks (rank against the weight shapes, target modules that match nothing) run in
`tinyablate.adapters.targets.resolve_targets` before any weight is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from .checks import Checks, Section, invalid, is_int

KINDS = ("tinylora", "lora_xs", "lora", "none")
SHARINGS = ("tiled", "structured")
PRECISIONS = ("fp32", "bf16", "fp16")
FORWARD_MODES = ("fused", "unmerged")
SVD_METHODS = ("exact", "full")
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BYTES_PER_PARAM = {"fp32": 4, "bf16": 2, "fp16": 2}
_TIE_EXPECTED = "a positive integer (1 = no sharing) or 'all' (one v for the whole model)"


@dataclass
class SVDConfig:
    """How the frozen top-r SVD factors are computed and cached (tinyablate/adapters/svd.py)."""

    # "exact": eigendecomposition of the smaller Gram matrix in float64 (the default: exact, and a
    # certified error bound per module; ~ms per module on a GPU). "full": torch.linalg.svd in float32
    # (LAPACK/cuSOLVER; exact too, slower on GPUs). Both decide the basis, so the method is part of
    # cell_id. Before 2026-12-02 the default was a randomized SVD ("auto"/"randomized") whose basis was
    # not W's top-r on flat spectra; those values are refused.
    method: str = "exact"
    # Factors are computed and cached at max(r, cache_rank); a smaller r slices the cached factors, so
    # every cell of a rank sweep shares one SVD per module.
    cache_rank: int = 8
    # Where factors are cached on disk; None -> $TINYABLATE_CACHE/svd or ~/.cache/tinyablate/svd.
    # "" disables the disk cache.
    cache_dir: Optional[str] = None

    @classmethod
    def from_dict(cls, raw: dict) -> "SVDConfig":
        """An SVDConfig from a saved config, refusing the settings of the retired randomized SVD."""
        legacy = sorted(set(raw) & set(_RETIRED_SVD_FIELDS))
        if legacy:
            raise ValueError(
                f"adapter.svd has {legacy}, settings of the randomized SVD retired on 2026-12-02 (its basis "
                "was not W's top-r on flat spectra): a cell saved with them used another basis and cannot "
                "be rebuilt as it was; re-run it with the current defaults"
            )
        return cls(**raw)


# Settings of the randomized SVD used before 2026-12-02 ("auto" switched to it above full_below).
_RETIRED_SVD_FIELDS = ("full_below", "niter", "oversample", "seed")
_RETIRED_SVD_METHODS = ("auto", "randomized")


@dataclass
class AdapterConfig(Section):
    """One adapter: the research object of a sweep cell.

    TinyLoRA:  W' = W + U Σ (Σ_i v_i P_i) Vᵀ,  v ∈ R^u trainable, P a fixed random u×r×r tensor.
    LoRA-XS:   W' = W + U Σ R Vᵀ,              R ∈ R^{r×r} trainable (u is ignored: u = r²).
    LoRA:      W' = W + (α/r) B A through PEFT (B: d×r, A: r×k trainable).
    none:      no trainable parameter (the 0-parameter point of every curve).
    """

    # Adapter family: tinylora | lora_xs | lora | none.
    kind: str = "tinylora"
    # Frozen rank r of the SVD factors (tinylora, lora_xs) or the LoRA rank (lora). Paper: r=2 is best.
    r: int = 2
    # Size of each trainable vector v (tinylora only).
    u: int = 4
    # How many modules share one v: a positive integer (1 = no sharing) or "all" (one v for the model).
    tie: Any = 1
    # tiled: consecutive modules in depth order share v; structured: modules of one type (q, k, ...)
    # in consecutive layers share v.
    sharing: str = "tiled"
    # Storage dtype of the trainable parameters and of their optimizer state, independent of the
    # base model's dtype: fp32 | bf16 | fp16. With fp16, Adam's second moment underflows for small
    # gradients and eps=1e-8 rounds to 0: the optimizer's epsilon must be >= 1e-7 (checked in training).
    precision: str = "fp32"
    # Linear modules to adapt, matched by the last component of their name.
    target_modules: list = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # Transformer layer indices to adapt; None adapts every layer.
    layers: Optional[list] = None
    # Seed of the fixed random projections P (one tensor per module, regenerated from this seed and the
    # module's index; never stored per run).
    projection_seed: int = 0
    # fused: the adapted weight is merged into a cached copy whenever v changes, and a custom backward
    # computes v's gradient from rank-r projections (fast; one extra copy of the adapted weights).
    # unmerged: W x + A M B x through autograd (the exact reference; no extra weight memory).
    forward: str = "fused"
    # LoRA only: scaling numerator α (the update is scaled by α / r) and dropout.
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    svd: SVDConfig = field(default_factory=SVDConfig)

    section = "adapter"

    def check(self, c: Checks) -> None:
        c.choice("kind", self.kind, KINDS)
        c.choice("sharing", self.sharing, SHARINGS)
        c.choice("precision", self.precision, PRECISIONS)
        c.choice("forward", self.forward, FORWARD_MODES)
        if self.svd.method in _RETIRED_SVD_METHODS:
            c.fail(
                "svd.method",
                self.svd.method,
                "a method not retired on 2026-12-02 (the randomized basis was not "
                f"W's top-r on flat spectra): one of {', '.join(map(repr, SVD_METHODS))}, default 'exact'",
            )
        else:
            c.choice("svd.method", self.svd.method, SVD_METHODS)
        c.integer("r", self.r, minimum=1)
        c.integer("u", self.u, minimum=1)
        if self._tie() is False:
            c.fail("tie", self.tie, _TIE_EXPECTED)
        c.non_empty_list(
            "target_modules",
            self.target_modules,
            lambda x: isinstance(x, str) and x,
            f"module names, e.g. {DEFAULT_TARGETS}",
        )
        c.non_empty_list(
            "layers",
            self.layers,
            lambda x: is_int(x) and x >= 0,
            "non-negative layer indices (None: every layer)",
            optional=True,
        )
        c.integer("svd.cache_rank", self.svd.cache_rank, minimum=0)
        c.string("svd.cache_dir", self.svd.cache_dir, optional=True, empty_ok=True)
        c.number("lora_alpha", self.lora_alpha, above=0)
        c.number("lora_dropout", self.lora_dropout, minimum=0, below=1)

    def _tie(self):
        """The tie factor as an int, None for "all", False when invalid."""
        tie = self.tie
        if isinstance(tie, str) and tie.strip().lower() == "all":
            return None
        if isinstance(tie, str) and tie.strip().isdigit():
            tie = int(tie.strip())
        return int(tie) if is_int(tie) and tie > 0 else False

    def tie_value(self) -> Optional[int]:
        """The tie factor as an int, or None for "all" (ConfigError if invalid)."""
        tie = self._tie()
        if tie is False:
            raise invalid("adapter.tie", self.tie, _TIE_EXPECTED)
        return tie

    @property
    def params_per_group(self) -> int:
        """Trainable parameters of one shared group (v for tinylora, R for lora_xs)."""
        return self.r * self.r if self.kind == "lora_xs" else self.u

    @property
    def bytes_per_param(self) -> int:
        return BYTES_PER_PARAM[self.precision]


def adapter_from_dict(raw: dict) -> AdapterConfig:
    """An AdapterConfig from plain values (its `svd` a dict), as spec.json and adapter_native.json hold it."""
    raw = dict(raw)
    if isinstance(raw.get("svd"), dict):
        raw["svd"] = SVDConfig.from_dict(raw["svd"])
    return AdapterConfig(**raw)


def count_groups(n_modules_per_type: dict, tie: Optional[int], sharing: str) -> int:
    """Number of distinct trainable vectors for the given module counts (analytic formula).

    tiled: ceil(n_modules / tie); structured: sum over module types of ceil(n_type / tie);
    tie=None ("all"): 1.
    """
    n_total = sum(n_modules_per_type.values())
    if n_total == 0:
        return 0
    if tie is None:
        return 1
    if sharing == "tiled":
        return math.ceil(n_total / tie)
    return sum(math.ceil(n / tie) for n in n_modules_per_type.values())
