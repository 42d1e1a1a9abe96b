"""GPU check and timings of the streaming statistics (fused Triton kernel) and the matrix-free spectral gap.

Run on a CUDA machine from the repository root:

    PYTHONUNBUFFERED=1 python benchmarks/streaming_gpu.py --out results/streaming_gpu.json

Parts (each can be skipped with --skip):
  check   the Triton kernel against a dense float64 computation on the same (bf16 / fp32) inputs,
          causal, key-padded and GQA, at sizes that are not multiples of the tile; and against the
          PyTorch path at N = 16k.
  configs tile configurations of the kernel at N = 16k.
  speed   streaming statistics vs F.scaled_dot_product_attention forward on the same q, k, v (the
          baseline, timed in the same process) and vs materialising P in fp32; peak extra memory.
  eigen   matrix-free spectral gap vs the dense eigen-solver at N = 4096; time per head at N = 16k.
  tiles   tiles of the batched gap's product kernels (32 heads, N = 16k).
  krylov  all heads of a layer at once (method="krylov", the default on a GPU): against dense float64
          eigvals at N = 4096 and against ARPACK per head; seconds per head of 32 heads at N = 16k.
Every timing is the median of triton.testing.do_bench (CUDA events).
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import bench, run_parts  # noqa: E402

from attnstats.stats import online_triton as streaming_triton  # noqa: E402
from attnstats.stats.arnoldi import AttentionOperator  # noqa: E402
from attnstats.stats.spectral import spectral_gap_from_qk  # noqa: E402
from attnstats.stats.online import prepare_qk  # noqa: E402
from attnstats.stats.qk import streaming_stats  # noqa: E402


def dense_reference(q, k, scale, mask, causal):
    """float64 dense statistics of one batch of heads (small N only)."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    valid = torch.ones(s.shape, dtype=torch.bool, device=s.device)
    if causal:
        valid &= torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
    if mask is not None:
        valid &= mask
    s = s.masked_fill(~valid, -math.inf)
    lse = torch.logsumexp(s, -1)
    logp = s - lse[..., None]
    p = logp.exp()
    ent = -(p * logp.masked_fill(~valid, 0)).sum(-1)
    sp2 = (p * p).sum(-1)
    w = valid.double()
    cnt = w.sum((-2, -1))
    mean = (p * w).sum((-2, -1)) / cnt
    var = (((p - mean[..., None, None]) * w) ** 2).sum((-2, -1)) / cnt
    lp = logp.masked_fill(~valid, 0)
    lmean = lp.sum((-2, -1)) / cnt
    lvar = (((lp - lmean[..., None, None]) * w) ** 2).sum((-2, -1)) / cnt
    return dict(entropy=ent, lse=lse, sum_p2=sp2, mean=mean, var=var, log_mean=lmean, log_var=lvar)


