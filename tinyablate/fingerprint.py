"""Cheap content hashes of weights: which weight a cached SVD, a saved checkpoint or a rank's copy belongs to.

    weight_fingerprint(w)                       # one weight: shape, dtype and a strided sample of its values
    batch = Fingerprints(); batch.add(w) ...    # many weights, one device-to-host copy
    batch.digests()

Used by the SVD cache (adapters/svd.py: the cache key) and by distributed.py (ranks hold the same weights).
"""

from __future__ import annotations

import hashlib

import torch


def _fingerprint_sample(weight: torch.Tensor, n_samples: int) -> torch.Tensor:
    flat = weight.detach().reshape(-1)
    step = max(1, flat.numel() // n_samples)
    return flat[::step][:n_samples].float()


def _fingerprint_digest(shape, dtype, sample) -> str:
    head = f"{tuple(shape)}|{dtype}".encode()
    return hashlib.sha256(head + sample.tobytes()).hexdigest()[:24]


def weight_fingerprint(weight: torch.Tensor, n_samples: int = 2048) -> str:
    """A cheap content hash: shape, dtype and a fixed strided sample of the weight's values."""
    sample = _fingerprint_sample(weight, n_samples).cpu().numpy()
    return _fingerprint_digest(weight.shape, weight.dtype, sample)


class Fingerprints:
    """weight_fingerprint of many weights with one device-to-host copy (one wait for the GPU, not one each).

    `add` takes each weight's sample on its device (the weight itself need not be kept: a dequantized
    weight can be dropped at once); `digests()` copies all samples to the host together.
    """

    def __init__(self, n_samples: int = 2048):
        self.n_samples = n_samples
        self._heads: list = []
        self._samples: list = []

    def add(self, weight: torch.Tensor) -> None:
        self._heads.append((tuple(weight.shape), weight.dtype))
        self._samples.append(_fingerprint_sample(weight, self.n_samples))

    def digests(self) -> list[str]:
        if not self._samples:
            return []
        sizes = [s.numel() for s in self._samples]
        host = torch.cat([s.to(self._samples[0].device) for s in self._samples]).cpu().numpy()
        out, at = [], 0
        for (shape, dtype), size in zip(self._heads, sizes):
            out.append(_fingerprint_digest(shape, dtype, host[at : at + size]))
            at += size
        return out
