"""The CPU's many small problems shared over threads: dense eigenvalues and row sorts, as attnstats runs them.

Softmax matrices of MiniLM-sized heads (``P = softmax(q kᵀ)`` of random q, k, d = 32), float64, on the
CPU with torch's default threads. Every figure is the median of ``--repeat`` runs in this process, the
variants in turns so that a slow spell of the machine hits them alike:

- eigenvalues of a stack: numpy's stacked ``eigvals`` in one call (its BLAS with its default threads);
  the stack split over torch's threads by ``attnstats.stats.parallel.map_each`` with numpy's BLAS left at
  its default threads inside each worker (how ``map_each`` ran before), and as ``map_each`` runs it (one
  BLAS thread per worker);
- row sorts of a ``[rows, width]`` float64 table (the log-normal fit's): ``torch.sort`` against numpy's
  sort shared out by ``map_each`` (``attnstats.stats.lognormal._sorted_rows``).

Usage: ``python benchmarks/threads_cpu.py [--repeat 7] [--out results/threads_cpu.json]``.
"""
import argparse
import json
import statistics
import time

import numpy as np
import torch

from attnstats.stats import parallel
from attnstats.stats.lognormal import _sorted_rows


def probs(heads: int, n: int, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, n, 32, generator=g, dtype=torch.float64)
    k = torch.randn(heads, n, 32, generator=g, dtype=torch.float64)
    return torch.softmax(q @ k.transpose(-1, -2) / 32**0.5, -1).numpy()  # [heads, n, n]


def blas_inside(fn, arrays):
    """``map_each`` as it ran before: the worker threads' BLAS calls start threads of their own."""
    workers = torch.get_num_threads()
    pieces = [c for a in arrays for c in np.array_split(a, 2 * workers)]
    return list(parallel._executor(workers).map(fn, pieces))


def turns(variants: dict, repeat: int) -> dict:
    times = {name: [] for name in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: round(statistics.median(ts) * 1e3, 1) for name, ts in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    res = {"threads": torch.get_num_threads(), "eigvals_ms": {}, "sort_ms": {}}
    for heads, n in ((192, 128), (1152, 48)):
        p = probs(heads, n)
        res["eigvals_ms"][f"{heads} x {n}x{n}"] = row = turns({
            "numpy, one stacked call": lambda: np.linalg.eigvals(p),
            "threads, BLAS threads inside": lambda: blas_inside(np.linalg.eigvals, [p]),
            "threads, one BLAS thread each (map_each)": lambda: parallel.map_each(np.linalg.eigvals, [p]),
        }, args.repeat)
        print(f"eigvals {heads} x {n}x{n}: {row}", flush=True)
    for rows, width in ((192, 16384), (192, 4096), (40, 1200)):
        x = torch.randn(rows, width, dtype=torch.float64, generator=torch.Generator().manual_seed(width))
        res["sort_ms"][f"{rows} x {width}"] = row = turns({
            "torch.sort": lambda: torch.sort(x, dim=1),
            "numpy over threads (_sorted_rows)": lambda: _sorted_rows(x),
        }, args.repeat)
        print(f"sort {rows} x {width}: {row}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
