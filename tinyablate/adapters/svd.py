"""Truncated SVD of frozen weights, computed once per (model, module, rank) and cached on disk.

A full SVD per matrix costs ~0.6 s per 7B-sized module on an H100; the top-r factors of a real
weight need only a few skinny matmuls (seeded randomized subspace iteration). Factors are stored
at `cache_rank` and sliced for any smaller r, so every cell of a sweep shares them. Signs are fixed
(largest-magnitude entry of each left singular vector positive) so factors are reproducible across
devices and runs, which is what lets a saved v be reloaded onto a recomputed SVD.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import SVDConfig


@dataclass
class Factors:
    """W ≈ U diag(S) Vh, top-`rank` singular triplets in float32."""

    U: torch.Tensor  # d × rank
    S: torch.Tensor  # rank
    Vh: torch.Tensor  # rank × k

    @property
    def rank(self) -> int:
        return self.S.numel()

    def top(self, r: int) -> "Factors":
        return Factors(self.U[:, :r], self.S[:r], self.Vh[:r])


def default_cache_dir() -> Path:
    root = os.environ.get("TINYABLATE_CACHE") or os.path.join(Path.home(), ".cache", "tinyablate")
    return Path(root) / "svd"


def truncated_svd(weight: torch.Tensor, rank: int, cfg: SVDConfig) -> Factors:
    """Top-`rank` SVD of `weight` (d × k) in float32 on the weight's device."""
    w = weight.detach().float()
    small = min(w.shape)
    use_full = cfg.method == "full" or (cfg.method == "auto" and small <= cfg.full_below)
    if use_full or rank + cfg.oversample >= small:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    else:
        U, S, Vh = _randomized_svd(w, rank + cfg.oversample, cfg.niter, cfg.seed)
    return _fix_signs(Factors(U[:, :rank].contiguous(), S[:rank].contiguous(), Vh[:rank].contiguous()))


def _randomized_svd(w: torch.Tensor, q: int, niter: int, seed: int):
    """Halko et al. randomized range finder with QR-stabilised power iterations."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(w.shape[1], q, generator=gen).to(w.device)
    basis = torch.linalg.qr(w @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(w.T @ basis).Q
        basis = torch.linalg.qr(w @ basis).Q
    small_u, S, Vh = torch.linalg.svd(basis.T @ w, full_matrices=False)
    return basis @ small_u, S, Vh


def _fix_signs(f: Factors) -> Factors:
    idx = f.U.abs().argmax(dim=0)
    signs = torch.sign(f.U.gather(0, idx[None, :]).squeeze(0))
    signs[signs == 0] = 1
    return Factors(f.U * signs[None, :], f.S, f.Vh * signs[:, None])


def weight_fingerprint(weight: torch.Tensor, n_samples: int = 2048) -> str:
    """A cheap content hash: shape, dtype and a fixed strided sample of the weight's values."""
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // n_samples)
    sample = flat[::step][:n_samples].float().cpu().numpy().tobytes()
    head = f"{tuple(weight.shape)}|{weight.dtype}".encode()
    return hashlib.sha256(head + sample).hexdigest()[:24]


class SVDCache:
    """Disk cache of SVD factors keyed by (model identity, module name, weight fingerprint, settings)."""

    def __init__(self, cfg: SVDConfig):
        self.cfg = cfg
        if cfg.cache_dir == "":
            self.root = None
        else:
            self.root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def factors(self, model_id: str, module_name: str, weight: torch.Tensor, r: int) -> Factors:
        """Top-r factors of `weight`, from the cache when present; computed and stored otherwise."""
        rank = min(max(r, self.cfg.cache_rank), min(weight.shape))
        path = self._path(model_id, module_name, weight)
        cached = self._load(path, weight.device) if path is not None else None
        if cached is not None and cached.rank >= r:
            self.hits += 1
            return cached.top(r)
        self.misses += 1
        f = truncated_svd(weight, rank, self.cfg)
        if path is not None:
            self._store(path, f, model_id, module_name)
        return f.top(r)

    def _path(self, model_id: str, module_name: str, weight: torch.Tensor) -> Path | None:
        if self.root is None:
            return None
        c = self.cfg
        key = json.dumps(
            [model_id, module_name, weight_fingerprint(weight), c.method, c.full_below, c.niter,
             c.oversample, c.seed]
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return self.root / digest[:2] / f"{digest}.safetensors"

    @staticmethod
    def _load(path: Path, device) -> Factors | None:
        if not path.exists():
            return None
        try:
            t = load_file(str(path), device=str(device))
        except Exception:  # a torn or foreign file: recompute and overwrite
            return None
        return Factors(t["U"], t["S"], t["Vh"])

    @staticmethod
    def _store(path: Path, f: Factors, model_id: str, module_name: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"U": f.U.contiguous().cpu(), "S": f.S.contiguous().cpu(), "Vh": f.Vh.contiguous().cpu()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"model_id": model_id, "module": module_name})
            os.replace(tmp, path)  # atomic: concurrent cells never see a torn file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
