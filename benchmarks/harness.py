"""Timing and the part-by-part driver shared by the benchmark scripts."""
import contextlib
import statistics
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


def median_s(fn, repeat, sync=False):
    """``(median, min, max)`` wall-clock seconds of ``fn()`` over ``repeat`` runs after one warm-up
    (the first call loads libraries and allocates). For CPU work, and with ``sync`` for the host time
    of a GPU call (each call followed by a device sync); GPU kernels alone use :func:`bench`."""
    def call():
        fn()
        if sync:
            torch.cuda.synchronize()

    call()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


@contextlib.contextmanager
def timed_shards(sync=False):
    """Time each shard of ``attnstats analyze`` (its per-shard function) while the block runs; yields the
    list the wall-clock seconds of the shards are appended to. ``sync``: wait for the GPU around each."""
    from attnstats.app import analysis

    times, real = [], analysis._run_shard

    def timed_shard(*args):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = real(*args)
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        return out

    analysis._run_shard = timed_shard
    try:
        yield times
    finally:
        analysis._run_shard = real


def run_parts(parts, skip, out, res):
    """Run each ``(name, fn)`` of ``parts`` not in ``skip``; store its result (or its error) in ``res``
    under ``name`` and rewrite the JSON file ``out`` after every part, so a crash keeps what ran."""
    import json
    import traceback
    from pathlib import Path

    for name, fn in parts:
        if name in skip:
            continue
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as err:
            traceback.print_exc()
            res[name + "_error"] = f"{type(err).__name__}: {err}"
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", flush=True)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=1))
    return res
