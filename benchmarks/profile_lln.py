"""Where the time of one LLN (and LLN+Diag) forward + backward goes on the GPU, bf16, 16 heads, d = 64.

    PYTHONUNBUFFERED=1 python benchmarks/profile_lln.py [--n 4096] [--diag-n 65536] [--only-diag]

Prints do_bench medians (ms) of the whole call and of its steps, the host time of one call, a
cProfile of the Python side and torch.profiler tables (what runs on the GPU, for how long).
"""
import argparse
import contextlib
import cProfile
import pstats
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnstats.kernels import block_diagonal_triton, get_kernel, lln_triton  # noqa: E402
from harness import median_s  # noqa: E402


def inputs(n):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 16, n, 64, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    return q, k, v, torch.randn(1, 16, n, 64, device="cuda", generator=gen, dtype=torch.bfloat16)


def step(kern, q, k, v, g, causal):
    def run():
        for t in (q, k, v):
            t.grad = None
        kern(q, k, v, causal=causal).backward(g)

    return run


def profile_table(fn, rows=25):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows)


def kernel_times(fn, calls=5):
    """GPU µs per call of each kernel ``fn`` launches (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / calls) for e in prof.key_averages() if e.device_time_total > 0]
    return {key: round(us, 1) for key, us in sorted(rows, key=lambda r: -r[1])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--diag-n", type=int, default=65536)
    ap.add_argument("--only-diag", action="store_true",
                    help="only LLN+Diag's two paths: whole-call times at 8k-64k, GPU time per kernel at 16k-64k")
    args = ap.parse_args()
    if args.only_diag:
        diag_paths()
        diag_kernel_times()
        return
    lln, diag = get_kernel("lln"), get_kernel("lln_diag")
    q, k, v, g = inputs(args.n)
    for causal in (False, True):
        run = step(lln, q, k, v, g, causal)
        st = lln_triton.moments(q, k, v, spread=causal)
        fn = lln_triton.lln_causal if causal else lln_triton.lln_noncausal
        parts = {
            "forward+backward": run,
            "forward": lambda: lln(q, k, v, causal=causal),
            "moments": lambda: lln_triton.moments(q, k, v, spread=causal),
            "kernels forward": lambda: fn(q, k, v, 0.5, 0.5, 1e-8, st),
            "kernels forward+backward": lambda: fn(q, k, v, 0.5, 0.5, 1e-8, st).backward(g),
        }
        print(f"N = {args.n}, causal = {causal}:",
              {name: round(do_bench(f, return_mode="median"), 4) for name, f in parts.items()}, "ms;",
              "host µs per forward+backward:", round(median_s(run, 50, sync=True)[0] * 1e6, 1), flush=True)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            run()
        torch.cuda.synchronize()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(18)
        print(profile_table(run), flush=True)
    q, k, v, g = inputs(args.diag_n)
    for causal in (False, True):
        print(f"LLN+Diag, N = {args.diag_n}, causal = {causal}:",
              {name: round(do_bench(step(kern, q, k, v, g, causal), return_mode="median"), 3)
               for name, kern in (("lln", lln), ("lln_diag", diag), ("block_diag", get_kernel("block_diag")))},
              "ms", flush=True)
        print(profile_table(step(diag, q, k, v, g, causal), rows=15), flush=True)
        base = torch.randn_like(v).requires_grad_()
        for warps in (2, 4, 8):
            block_diagonal_triton.NUM_WARPS[64] = warps

            def block(causal=causal):
                for t in (q, k, v, base):
                    t.grad = None
                block_diagonal_triton.block_diagonal(q, k, v, 0.125, 64, causal, base=base, wl=0.5, wd=0.5).backward(g)

            print(f"block kernel with LLN+Diag's sum, {warps} warps: forward+backward",
                  round(do_bench(block, return_mode="median"), 3), "ms", flush=True)
        block_diagonal_triton.NUM_WARPS[64] = 4
    diag_paths()


# LLN+Diag's two paths, what fuses_diag decides between: the block softmax inside LLN's kernels, or LLN's
# kernels followed by the separate block kernel
DIAG_PATHS = (("fused", True), ("separate block kernel", False))


@contextlib.contextmanager
def diag_path(fused):
    real = lln_triton.fuses_diag
    lln_triton.fuses_diag = lambda *a: fused
    try:
        yield
    finally:
        lln_triton.fuses_diag = real


def diag_paths():
    lln, diag = get_kernel("lln"), get_kernel("lln_diag")
    for n in (8192, 16384, 32768, 65536):
        q, k, v, g = inputs(n)
        for causal in (False, True):
            row = {"lln": do_bench(step(lln, q, k, v, g, causal), return_mode="median")}
            for name, fused in DIAG_PATHS:
                with diag_path(fused):
                    row[name] = do_bench(step(diag, q, k, v, g, causal), return_mode="median")
            print(f"LLN+Diag paths, N = {n}, causal = {causal}:", {key: round(t, 3) for key, t in row.items()}, "ms",
                  flush=True)


def diag_kernel_times():
    lln, diag = get_kernel("lln"), get_kernel("lln_diag")
    for n in (16384, 32768, 65536):
        q, k, v, g = inputs(n)
        for causal in (False, True):
            print(f"N = {n}, causal = {causal}, LLN: GPU µs per kernel", kernel_times(step(lln, q, k, v, g, causal)),
                  flush=True)
            for name, fused in DIAG_PATHS:
                with diag_path(fused):
                    print(f"N = {n}, causal = {causal}, LLN+Diag {name}: GPU µs per kernel",
                          kernel_times(step(diag, q, k, v, g, causal)), flush=True)


if __name__ == "__main__":
    main()
