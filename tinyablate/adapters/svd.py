"""The frozen top-r SVD of every adapted weight: exact, certified, computed once and cached on disk.

TinyLoRA's update lives in the span of W's top-r singular vectors, so the rank axis of a sweep means
something only if those vectors are W's. Two methods, both exact up to rounding:

- `exact` (default): the eigendecomposition of the smaller Gram matrix (WᵀW or WWᵀ, n × n with
  n = min(d, k)) formed and decomposed in float64, then U (or V) = W V Σ⁻¹. The float64 Gram keeps
  ~8 significant digits of the singular values and far more of the subspaces' separation than any
  gap this project acts on; on a GPU it is one DGEMM and one n × n eigh.
- `full`: LAPACK / cuSOLVER `torch.linalg.svd` in float32 (the textbook route; slower on GPUs).

Whatever the method, every singular triplet comes with a certificate: the Wedin residual bound on the
sine of the largest principal angle between the computed and the true top-j subspaces,
`err[j-1] = ‖Wᵀ U_j − V_j Σ_j‖_F / (σ_j − σ_{j+1})` (the other residual, W V − U Σ, is zero by
construction up to rounding), with σ_{j+1} from the same decomposition. Where the relative gap
(σ_j − σ_{j+1}) / σ_1 is below `TIE_GAP`, the top-j subspace is not unique (a tie): the factors say so
(`Factors.is_tie`), the adapter logs it and the cell's result records it.

Factors are stored at `cache_rank` and sliced for any smaller r, so every cell of a rank sweep shares
one decomposition per module; once every module of a model is known, all their factors are also
written into one file keyed by every module's name and weight fingerprint, so a warm start reads one
file (`cached_all`), not one per module. Signs are fixed (largest-magnitude entry of each left singular vector
positive) so factors are reproducible across devices and runs, which is what lets a saved v be
reloaded onto a recomputed SVD. The cache key holds the method and `ALGORITHM_VERSION`, so factors
from another algorithm (e.g. the randomized SVD used before 2026-12-02) are never reused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..config.adapter import SVDConfig
from ..files import atomic_write
from ..fingerprint import weight_fingerprint

# Bump when the computed factors change for the same weight and settings: cached factors of another
# version are never reused (they are part of the cache key).
ALGORITHM_VERSION = 2
# Relative gap (σ_r − σ_{r+1}) / σ_1 below which the top-r subspace is called a tie (not unique).
TIE_GAP = 1e-3


@dataclass
class Factors:
    """W ≈ U diag(S) Vh: the top-`rank` singular triplets in float32, with their certificates.

    The certificates live on the CPU, so reading them never waits for the GPU.
    """

    U: torch.Tensor  # d × rank
    S: torch.Tensor  # rank
    Vh: torch.Tensor  # rank × k
    rel_gaps: torch.Tensor  # rank, CPU: (σ_j − σ_{j+1}) / σ_1 for j = 1..rank (σ_{rank+1} = 0 at full rank)
    err: torch.Tensor  # rank, CPU: err[j-1] bounds sin θ between the computed and true top-j subspaces

    @property
    def rank(self) -> int:
        return self.S.numel()

    def top(self, r: int) -> "Factors":
        return Factors(self.U[:, :r], self.S[:r], self.Vh[:r], self.rel_gaps[:r], self.err[:r])

    def rel_gap(self, r: Optional[int] = None) -> float:
        """(σ_r − σ_{r+1}) / σ_1 at r (default: this rank)."""
        return float(self.rel_gaps[(self.rank if r is None else r) - 1])

    def is_tie(self, r: Optional[int] = None) -> bool:
        return self.rel_gap(r) < TIE_GAP

    def meets(self, target: float) -> bool:
        """Every top-j subspace with a gap (no tie) is certified to a sine of at most `target`."""
        return bool(torch.all((self.rel_gaps < TIE_GAP) | (self.err <= target)))

    def sin_bound(self, r: Optional[int] = None) -> float:
        """Certified bound on the sine of the largest principal angle of the top-r subspace."""
        return float(self.err[(self.rank if r is None else r) - 1])


def default_cache_dir() -> Path:
    root = os.environ.get("TINYABLATE_CACHE") or os.path.join(Path.home(), ".cache", "tinyablate")
    return Path(root) / "svd"


def truncated_svd(weight: torch.Tensor, rank: int, cfg: SVDConfig) -> Factors:
    """Top-`rank` singular triplets of `weight` (d × k) on the weight's device, with certificates."""
    a = weight.detach().double()
    if cfg.method == "full":
        U, S_all, Vh = (t.double() for t in torch.linalg.svd(weight.detach().float(), full_matrices=False))
        return _certify(a, U[:, :rank], S_all, Vh[:rank])
    f = None
    if min(a.shape) > ITERATE_ABOVE:
        f = _certify(a, *_gram_svd(a, rank, iterate=True))
        if not f.meets(TARGET_SIN):
            f = None  # the subspace iteration did not certify: decompose the whole Gram matrix
    if f is None:
        f = _certify(a, *_gram_svd(a, rank))
    if float(f.S[-1]) <= _DEFICIENT * float(f.S[0]):  # numerically rank-deficient: U = W V Σ⁻¹ breaks down
        U, S_all, Vh = torch.linalg.svd(a, full_matrices=False)
        f = _certify(a, U[:, :rank], S_all, Vh[:rank])
    return f


