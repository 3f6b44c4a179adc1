"""The truncated SVD and its disk cache."""

from __future__ import annotations

import torch

from tinyablate.adapters.config import SVDConfig
from tinyablate.adapters.svd import SVDCache, truncated_svd


def decaying_matrix(d=600, k=900, seed=0, decay=0.9):
    """A matrix with a power-law-ish spectrum, like trained weights (not the flat one of noise)."""
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(k, d, generator=gen))
    S = 10.0 * decay ** torch.arange(d, dtype=torch.float32) + 0.05
    return (U * S) @ V.T


def principal_angle_sin(A: torch.Tensor, B: torch.Tensor) -> float:
    """Largest sine of the principal angles between the column spaces of A and B (orthonormal)."""
    A, B = A.double(), B.double()
    return float(torch.linalg.matrix_norm(B - A @ (A.T @ B), ord=2))


def test_randomized_matches_full_svd_subspace_and_reconstruction():
    W = decaying_matrix()
    full = truncated_svd(W, 8, SVDConfig(method="full"))
    fast = truncated_svd(W, 8, SVDConfig(method="randomized", niter=6, oversample=16))
    for r in (1, 2, 4, 8):
        assert principal_angle_sin(full.U[:, :r], fast.U[:, :r]) < 1e-3
        assert principal_angle_sin(full.Vh[:r].T, fast.Vh[:r].T) < 1e-3
        best = (W - (full.U[:, :r] * full.S[:r]) @ full.Vh[:r]).norm()
        ours = (W - (fast.U[:, :r] * fast.S[:r]) @ fast.Vh[:r]).norm()
        assert ours <= best * (1 + 1e-4)
    assert torch.allclose(fast.S, full.S, rtol=1e-4)
    # the sign convention makes the factors themselves agree, not just the subspaces
    assert torch.allclose(fast.U[:, :2], full.U[:, :2], atol=1e-3)


def test_randomized_svd_is_deterministic():
    W = decaying_matrix(seed=1)
    a = truncated_svd(W, 4, SVDConfig(method="randomized"))
    b = truncated_svd(W, 4, SVDConfig(method="randomized"))
    assert torch.equal(a.U, b.U) and torch.equal(a.Vh, b.Vh)


def test_cache_hits_and_slices_smaller_ranks(tmp_path):
    W = decaying_matrix(seed=2)
    cfg = SVDConfig(method="randomized", cache_rank=8, cache_dir=str(tmp_path))
    first = SVDCache(cfg)
    f4 = first.factors("model-a", "layers.0.q_proj", W, 4)
    assert (first.hits, first.misses) == (0, 1)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1
    second = SVDCache(cfg)
    f2 = second.factors("model-a", "layers.0.q_proj", W, 2)
    assert (second.hits, second.misses) == (1, 0)
    assert torch.equal(f2.U, f4.U[:, :2]) and torch.equal(f2.S, f4.S[:2])
    # different weights under the same name: a miss, never stale factors
    second.factors("model-a", "layers.0.q_proj", decaying_matrix(seed=3), 2)
    assert second.misses == 1
    # rank above the cached rank: recomputed
    second.factors("model-a", "layers.0.q_proj", W, 12)
    assert second.misses == 2


def test_disabled_cache_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYABLATE_CACHE", str(tmp_path))
    cache = SVDCache(SVDConfig(cache_dir=""))
    cache.factors("m", "x", decaying_matrix(seed=4, d=64, k=64), 2)
    assert not any(tmp_path.iterdir())
