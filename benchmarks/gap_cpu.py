"""Spectral gap on the CPU: what the dense route costs against LAPACK alone, and where Arnoldi wins.

Two tables, every time the median of ``--repeat`` runs in this process:

1. ``attnstats.spectral_gap(p)`` against its floor, ``numpy.linalg.eigvals(p)`` on the same matrix, and
   against ``torch.linalg.eigvals`` of the explicitly deflated matrix ``P[:-1, :-1] − P[-1:, :-1]``
   (the route attnstats took before it solved P itself), for random and peaked heads.
2. ``spectral_gap_from_qk(q, k, method=...)`` per head, ``"dense"`` against ``"arnoldi"`` (certified:
   two ARPACK runs), over N: the crossover behind ``attnstats.stats.spectral.DENSE_MAX_TOKENS``.
3. ``method="krylov"`` (all heads at once, the GPU's route) against ``"arnoldi"`` on 6 heads: why the
   CPU keeps ARPACK.

Usage: ``python benchmarks/gap_cpu.py [--repeat 3] [--parts 1 2 3] [--krylov-ns 1024] [--out results/gap_cpu.json]``.
"""
import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import torch

import attnstats
from harness import median_s


def head(n, d, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=torch.float64) * sigma
    k = torch.randn(n, d, generator=g, dtype=torch.float64) * sigma
    return q, k


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--parts", nargs="*", type=int, default=[1, 2, 3])
    ap.add_argument("--krylov-ns", nargs="*", type=int, default=[1024])
    args = ap.parse_args()
    res = {"torch_threads": torch.get_num_threads(), "dense": [], "crossover": [], "krylov": []}
    warnings.simplefilter("ignore", attnstats.UncertifiedGapWarning)
    if 1 in args.parts:
        part_dense(args, res)
    if 2 in args.parts:
        part_crossover(args, res)
    if 3 in args.parts:
        print("\n3. all heads at once (krylov) vs ARPACK one head at a time (seconds for 6 heads, d = 64)")
        for n in args.krylov_ns:
            q, k = head(6 * n, 64, 1.0, seed=n)
            q, k = q.reshape(6, n, 64), k.reshape(6, n, 64)
            row = dict(n=n, heads=6)
            gaps = {}
            for method in ("arnoldi", "krylov"):
                row[method] = median_s(lambda: gaps.__setitem__(method, attnstats.spectral_gap_from_qk(q, k, method=method).gap),
                                       args.repeat)[0]
            row["max_abs_gap_difference"] = float((gaps["arnoldi"] - gaps["krylov"]).abs().max())
            res["krylov"].append(row)
            print(f"N={n}: arnoldi {row['arnoldi']:.2f} s, krylov {row['krylov']:.2f} s, "
                  f"max |gap difference| {row['max_abs_gap_difference']:.1e}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))


def part_dense(args, res):
    print("1. dense spectral_gap(p) vs LAPACK alone (seconds per matrix)")
    print(f"{'N':>6} {'head':>11} {'spectral_gap':>13} {'np.eigvals':>11} {'torch, deflated':>16}")
    for n in (256, 512, 1024):
        # "very peaked": q, k ~ N(0, 20²), d = 16, scale 1/4, the heads on which the deflated matrix
        # also loses accuracy (tests/test_spectral.py)
        for kind, sigma, d, scale in (("random", 1.5, 32, 32**-0.5), ("peaked", 8.0, 32, 32**-0.5),
                                      ("very peaked", 20.0, 16, 0.25)):
            q, k = head(n, d, sigma, seed=n)
            p = torch.softmax(q @ k.T * scale, -1)
            deflated = p[:-1, :-1] - p[-1:, :-1]
            row = dict(n=n, head=kind,
                       spectral_gap=median_s(lambda: attnstats.spectral_gap(p), args.repeat)[0],
                       numpy_eigvals=median_s(lambda: np.linalg.eigvals(p.numpy()), args.repeat)[0],
                       torch_deflated=median_s(lambda: torch.linalg.eigvals(deflated), args.repeat)[0])
            res["dense"].append(row)
            print(f"{n:>6} {kind:>11} {row['spectral_gap']:>13.3f} {row['numpy_eigvals']:>11.3f} {row['torch_deflated']:>16.3f}", flush=True)


def part_crossover(args, res):
    print("\n2. spectral_gap_from_qk per head: dense vs certified Arnoldi (seconds per head, 2 heads)")
    print(f"{'N':>6} {'dense':>8} {'arnoldi':>8}")
    for n in (64, 128, 256, 320, 384, 448, 512, 1024, 2048):
        g = torch.Generator().manual_seed(n)
        q = torch.randn(2, n, 64, generator=g, dtype=torch.float64)
        k = torch.randn(2, n, 64, generator=g, dtype=torch.float64)
        row = dict(n=n)
        for method in ("dense", "arnoldi"):
            row[method] = median_s(lambda: attnstats.spectral_gap_from_qk(q, k, method=method), args.repeat)[0] / 2
        res["crossover"].append(row)
        print(f"{n:>6} {row['dense']:>8.3f} {row['arnoldi']:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