# σ_r / σ_1 below which the Gram route cannot recover the r-th singular vectors (σ² underflows float64's
# relative precision); such matrices go through a float64 SVD instead.
_DEFICIENT = 1e-6
# The accuracy every non-tied top-j subspace must be certified to (sine of the largest principal angle).
TARGET_SIN = 1e-3
# Smaller side above which the Gram matrix's top block is found by filtered subspace iteration rather
# than a whole eigendecomposition (an n × n eigh costs ~80 ms at n = 3584 on an H200, the iteration ~20).
ITERATE_ABOVE = 1024


def _gram_svd(a: torch.Tensor, rank: int, iterate: bool = False):
    """Top-`rank` SVD of a float64 matrix through the eigendecomposition of its smaller Gram matrix.

    Returns (U d×rank, singular values in descending order, Vh rank×k), in float64: all of them, or
    with `iterate` the top block's (at least rank + 1).
    """
    tall = a.shape[0] >= a.shape[1]
    gram = a.T @ a if tall else a @ a.T  # n × n, n = min(d, k)
    evals, evecs = _top_eigh(gram, rank) if iterate else torch.linalg.eigh(gram)  # ascending
    S_all = evals.flip(0).clamp_min(0).sqrt()
    small = evecs[:, -rank:].flip(1)  # the top singular vectors of the smaller side
    scale = S_all[:rank].clamp_min(torch.finfo(torch.float64).tiny)
    if tall:  # small = V: U = W V Σ⁻¹
        return (a @ small) / scale, S_all, small.T
    return small, S_all, (small.T @ a) / scale[:, None]  # small = U: Vᵀ = Σ⁻¹ Uᵀ W


def _top_eigh(gram: torch.Tensor, rank: int, block: int = 64, squarings: int = 4, max_steps: int = 32):
    """Top eigenpairs of a float64 PSD matrix by subspace iteration with the filter G^(2^squarings).

    A block of max(block, 2·rank) vectors from a seeded start converges to the top-`rank` subspace at
    the rate (λ_(block+1) / λ_rank)^(2^squarings) per step, whatever the gaps inside the block (Rayleigh-
    Ritz resolves those exactly), so near-ties at r cost nothing; steps stop once the top rank + 1
    Ritz residuals are at float64's noise level. Returns the block's Ritz values (ascending) and vectors.
    The result is checked by `_certify` and replaced by a whole eigh when it falls short.
    """
    n = gram.shape[0]
    b = min(n, max(block, 2 * rank))
    filt = gram / gram.diagonal().sum()  # trace-normalised: eigenvalues in [0, 1], powers never overflow
    for _ in range(squarings):
        filt = filt @ filt
        filt = filt / filt.diagonal().sum()
    gen = torch.Generator(device="cpu").manual_seed(0)
    X = torch.linalg.qr(torch.randn(n, b, generator=gen, dtype=torch.float64).to(gram.device)).Q
    top = gram.diagonal().sum()
    for step in range(max_steps):
        X = torch.linalg.qr(filt @ X).Q
        if step % 4 == 3 or step == max_steps - 1:
            lam, Y = torch.linalg.eigh(X.T @ gram @ X)
            V = X @ Y[:, -(rank + 1) :]
            res = (gram @ V - V * lam[-(rank + 1) :]).norm(dim=0)
            if float(res.max()) <= 1e-12 * float(top):
                break
    return lam, X @ Y


def _certify(a: torch.Tensor, U: torch.Tensor, S_all: torch.Tensor, Vh: torch.Tensor) -> Factors:
    """Fix signs, round to float32, and bound each top-j subspace's error of the rounded factors (Wedin)."""
    rank = U.shape[1]
    U, Vh = _fix_signs(U, Vh)
    U, S, Vh = U.float().contiguous(), S_all[:rank].float().contiguous(), Vh.float().contiguous()
    u, s, vh = U.double(), S.double(), Vh.double()
    res = (a.T @ u - vh.T * s).pow(2).sum(0) + (a @ vh.T - u * s).pow(2).sum(0)
    nxt = torch.cat([S_all[1 : rank + 1], S_all.new_zeros(rank + 1)])[:rank]
    gaps = S_all[:rank] - nxt
    err = (res.cumsum(0).sqrt() / gaps.clamp_min(torch.finfo(torch.float64).tiny)).clamp_max(1.0)
    rel_gaps = gaps / S_all[0] if float(S_all[0]) > 0 else torch.zeros_like(gaps)
    return Factors(U, S, Vh, rel_gaps.float().cpu(), err.float().cpu())


