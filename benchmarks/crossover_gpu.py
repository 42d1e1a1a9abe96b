"""Dense vs streaming statistics of one causal call on the GPU: where store="stats" should switch.

For one self-attention call ``[1, 32, N, 64]`` (bf16, causal, GQA 32/8) the default metrics (entropy,
moments, log-normal fit, spectral gap) are computed both ways: the dense path of short calls
(:func:`attnstats.metrics.record_metrics` on a record holding q, k: P built, then the dense statistics)
and the streaming path (:func:`attnstats.metrics.streaming_values`, the fused kernel and the GPU sampler).
Wall-clock median of 5 (after one warm-up), synchronised.

Usage: ``cd benchmarks && PYTHONPATH=.. python crossover_gpu.py --out $OUT/crossover_gpu.json``.
"""
import argparse
import json
from pathlib import Path

import torch

from attnstats.capture.record import AttentionRecord
from attnstats.metrics import record_metrics, streaming_values
from harness import median_s

GROUPS = ("entropy", "moments", "lognormal", "spectral_gap")


def timed(fn, repeat=5):
    """Median ms of ``fn()`` with a device sync after each call."""
    return median_s(fn, repeat, sync=True)[0] * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/crossover_gpu.json")
    args = ap.parse_args()
    rows = []
    for n in (64, 128, 256, 512, 1024, 2048):
        g = torch.Generator("cuda").manual_seed(n)
        q = torch.randn(1, 32, n, 64, device="cuda", generator=g, dtype=torch.bfloat16)
        k = torch.randn(1, 32, n, 64, device="cuda", generator=g, dtype=torch.bfloat16)
        rec = AttentionRecord(name="x", layer=0, q=q, k=k, mask=None, is_causal=True, scale=0.125)
        dense = timed(lambda: record_metrics(rec, GROUPS))
        stream = timed(lambda: streaming_values(q, k, None, True, 0.125, GROUPS, "x"))
        rows.append({"n": n, "dense_ms": dense, "streaming_ms": stream})
        print(f"N={n}: dense {dense:.2f} ms, streaming {stream:.2f} ms", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
