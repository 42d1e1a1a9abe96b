"""Where the time of the batched spectral gap goes on the GPU: host and device.

``spectral_gap_from_qk`` on 32 Gaussian heads (d = 64, bf16, score variance σ²) at N tokens, the
``method="krylov"`` route a GPU takes for long non-causal heads: wall clock, then a cProfile of one
call (host time by function, by own and by cumulative time) and a ``torch.profiler`` table of its GPU
kernels.

    cd benchmarks && PYTHONPATH=.. python profile_gap.py --n 16384 > $OUT/profile_gap.txt
"""
import argparse
import cProfile
import io
import pstats
import time

import torch

from attnstats.stats.spectral import spectral_gap_from_qk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--sigma2", type=float, default=1.0)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(2)
    s = args.sigma2 ** 0.25
    q = (torch.randn(args.heads, args.n, 64, device=dev, generator=g) * s).bfloat16()
    k = (torch.randn(args.heads, args.n, 64, device=dev, generator=g) * s).bfloat16()
    spectral_gap_from_qk(q[:2, :512], k[:2, :512])  # compile the kernels
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = spectral_gap_from_qk(q, k)
    torch.cuda.synchronize()
    print(f"N={args.n} heads={args.heads} sigma2={args.sigma2}: {time.perf_counter() - t0:.3f} s ({r.method}), "
          f"products {r.iterations.min().item()}-{r.iterations.max().item()}", flush=True)
    prof = cProfile.Profile()
    prof.enable()
    spectral_gap_from_qk(q, k)
    torch.cuda.synchronize()
    prof.disable()
    for key in ("tottime", "cumtime"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(args.top)
        print(f"--- cProfile of one call (host), by {key}\n{out.getvalue()}", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as tp:
        spectral_gap_from_qk(q, k)
        torch.cuda.synchronize()
    print("--- GPU kernels of one call\n"
          + tp.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70), flush=True)


if __name__ == "__main__":
    main()