def rel_err(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def part_check(dev):
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)
    cases = [
        dict(n=1000, d=64, hq=4, hk=4, causal=False, pad=False, dtype=torch.bfloat16),
        dict(n=1000, d=64, hq=4, hk=4, causal=True, pad=False, dtype=torch.bfloat16),
        dict(n=1000, d=128, hq=4, hk=2, causal=True, pad=True, dtype=torch.bfloat16),
        dict(n=777, d=64, hq=6, hk=2, causal=False, pad=True, dtype=torch.float16),
        dict(n=1000, d=64, hq=4, hk=4, causal=True, pad=True, dtype=torch.float32),
        dict(n=2048, d=128, hq=2, hk=2, causal=False, pad=False, dtype=torch.float32),
    ]
    for c in cases:
        q = (torch.randn(2, c["hq"], c["n"], c["d"], device=dev, generator=g) * 1.2).to(c["dtype"])
        k = (torch.randn(2, c["hk"], c["n"], c["d"], device=dev, generator=g) * 1.2).to(c["dtype"])
        mask = None
        if c["pad"]:
            mask = torch.ones(2, 1, 1, c["n"], dtype=torch.bool, device=dev)
            mask[1, ..., c["n"] * 3 // 4:] = False
        st = streaming_stats(q, k, mask=mask, causal=c["causal"])
        assert st.backend == "triton", st.backend
        kr = k.repeat_interleave(c["hq"] // c["hk"], dim=1)
        ref = dense_reference(q, kr, c["d"] ** -0.5, mask, c["causal"])
        em = st.entry_moments
        errs = dict(
            entropy=rel_err(st.entropy, ref["entropy"]), lse=rel_err(st.lse, ref["lse"]),
            sum_p2=rel_err(st.sum_p2, ref["sum_p2"]), mean=rel_err(em.mean, ref["mean"]),
            var=rel_err(em.var, ref["var"]), log_mean=rel_err(em.log_mean, ref["log_mean"]),
            log_var=rel_err(em.log_var, ref["log_var"]),
        )
        row = {**{k_: (str(v) if k_ == "dtype" else v) for k_, v in c.items()}, **errs, "max_rel_err": max(errs.values())}
        rows.append(row)
        print(f"check n={c['n']} d={c['d']} hq={c['hq']} hk={c['hk']} causal={c['causal']} pad={c['pad']} "
              f"{c['dtype']}: max rel err vs float64 dense = {row['max_rel_err']:.2e}", flush=True)
    # Large N: Triton vs the PyTorch path (float32 on the GPU), same bf16 inputs.
    for causal in (False, True):
        q = torch.randn(1, 4, 16384, 64, device=dev, generator=g).to(torch.bfloat16)
        k = torch.randn(1, 4, 16384, 64, device=dev, generator=g).to(torch.bfloat16)
        a = streaming_stats(q, k, causal=causal, backend="triton")
        b = streaming_stats(q, k, causal=causal, backend="torch")
        errs = dict(entropy=rel_err(a.entropy, b.entropy), lse=rel_err(a.lse, b.lse), sum_p2=rel_err(a.sum_p2, b.sum_p2),
                    var=rel_err(a.entry_moments.var, b.entry_moments.var),
                    log_var=rel_err(a.entry_moments.log_var, b.entry_moments.log_var))
        rows.append(dict(n=16384, d=64, causal=causal, vs="torch path fp32", **errs, max_rel_err=max(errs.values())))
        print(f"check n=16384 causal={causal}: triton vs torch path max rel err {max(errs.values()):.2e}", flush=True)
    # Offsets past 2^31 elements: 20 x 32 heads x 32k x 128 (q is 2.7e9 elements); the last batch
    # element against the PyTorch path on that element alone.
    q = torch.randn(20, 32, 32768, 128, device=dev, generator=g, dtype=torch.bfloat16)
    k = torch.randn(20, 32, 32768, 128, device=dev, generator=g, dtype=torch.bfloat16)
    a = streaming_stats(q, k, backend="triton")
    b = streaming_stats(q[-1:].clone(), k[-1:].clone(), backend="torch")
    errs = dict(entropy=rel_err(a.entropy[-1:], b.entropy), lse=rel_err(a.lse[-1:], b.lse),
                log_var=rel_err(a.entry_moments.log_var[-1:], b.entry_moments.log_var))
    rows.append(dict(n=32768, d=128, batch=20, heads=32, vs="torch path fp32, last batch element", **errs,
                     max_rel_err=max(errs.values())))
    print(f"check 20x32x32768x128 (offsets > 2^31): last batch element vs torch path max rel err "
          f"{max(errs.values()):.2e}", flush=True)
    del q, k, a, b
    torch.cuda.empty_cache()
    return rows


def qkv(h, n, d, dev, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    return [torch.randn(1, h, n, d, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(3)]


def part_configs(dev, causal_list=(False, True)):
    rows = []
    for causal in causal_list:
        for d in (64, 128):
            q, k, _ = qkv(16, 16384, d, dev)
            qb, kb, scale, _, _ = prepare_qk(q, k)
            for cfg in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3),
                        (64, 128, 4, 3), (128, 64, 4, 2), (256, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 4)]:
                try:
                    ms = bench(lambda: streaming_triton.raw_accumulators(qb, kb, scale, None, causal, cfg))
                except Exception as err:  # a tile that does not fit shared memory / registers
                    print(f"config causal={causal} d={d} {cfg}: failed {type(err).__name__}: {str(err)[:120]}", flush=True)
                    continue
                rows.append(dict(d=d, n=16384, causal=causal, config=list(cfg), kernel_ms=ms))
                print(f"config causal={causal} d={d} BLOCK_M,BLOCK_N,warps,stages={cfg}: {ms:.3f} ms", flush=True)
    return rows


def dense_fp32(q, k, scale, causal):
    """Materialise P in fp32 head by head and compute the same statistics (the naive route)."""
    out = []
    for h in range(q.shape[1]):
        s = (q[0, h].float() @ k[0, h].float().T) * scale
        if causal:
            s = s.masked_fill(~torch.ones_like(s, dtype=torch.bool).tril(), -math.inf)
        logp = torch.log_softmax(s, -1)
        p = logp.exp()
        ent = -(p * logp.nan_to_num(neginf=0)).sum(-1)
        sp2 = (p * p).sum(-1)
        lp = logp if not causal else logp.masked_fill(torch.isinf(logp), 0)
        out.append((ent, sp2, p.mean(), p.var(), lp.mean(), lp.var()))
    return out


def part_speed(dev, ns, ds):
    rows = []
    for d in ds:
        for n in ns:
            for causal in (False, True):
                q, k, v = qkv(16, n, d, dev)
                qb, kb, scale, _, _ = prepare_qk(q, k)
                t_sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                t_kernel = bench(lambda: streaming_triton.raw_accumulators(qb, kb, scale, None, causal))
                t_stream = bench(lambda: streaming_stats(q, k, causal=causal))
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                streaming_stats(q, k, causal=causal)
                torch.cuda.synchronize()
                peak_extra = torch.cuda.max_memory_allocated() - base
                one_nn = 4 * n * n
                row = dict(d=d, n=n, heads=16, causal=causal, sdpa_ms=t_sdpa, kernel_ms=t_kernel, stream_ms=t_stream,
                           kernel_over_sdpa=t_kernel / t_sdpa, stream_over_sdpa=t_stream / t_sdpa,
                           peak_extra_bytes=peak_extra, peak_extra_over_one_fp32_nn=peak_extra / one_nn)
                if 16 * n * n * 4 <= 4 * 1024**3 * 4:  # dense fp32 route where 16 heads fit head by head
                    t_dense = bench(lambda: dense_fp32(q, k, scale, causal), target_ms=100)
                    row.update(dense_fp32_ms=t_dense, dense_over_stream=t_dense / t_stream)
                rows.append(row)
                extra = f" dense fp32 {row['dense_fp32_ms']:.2f} ms ({row['dense_over_stream']:.1f}x slower)" if "dense_fp32_ms" in row else ""
                print(f"speed d={d} N={n} causal={causal}: SDPA {t_sdpa:.3f} ms, kernel {t_kernel:.3f} ms "
                      f"({t_kernel / t_sdpa:.2f}x), streaming_stats {t_stream:.3f} ms ({t_stream / t_sdpa:.2f}x), "
                      f"peak extra {peak_extra / 2**20:.1f} MiB = {100 * peak_extra / one_nn:.3f}% of one fp32 NxN{extra}",
                      flush=True)
                del q, k, v, qb, kb
                torch.cuda.empty_cache()
    return rows


def part_eigen(dev):
    rows = []
    # Compile the kernels (both dtypes) before anything is timed.
    for dt in (torch.float32, torch.bfloat16):
        spectral_gap_from_qk(torch.randn(1, 256, 64, device=dev, dtype=dt), torch.randn(1, 256, 64, device=dev, dtype=dt))
    for sigma2 in (1.0, 4.0):
        s = sigma2 ** 0.25
        g = torch.Generator(device=dev).manual_seed(1)
        q = torch.randn(2, 4096, 64, device=dev, generator=g) * s
        k = torch.randn(2, 4096, 64, device=dev, generator=g) * s
        t0 = time.perf_counter()
        r = spectral_gap_from_qk(q, k)
        t_mf = (time.perf_counter() - t0) / 2
        t0 = time.perf_counter()
        dense = []
        for h in range(2):
            p = torch.softmax((q[h].double() @ k[h].double().T) / 8.0, -1)
            ev = torch.linalg.eigvals(p).abs().sort(descending=True).values
            dense.append(1 - float(ev[1]))
        torch.cuda.synchronize()
        t_dense = (time.perf_counter() - t0) / 2
        diff = max(abs(float(r.gap[h]) - dense[h]) for h in range(2))
        rows.append(dict(n=4096, sigma2=sigma2, gap_matrix_free=r.gap.tolist(), gap_dense=dense, max_abs_diff=diff,
                         iterations=r.iterations.tolist(), residual=r.residual.tolist(), converged=r.converged.tolist(),
                         certified=r.certified.tolist(), error_bound=r.error_bound.tolist(), s_per_head_matrix_free=t_mf, s_per_head_dense_fp64_gpu=t_dense))
        print(f"eigen N=4096 sigma2={sigma2}: |gap - dense| = {diff:.2e}; matrix-free {t_mf:.3f} s/head "
              f"(iterations {r.iterations.tolist()}, certified {r.certified.tolist()}, bound {r.error_bound.tolist()}), dense fp64 eigvals {t_dense:.2f} s/head", flush=True)
    for dt in (torch.float32, torch.bfloat16):
        for sigma2 in (1.0, 4.0):
            s = sigma2 ** 0.25
            g = torch.Generator(device=dev).manual_seed(2)
            q = (torch.randn(2, 16384, 64, device=dev, generator=g) * s).to(dt)
            k = (torch.randn(2, 16384, 64, device=dev, generator=g) * s).to(dt)
            t0 = time.perf_counter()
            r = spectral_gap_from_qk(q, k)
            t = (time.perf_counter() - t0) / 2
            op = AttentionOperator(q[0], k[0], 64 ** -0.5)
            x = torch.randn(16384, 1, device=dev)
            t_mv = bench(lambda: op.matmat(x)) / 1e3
            rows.append(dict(n=16384, sigma2=sigma2, dtype=str(dt), gap=r.gap.tolist(), iterations=r.iterations.tolist(),
                             residual=r.residual.tolist(), converged=r.converged.tolist(), certified=r.certified.tolist(),
                             error_bound=r.error_bound.tolist(), s_per_head=t,
                             s_per_product=t_mv))
            print(f"eigen N=16384 {dt} sigma2={sigma2}: {t:.3f} s/head, gap {r.gap.tolist()}, iterations "
                  f"{r.iterations.tolist()}, residual {r.residual.tolist()}, converged {r.converged.tolist()}, "
                  f"certified {r.certified.tolist()}, bound {r.error_bound.tolist()}, "
                  f"one product P x {t_mv * 1e3:.3f} ms", flush=True)
    return rows


def part_product_tiles(dev, heads, tiles):
    """The product kernels of the batched gap (P X and Pᵀ X, 9 columns: a block of 8 and the ones),
    32 heads at N = 16k, per tile (BLOCK_M, BLOCK_N, warps, stages); outputs against the default tile's."""
    rows = []
    for dt in (torch.bfloat16, torch.float32):
        g = torch.Generator(device=dev).manual_seed(3)
        q = torch.randn(heads, 16384, 64, device=dev, generator=g).to(dt)
        k = torch.randn(heads, 16384, 64, device=dev, generator=g).to(dt)
        op = AttentionOperator(q, k, 64 ** -0.5)
        sums = streaming_triton.attention_row_sums(q, k, op.lse, 64 ** -0.5)
        x = torch.randn(heads, 16384, 8, device=dev, generator=g)
        ref = {}
        for tile in [None] + tiles:
            for transpose in (False, True):
                def call():
                    return streaming_triton.attention_products(q, k, op.lse, x, 64 ** -0.5, transpose=transpose,
                                                               row_sums=sums if transpose else None, config=tile)
                try:
                    out = call()
                    ms = bench(call)
                except Exception as err:  # a tile over the shared memory: reported, not fatal
                    print(f"tile {tile} {dt} transpose={transpose}: {type(err).__name__}: {str(err)[:120]}", flush=True)
                    continue
                if tile is None:
                    ref[transpose] = out
                diff = float((out - ref[transpose]).abs().max() / ref[transpose].abs().max())
                rows.append(dict(dtype=str(dt), tile=tile, transpose=transpose, ms=ms, rel_diff_to_default=diff))
                print(f"tile {tile} {dt} transpose={transpose}: {ms:.2f} ms for {heads} heads, rel. diff to the default "
                      f"tile {diff:.1e}", flush=True)
    return rows


def part_krylov(dev, heads_16k, configs, check_ns):
    from attnstats.stats.krylov import _BLOCKS, KRYLOV_BLOCK, krylov_gaps

    rows = []
    spectral_gap_from_qk(torch.randn(2, 256, 64, device=dev), torch.randn(2, 256, 64, device=dev), method="krylov")
    spectral_gap_from_qk(torch.randn(2, 256, 64, device=dev).bfloat16(), torch.randn(2, 256, 64, device=dev).bfloat16(),
                         method="krylov")
    for dt in (torch.float32, torch.bfloat16) if 4096 in check_ns else ():
        for sigma2 in (1.0, 4.0):
            s = sigma2 ** 0.25
            g = torch.Generator(device=dev).manual_seed(1)
            q = (torch.randn(4, 4096, 64, device=dev, generator=g) * s).to(dt)
            k = (torch.randn(4, 4096, 64, device=dev, generator=g) * s).to(dt)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = spectral_gap_from_qk(q, k, method="krylov")
            t_k = (time.perf_counter() - t0) / 4
            t0 = time.perf_counter()
            ra = spectral_gap_from_qk(q, k, method="arnoldi")
            t_a = (time.perf_counter() - t0) / 4
            dense = []
            for h in range(4):
                p = torch.softmax((q[h].double() @ k[h].double().T) / 8.0, -1)
                ev = torch.linalg.eigvals(p).abs().sort(descending=True).values
                dense.append(1 - float(ev[1]))
            diff = max(abs(float(r.gap[h]) - dense[h]) for h in range(4))
            diff_a = max(abs(float(ra.gap[h]) - dense[h]) for h in range(4))
            rows.append(dict(n=4096, heads=4, dtype=str(dt), sigma2=sigma2, method=r.method, gap=r.gap.tolist(), gap_dense=dense,
                             max_abs_diff=diff, max_abs_diff_arnoldi=diff_a, products=r.iterations.tolist(),
                             residual=r.residual.tolist(), converged=r.converged.tolist(), certified=r.certified.tolist(),
                             error_bound=r.error_bound.tolist(), s_per_head=t_k, s_per_head_arnoldi=t_a,
                             arnoldi_products=ra.iterations.tolist()))
            print(f"krylov N=4096 {dt} sigma2={sigma2}: |gap - dense| {diff:.2e} (ARPACK {diff_a:.2e}); "
                  f"{t_k:.3f} s/head (ARPACK {t_a:.3f}); products {r.iterations.tolist()}, certified "
                  f"{r.certified.tolist()}, bound max {r.error_bound.max().item():.2e}", flush=True)
    for dt in (torch.bfloat16, torch.float32):
        for sigma2 in (1.0, 4.0):
            s = sigma2 ** 0.25
            g = torch.Generator(device=dev).manual_seed(2)
            q = (torch.randn(heads_16k, 16384, 64, device=dev, generator=g) * s).to(dt)
            k = (torch.randn(heads_16k, 16384, 64, device=dev, generator=g) * s).to(dt)
            op = AttentionOperator(q, k, 64 ** -0.5)
            x = torch.randn(heads_16k, 16384, KRYLOV_BLOCK, device=dev)
            t_mv = bench(lambda: op.matmat(x)) / 1e3
            t_rmv = bench(lambda: op.rmatmat(x)) / 1e3
            for block, blocks in [(KRYLOV_BLOCK, _BLOCKS)] + (configs if dt == torch.bfloat16 else []):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                if (block, blocks) == (KRYLOV_BLOCK, _BLOCKS):
                    r = spectral_gap_from_qk(q, k)  # what a user calls: the default method on a GPU
                    products, how = r.iterations, r.method
                else:
                    r = krylov_gaps(AttentionOperator(q, k, 64 ** -0.5), tol=1e-6, block=block, blocks=blocks)
                    products, how = r.products, f"krylov_gaps(block={block}, blocks={blocks})"
                t = (time.perf_counter() - t0) / heads_16k
                in_products = max(products.tolist()) * (t_mv + t_rmv) / 2
                rows.append(dict(n=16384, heads=heads_16k, sigma2=sigma2, dtype=str(dt), how=how, block=block, blocks=blocks,
                                 products=products.tolist(), residual=r.residual.tolist(), converged=r.converged.tolist(),
                                 error_bound=r.error_bound.tolist(), s_per_head=t,
                                 s_per_block_product_all_heads=t_mv, s_per_transposed_block_product_all_heads=t_rmv,
                                 s_in_products_estimate=in_products))
                print(f"krylov N=16384 heads={heads_16k} {dt} sigma2={sigma2} {how}: {t:.4f} s/head, products "
                      f"{min(products.tolist())}-{max(products.tolist())}, converged {bool(r.converged.all())}, "
                      f"bound max {r.error_bound.max().item():.2e}; one block product of all heads {t_mv * 1e3:.2f} ms, "
                      f"transposed {t_rmv * 1e3:.2f} ms; the products of the slowest head ~{in_products:.2f} s of "
                      f"{t * heads_16k:.2f} s", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/streaming_gpu.json")
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--ns", nargs="*", type=int, default=[4096, 16384, 65536, 131072])
    ap.add_argument("--ds", nargs="*", type=int, default=[64, 128])
    ap.add_argument("--heads-16k", type=int, default=32, help="heads of the krylov part at N = 16k")
    ap.add_argument("--krylov-configs", nargs="*", default=[], help="block,blocks pairs tried at N = 16k (bf16) besides the default")
    ap.add_argument("--product-tiles", nargs="*", default=["128,64,8,3", "128,64,4,3", "64,128,4,3", "128,128,8,3", "64,64,4,4", "64,32,4,3"],
                    help="BLOCK_M,BLOCK_N,warps,stages tiles of the gap's product kernels")
    ap.add_argument("--krylov-ns", nargs="*", type=int, default=[4096], help="N of the krylov part's accuracy check (0: none)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    import triton

    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               python=platform.python_version(), cuda=torch.version.cuda)
    print(env, flush=True)
    res = dict(env=env, command=" ".join(sys.argv))
    parts = [("check", lambda: part_check(dev)), ("configs", lambda: part_configs(dev)),
             ("speed", lambda: part_speed(dev, args.ns, args.ds)), ("eigen", lambda: part_eigen(dev)),
             ("tiles", lambda: part_product_tiles(dev, args.heads_16k, [tuple(map(int, t.split(","))) for t in args.product_tiles])),
             ("krylov", lambda: part_krylov(dev, args.heads_16k, [tuple(map(int, c.split(","))) for c in args.krylov_configs], args.krylov_ns))]
    run_parts(parts, args.skip, args.out, res)


if __name__ == "__main__":
    main()
