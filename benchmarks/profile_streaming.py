"""Where the time of streaming_stats goes at N = 16k, d = 64, 16 heads, bf16 (H100).

    PYTHONUNBUFFERED=1 python benchmarks/profile_streaming.py

Prints do_bench medians (ms) of the whole call and of its parts, host time per call (µs, no sync
except the one inside the call), and a torch.profiler table of five calls.
"""
import sys
import time
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnstats.stats import online_triton as streaming_triton  # noqa: E402
from attnstats.stats.online import _reshape_rows, _row_pass, moments_from_rows, prepare_qk  # noqa: E402
from attnstats.stats.qk import streaming_stats  # noqa: E402

q, k = [torch.randn(1, 16, 16384, 64, device='cuda', dtype=torch.bfloat16) for _ in range(2)]
qb, kb, scale, _, _ = prepare_qk(q, k)
for _ in range(3): streaming_stats(q, k)
torch.cuda.synchronize()
print("full", do_bench(lambda: streaming_stats(q, k), return_mode="median"))
print("kernel", do_bench(lambda: streaming_triton.raw_accumulators(qb, kb, scale, None, False), return_mode="median"))
print("row_accumulators", do_bench(lambda: streaming_triton.row_accumulators(qb, kb, scale, None, False), return_mode="median"))
print("row_pass", do_bench(lambda: _row_pass(q, k, None, None, False, "auto", None), return_mode="median"))
rows, batch, _, _ = _row_pass(q, k, None, None, False, "auto", None)
rows = _reshape_rows(rows, batch)
print("moments", do_bench(lambda: moments_from_rows(rows), return_mode="median"))
print("prepare", do_bench(lambda: prepare_qk(q, k, check_values=False), return_mode="median"))
# host time per call, no sync
for name, f in [("full", lambda: streaming_stats(q, k)), ("moments", lambda: moments_from_rows(rows)),
                ("prepare", lambda: prepare_qk(q, k, check_values=False)),
                ("launch", lambda: streaming_triton.raw_accumulators(qb, kb, scale, None, False))]:
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(50): f()
    t1 = time.perf_counter(); torch.cuda.synchronize()
    print("host us/call", name, (t1 - t0) / 50 * 1e6)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(5): streaming_stats(q, k)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
