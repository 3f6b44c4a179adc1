"""Frozen-basis benchmark: time and accuracy of the top-r SVD routes at Qwen2.5-7B's module shapes.

Run (GPU, ~2 min):  python benchmarks/svd_bench.py --device cuda
Run (CPU, small):   python benchmarks/svd_bench.py --device cpu --scale 0.125

For each module shape of Qwen2.5-7B (q/o 3584², k/v 512×3584, gate/up 18944×3584, down 3584×18944)
it times, side by side in one run (median of --iters after a warm-up):
- `exact`: tinyablate's default (float64 Gram matrix; above ITERATE_ABOVE its top block by filtered
  subspace iteration, certified, else — or when the certificate falls short — a whole float64 eigh);
- `exact-eigh`: the whole float64 eigh always (the fallback);
- `full`: tinyablate's float32 torch.linalg.svd route (what PEFT's TinyLoRA computes, plus certificate);
- `randomized-6`: the randomized SVD retired on 2026-12-02 (24 columns, 6 power iterations);
and measures each route's error at r = 1, 2, 4, 8 — the sine of the largest principal angle against the
true top-r left singular subspace — on weights with a known SVD: `flat` (SmolLM2-like spectrum, the
case that broke the randomized SVD), `decay` (a power law, like most trained weights), and `iid`
(Gaussian noise: Marchenko-Pastur, near-ties at the top; reference: float64 torch.linalg.svd).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.adapter_bench import timed  # noqa: E402
from tinyablate.adapters import svd as S  # noqa: E402
from tinyablate.config import SVDConfig  # noqa: E402

SHAPES = {"q/o": (3584, 3584), "k/v": (512, 3584), "gate/up": (18944, 3584), "down": (3584, 18944)}
RANK = 8  # the cache rank: every route computes the top 8 and cells slice r <= 8


def routes():
    def whole_eigh(w, rank):
        a = w.double()
        return S._certify(a, *S._gram_svd(a, rank))

    return {
        "exact": lambda w, rank: S.truncated_svd(w, rank, SVDConfig(method="exact")),
        "exact-eigh": whole_eigh,
        "full": lambda w, rank: S.truncated_svd(w, rank, SVDConfig(method="full")),
        "randomized-6": retired_randomized,
    }


def retired_randomized(w, rank, niter=6, oversample=16):
    """The default before 2026-12-02 (for comparison): Halko et al. with QR-stabilised power iterations."""
    w = w.float()
    gen = torch.Generator(device="cpu").manual_seed(0)
    omega = torch.randn(w.shape[1], rank + oversample, generator=gen).to(w.device)
    basis = torch.linalg.qr(w @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(w @ torch.linalg.qr(w.T @ basis).Q).Q
    small_u, sig, Vh = torch.linalg.svd(basis.T @ w, full_matrices=False)
    return S.Factors(
        (basis @ small_u)[:, :rank],
        sig[:rank],
        Vh[:rank],
        ((sig[:rank] - sig[1 : rank + 1]) / sig[0]).cpu(),
        torch.full((rank,), float("nan")),
    )


def spectrum(kind: str, n: int) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    if kind == "flat":
        head = torch.tensor([13.31, 12.74, 12.58, 12.49], dtype=torch.float64)
        return torch.cat([head, (12.45 - 12.0 * i[:-4] / n).clamp_min(0.1)])
    return 10.0 * (i + 1) ** -0.6  # decay


def test_matrix(kind: str, d: int, k: int, device, seed=0):
    """(weight in bf16, the true top-RANK left singular vectors or None for a float64 reference)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    if kind == "iid":
        return (torch.randn(d, k, generator=gen, device=device) * 0.02).bfloat16(), None
    n = min(d, k)
    U = torch.linalg.qr(torch.randn(d, n, generator=gen, device=device)).Q
    V = torch.linalg.qr(torch.randn(k, n, generator=gen, device=device)).Q
    sig = spectrum(kind, n).float().to(device)
    w = ((U * sig) @ V.T).bfloat16()  # bf16 like a real checkpoint: the exact SVD is the rounded weight's
    return w, None


def sin_angle(A, B) -> float:
    A, B = A.double(), B.double()
    return float(torch.linalg.matrix_norm(B - A @ (A.T @ B), ord=2))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scale", type=float, default=1.0, help="shrink every shape by this factor (CPU runs)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--spectra", default="flat,decay,iid")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    shapes = {n: (max(16, int(d * args.scale)), max(16, int(k * args.scale))) for n, (d, k) in SHAPES.items()}
    print(f"device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    rts = routes()
    timing = {}
    for name, (d, k) in shapes.items():
        w = test_matrix("iid", d, k, args.device)[0]
        timing[name] = {r: 1000 * timed(lambda f=f: f(w, RANK), args.device, 1, args.iters) for r, f in rts.items()}
        print(f"time {name} {d}x{k}: " + ", ".join(f"{r} {t:.1f} ms" for r, t in timing[name].items()), flush=True)
    counts = {"q/o": 2, "k/v": 2, "gate/up": 2, "down": 1}  # per layer, 7 modules
    per_module = {r: sum(counts[n] * timing[n][r] for n in counts) / 7 for r in rts}
    print("\n| route | " + " | ".join(f"{n} ms" for n in shapes) + " | mean ms/module (7 per layer) | vs full |")
    print("|---|" + "---|" * (len(shapes) + 2))
    for r in rts:
        row = " | ".join(f"{timing[n][r]:.1f}" for n in shapes)
        print(f"| {r} | {row} | {per_module[r]:.1f} | {per_module['full'] / per_module[r]:.1f}x |")

    print("\n| spectrum | shape | route | sin angle r=1, 2, 4, 8 | certified bound r=1, 2, 4, 8 | ties at r |")
    print("|---|---|---|---|---|---|")
    for kind in args.spectra.split(","):
        for name in ("q/o", "gate/up"):
            d, k = shapes[name]
            w, _ = test_matrix(kind, d, k, args.device, seed=1)
            ref_U, ref_S, _ = torch.linalg.svd(w.double(), full_matrices=False)
            gaps = [float((ref_S[r - 1] - ref_S[r]) / ref_S[0]) for r in (1, 2, 4, 8)]
            ties = [r for r, g in zip((1, 2, 4, 8), gaps) if g < S.TIE_GAP]
            for route, fn in rts.items():
                f = fn(w, RANK)
                errs = [sin_angle(ref_U[:, :r], f.U[:, :r]) for r in (1, 2, 4, 8)]
                bounds = [float(f.err[r - 1]) for r in (1, 2, 4, 8)]
                print(
                    f"| {kind} | {name} | {route} | {', '.join(f'{e:.1e}' for e in errs)} | "
                    f"{', '.join(f'{b:.1e}' for b in bounds)} | {ties or '-'} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