def _fix_signs(U: torch.Tensor, Vh: torch.Tensor):
    idx = U.abs().argmax(dim=0)
    signs = torch.sign(U.gather(0, idx[None, :]).squeeze(0))
    signs[signs == 0] = 1
    return U * signs[None, :], Vh * signs[:, None]


FIELDS = ("U", "S", "Vh", "rel_gaps", "err")


def _tensors(f: Factors, prefix: str = "") -> dict:
    return {prefix + name: getattr(f, name).contiguous().cpu() for name in FIELDS}


def _factors(tensors: dict, prefix: str = "") -> Factors | None:
    if not all(prefix + name in tensors for name in FIELDS):
        return None  # e.g. a file of the layout before certificates
    return Factors(*(tensors[prefix + name] for name in FIELDS))


class SVDCache:
    """Disk cache of SVD factors keyed by (model identity, module name, weight fingerprint, method)."""

    def __init__(self, cfg: SVDConfig):
        self.cfg = cfg
        if cfg.cache_dir == "":
            self.root = None
        else:
            self.root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def factors(
        self, model_id: str, module_name: str, weight: torch.Tensor, r: int, fingerprint: Optional[str] = None
    ) -> Factors:
        """Top-r factors of `weight`, from the cache when present; computed and stored otherwise.

        Cached factors come back on the CPU (move what you use); computed ones on the weight's device.
        `fingerprint`: the weight's, when the caller has it already (see `Fingerprints`).
        """
        fingerprint = weight_fingerprint(weight) if fingerprint is None else fingerprint
        cached = self.cached(model_id, module_name, fingerprint, r)
        return (cached if cached is not None else self.compute(model_id, module_name, weight, r, fingerprint)).top(r)

    def cached(self, model_id: str, module_name: str, fingerprint: str, r: int) -> Factors | None:
        """The cached factors at their stored rank >= r (on the CPU), or None (a miss, counted by `compute`)."""
        path = self._path(model_id, module_name, fingerprint)
        cached = self._load(path) if path is not None else None
        if cached is None or cached.rank < r:
            return None
        self.hits += 1
        return cached

    def compute(
        self, model_id: str, module_name: str, weight: torch.Tensor, r: int, fingerprint: Optional[str] = None
    ) -> Factors:
        """Decompose `weight` at max(r, cache_rank) (on its device) and store the factors."""
        self.misses += 1
        rank = min(max(r, self.cfg.cache_rank), min(weight.shape))
        f = truncated_svd(weight, rank, self.cfg)
        fingerprint = weight_fingerprint(weight) if fingerprint is None else fingerprint
        path = self._path(model_id, module_name, fingerprint)
        if path is not None:
            self._store(path, _tensors(f), {"model_id": model_id, "module": module_name})
        return f

    def cached_all(self, model_id: str, names: list, fingerprints: list, r: int) -> list | None:
        """Every module's factors (stored rank, CPU) from the one file `store_all` wrote for exactly these
        modules and weights, or None. One read instead of one per module: what makes a warm start fast."""
        path = self._bundle_path(model_id, names, fingerprints)
        tensors = self._read(path) if path is not None else None
        if tensors is None:
            return None
        out = [_factors(tensors, f"{i}.") for i in range(len(names))]
        if any(f is None or f.rank < r for f in out):
            return None
        self.hits += len(out)
        return out

    def store_all(self, model_id: str, names: list, fingerprints: list, factors: list) -> None:
        """Write every module's factors into one file keyed by all their names and fingerprints."""
        path = self._bundle_path(model_id, names, fingerprints)
        if path is None:
            return
        tensors = {}
        for i, f in enumerate(factors):
            tensors.update(_tensors(f, f"{i}."))
        self._store(path, tensors, {"model_id": model_id, "modules": str(len(names))})

    def _path(self, model_id: str, module_name: str, fingerprint: str) -> Path | None:
        """The cache file of a module whose weight has `fingerprint` (weight_fingerprint)."""
        return self._file([model_id, module_name, fingerprint, self.cfg.method, ALGORITHM_VERSION])

    def _bundle_path(self, model_id: str, names: list, fingerprints: list) -> Path | None:
        return self._file([model_id, "all", list(zip(names, fingerprints)), self.cfg.method, ALGORITHM_VERSION])

    def _file(self, key: list) -> Path | None:
        if self.root is None:
            return None
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
        return self.root / digest[:2] / f"{digest}.safetensors"

    @staticmethod
    def _read(path: Path) -> dict | None:
        if not path.exists():
            return None
        try:
            return load_file(str(path))  # on the CPU: the caller moves the top-r factors it uses
        except Exception:  # a torn or foreign file: recompute and overwrite
            return None

    def _load(self, path: Path) -> Factors | None:
        tensors = self._read(path)
        return None if tensors is None else _factors(tensors)

    @staticmethod
    def _store(path: Path, tensors: dict, metadata: dict) -> None:
        # atomic: concurrent cells never see a torn file
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
