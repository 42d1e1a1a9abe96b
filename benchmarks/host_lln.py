"""Host time of LLN's fused path, piece by piece (GPU, bf16, 16 heads, d = 64).

    PYTHONUNBUFFERED=1 python benchmarks/host_lln.py [--n 4096]

The last rows replay non-causal LLN's and SDPA's forward + backward each from one CUDA graph (the calls
captured whole, as a training step can be), after checking that the replayed gradients equal eager ones.
For each piece: µs per call with a device sync after each call (host time plus the GPU's when it is
longer), µs per call of 200 calls queued without syncs (the host's time when the GPU keeps up), and the
GPU time by do_bench.
"""
import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnstats.kernels import get_kernel, lln_triton  # noqa: E402
from attnstats import triton_launch  # noqa: E402
from attnstats.kernels.triton_common import pad, precision  # noqa: E402
from profile_lln import inputs, step  # noqa: E402


def per_call_us(fn, calls=200, sync_each=False):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
        if sync_each:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


class _Twice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def graphed(fn):
    """``fn`` (a forward + backward on fixed inputs) captured in one CUDA graph after warm-up on a side
    stream (as torch's whole-network capture does); returns the graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _fast(on, fn):
    # fn with attnstats' direct kernel launches on or off (triton_launch.FAST_LAUNCH)
    def run():
        triton_launch.FAST_LAUNCH = on
        try:
            fn()
        finally:
            triton_launch.FAST_LAUNCH = True
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    args = ap.parse_args()
    n = args.n
    q, k, v, g = inputs(n)
    lln = get_kernel("lln")
    st = lln_triton.moments(q, k, v)
    bh, d_pad = 16, pad(64)
    block = lln_triton._block(d_pad, d_pad)
    split = lln_triton._splits(bh, n, block, q.device)
    sp, zp = lln_triton._states(bh, split, d_pad, d_pad, q.device)
    state_args = (k, v, st.kmax, sp, zp, None, *k.stride(), *v.stride(), 16, n, 64, 64,
                  lln_triton._rows(n, split, block), st.split, 0.5)
    consts = dict(D_PAD=d_pad, DV_PAD=d_pad, BLOCK=block, PRECISION=precision(q.dtype), AB_DEVICE=False)

    def jit_launch():
        lln_triton._nc_state_kernel[(bh, split)](*state_args, **consts)

    out = lln(q, k, v)

    def backward_only():
        torch.autograd.grad(out, (q, k, v), g, retain_graph=True)

    x = torch.randn(16, device="cuda", requires_grad=True)

    def sdpa(q, k, v, causal=False):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def kernels(q, k, v, causal=False):
        return lln_triton.lln_noncausal(q, k, v, 0.5, 0.5, 1e-8, st)

    pieces = {
        "torch.empty": lambda: torch.empty(16, n, 64, device="cuda"),
        "state kernel launch (jit)": jit_launch,
        "moments": lambda: lln_triton.moments(q, k, v),
        "kernels forward (no grad)": lambda: kernels(q.detach(), k.detach(), v.detach()),
        "kernels forward": lambda: kernels(q, k, v),
        "kernels forward+backward": step(kernels, q, k, v, g, False),
        "backward only (autograd.grad)": backward_only,
        "module forward (no grad)": lambda: lln(q.detach(), k.detach(), v.detach()),
        "module forward": lambda: lln(q, k, v),
        "module forward+backward": step(lln, q, k, v, g, False),
        "trivial Function forward+backward": lambda: _Twice.apply(x).sum().backward(),
        "sdpa forward": lambda: F.scaled_dot_product_attention(q, k, v),
        "sdpa forward+backward": step(sdpa, q, k, v, g, False),
    }
    try:  # the compiled kernel launched directly, past the JIT's binding and specialisation
        ck = lln_triton._nc_state_kernel[(bh, split)](*state_args, **consts)
        binder = lln_triton._nc_state_kernel.device_caches[torch.cuda.current_device()][4]
        bound = tuple(binder(*state_args, **consts)[0].values())
        stream = torch.cuda.current_stream().cuda_stream
        run = ck.run

        def direct():
            run(bh, split, 1, stream, ck.function, ck.packed_metadata, None, None, None, *bound)

        direct()
        torch.cuda.synchronize()
        pieces["state kernel launch (compiled, direct)"] = direct
    except Exception as e:  # noqa: BLE001
        print("direct launch failed:", repr(e))
    lln_diag = get_kernel("lln_diag")
    for causal in (True, False):
        for fast in (False, True):
            label = f"{'causal' if causal else 'non-causal'}, direct launches {'on' if fast else 'off'}"
            pieces[f"lln forward+backward, {label}"] = _fast(fast, step(lln, q, k, v, g, causal))
            pieces[f"lln_diag forward+backward, {label}"] = _fast(fast, step(lln_diag, q, k, v, g, causal))
        pieces[f"sdpa forward+backward, {'causal' if causal else 'non-causal'}"] = step(sdpa, q, k, v, g, causal)
    # non-causal LLN (σ and its rule on the device: nothing read back inside capture) and SDPA, each forward +
    # backward captured whole in a CUDA graph; the replayed gradients against eager ones
    # (leaves of their own: the graph kept alive above for "backward only" holds q, k, v's gradient nodes,
    # made on the default stream, which a capture cannot touch)
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    for name, kern in (("lln", lln), ("sdpa", sdpa)):
        call = step(kern, qg, kg, vg, g, False)
        call()
        eager = [t.grad.clone() for t in (qg, kg, vg)]
        replay = graphed(call)
        replay()
        torch.cuda.synchronize()
        diff = max(float((t.grad.float() - e.float()).abs().max()) for t, e in zip((qg, kg, vg), eager))
        print(f"{name} forward+backward replayed from a CUDA graph: largest gradient difference to eager {diff:.3g}")
        pieces[f"{name} forward+backward, non-causal, one CUDA graph"] = replay
    print(f"N = {n}: piece | µs/call synced | µs/call queued | GPU ms (do_bench)")
    for name, fn in pieces.items():
        print(f"{name:55s} {per_call_us(fn, sync_each=True):9.1f} {per_call_us(fn):9.1f} "
              f"{do_bench(fn, return_mode='median'):9.4f}", flush=True)
    for name in ("backward only (autograd.grad)", "module forward", "lln forward+backward, non-causal, direct launches on"):
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            pieces[name]()
        torch.cuda.synchronize()
        pr.disable()
        print(name)
        pstats.Stats(pr).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
