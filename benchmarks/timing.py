"""GPU timing shared by the benchmark scripts."""
import time

import torch


def bench(fn, target_ms=300):
    """Median time of ``fn()`` in ms by ``triton.testing.do_bench`` (CUDA events), warm-up and
    repetitions scaled to the call's own duration so that slow calls are not repeated needlessly."""
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = (time.perf_counter() - t0) * 1e3
    return float(do_bench(fn, warmup=max(10, est), rep=max(target_ms, 3 * est), return_mode="median"))
