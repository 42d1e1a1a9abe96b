"""Where the time of ``record(model, store="stats")`` goes at short N on the GPU: host and device.

The model and sequence of ``record_gpu.py`` (Llama-style, 4 layers, bf16, causal, one sequence of N
tokens). For each N: the plain forward, the forward under ``record(layers=[])`` (hooks and mode, no
capture), and under ``record(store="stats")`` with the default metrics, each timed by CUDA events
(``harness.bench``) and by host time per call (wall clock, no sync inside the loop); then a cProfile of
the ``store="stats"`` block (host time by function, sorted by own time) and a ``torch.profiler`` table
of its GPU kernels.

    cd benchmarks && PYTHONPATH=.. python profile_record.py --ns 4096 8192 > $OUT/profile_record.txt

(`--empty` adds a cProfile of the ``record(layers=[])`` blocks; `--stacks` adds the GPU time of each block
grouped by the source line that launched it.)
"""
import argparse
import cProfile
import io
import pstats
import time
import warnings

import torch

import attnstats
from attnstats.metrics import METRICS
from harness import bench
from record_gpu import DEV, llama, timed_forward


def host_ms(fn, repeat=20):
    """Host time of one call in ms: ``repeat`` calls back to back, synchronised only at the ends."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / repeat * 1e3


def host_profile(fn, calls=10) -> cProfile.Profile:
    """A cProfile of ``calls`` calls of ``fn``, the device drained before it stops."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    return prof


def by(prof: cProfile.Profile, key: str, top: int) -> str:
    """The profile's table sorted by ``key``, its ``top`` rows."""
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats(key).print_stats(top)
    return out.getvalue()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", nargs="*", type=int, default=[4096, 8192])
    ap.add_argument("--top", type=int, default=35)
    ap.add_argument("--syncs", action="store_true",
                    help="also: every place a store='stats' block waits for the device (torch's sync debug mode)")
    ap.add_argument("--gaps", action="store_true",
                    help="also: the idle stretches of the GPU within one store='stats' block, with the kernels around them")
    ap.add_argument("--empty", action="store_true",
                    help="also: a cProfile of the record(layers=[]) blocks (the hooks and mode alone)")
    ap.add_argument("--stacks", action="store_true",
                    help="also: GPU time of the plain forward's and the block's torch ops, grouped by the "
                         "attnstats line that called them")
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # nothing captured under layers=[]: said once per block
    model = llama(4)
    for n in args.ns:
        ids = torch.randint(0, 30000, (1, n), device=DEV, generator=torch.Generator(DEV).manual_seed(n))

        def no_layer():
            with torch.no_grad(), attnstats.record(model, store="stats", layers=[]):
                model(input_ids=ids)

        runs = {"plain": timed_forward(model, ids), "record(layers=[])": no_layer,
                "record(store='stats')": timed_forward(model, ids, METRICS)}
        for name, fn in runs.items():
            print(f"N={n} {name:24s} CUDA events {bench(fn):8.2f} ms   host {host_ms(fn):8.2f} ms", flush=True)
        if args.empty:
            prof = host_profile(no_layer)
            print(f"--- N={n}: cProfile of 10 record(layers=[]) blocks (host), by own time\n{by(prof, 'tottime', args.top)}",
                  flush=True)
        stats = runs["record(store='stats')"]
        prof = host_profile(stats)
        print(f"--- N={n}: cProfile of 10 store='stats' blocks (host), by own time\n{by(prof, 'tottime', args.top)}",
              flush=True)
        print(f"--- N={n}: the same, by cumulative time\n{by(prof, 'cumtime', args.top)}", flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as tp:
            for _ in range(5):
                stats()
            torch.cuda.synchronize()
        print(f"--- N={n}: GPU kernels of 5 store='stats' blocks\n"
              + tp.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70),
              flush=True)
        if args.gaps:
            print(f"--- N={n}: GPU idle within one store='stats' block\n" + gaps(stats), flush=True)
        if args.syncs:
            print(f"--- N={n}: host-device syncs of one store='stats' block\n" + syncs(stats), flush=True)
        if args.stacks:
            for name in ("plain", "record(store='stats')"):
                print(f"--- N={n}: GPU ms per {name} block by the attnstats line that launched it\n"
                      + by_line(runs[name]), flush=True)


def gaps(fn, min_us=50.0):
    """Idle stretches of the device during one call of ``fn`` (from its first kernel to the end of the
    call, measured on the host), longer than ``min_us``, with the kernels before and after each."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as tp:
        fn()
        torch.cuda.synchronize()
    kernels = sorted((ev for ev in tp.events() if ev.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda ev: ev.time_range.start)
    cpu = [ev for ev in tp.events() if ev.device_type == torch.autograd.DeviceType.CPU]
    first_cpu = min(ev.time_range.start for ev in cpu)
    lines, idle, busy_end = [], 0.0, kernels[0].time_range.start if kernels else 0.0
    lines.append(f"host start to first kernel: {(busy_end - first_cpu) / 1e3:.3f} ms")
    prev = None
    for ev in kernels:
        gap = ev.time_range.start - busy_end
        if gap > min_us and prev is not None:
            idle += gap
            lines.append(f"{gap / 1e3:7.3f} ms idle after {prev.name[:50]!r} before {ev.name[:50]!r}")
        if ev.time_range.end > busy_end:
            busy_end, prev = ev.time_range.end, ev
    last_cpu = max(ev.time_range.end for ev in cpu)
    lines.append(f"{idle / 1e3:.3f} ms idle in gaps over {min_us:.0f} us; last kernel to host end "
                 f"{(last_cpu - busy_end) / 1e3:.3f} ms")
    return "\n".join(lines)


def syncs(fn):
    """The attnstats lines at which one call of ``fn`` waits for the device, with their counts."""
    seen = {}
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" not in str(w.message):
            continue
        key = f"{w.filename}:{w.lineno}"
        seen[key] = seen.get(key, 0) + 1
    return "\n".join(f"{c:4d}  {k}" for k, c in sorted(seen.items(), key=lambda kv: -kv[1])) or "none"


def by_line(fn, repeat=5):
    """GPU time per call of ``fn``, summed by the innermost attnstats (else model) source line of each op."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
                                with_stack=True, record_shapes=True,
                                experimental_config=torch._C._profiler._ExperimentalConfig(verbose=True)) as tp:
        for _ in range(repeat):
            fn()
        torch.cuda.synchronize()
    shapes = tp.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total", row_limit=30,
                                                               max_name_column_width=30, max_shapes_column_width=90)
    totals = {}
    for ev in tp.events():
        gpu = ev.self_device_time_total
        if gpu <= 0 or ev.device_type != torch.autograd.DeviceType.CPU:
            continue
        if not ev.stack:  # launched outside a torch op (Triton): by kernel name
            totals["launch " + ev.name] = totals.get("launch " + ev.name, 0.0) + gpu / 1e3 / repeat
            continue
        frames = [f for f in ev.stack if "attnstats/" in f] or [f for f in ev.stack if "modeling_" in f] or ev.stack[:1]
        key = frames[0]
        totals[key] = totals.get(key, 0.0) + gpu / 1e3 / repeat
    rows = sorted(totals.items(), key=lambda kv: -kv[1])
    return ("\n".join(f"{ms:9.3f} ms  {line}" for line, ms in rows[:40]) + f"\n{sum(totals.values()):9.3f} ms  in all\n"
            + shapes)


if __name__ == "__main__":
    main()
