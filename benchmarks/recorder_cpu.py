"""The recorder's own cost on the CPU: a model so small that the forward is mostly Python.

A Llama-style model from a config (4 layers, hidden 64, 4 query heads, 2 key-value heads, SDPA), one
sequence of ``--tokens`` tokens, one CPU thread, ``torch.no_grad()``. Timed in turns (every variant once
per round, ``--rounds`` rounds, the median reported) so that a slow spell of the machine hits them alike:

- ``plain``: the forward alone, the baseline;
- ``enter + exit``: an empty ``record(model, layers=[])`` block;
- ``record(layers=[])``: the forward under a block that captures nothing (hooks and modes only);
- ``record``: the forward with every call captured (q and k kept);
- ``record(store="stats")``: the forward with every default statistic computed during it.

Usage: ``python benchmarks/recorder_cpu.py [--rounds 40] [--tokens 16] [--out results/recorder_cpu.json]``.
To compare with another version of attnstats, put its package first on ``PYTHONPATH``.
"""
import argparse
import json
import statistics
import time
import warnings

import torch

import attnstats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    warnings.simplefilter("ignore")  # nothing captured under layers=[]: said once per block
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (1, args.tokens), generator=torch.Generator().manual_seed(0))

    def under(**options):
        def run():
            with attnstats.record(model, **options):
                model(ids)
        return run

    def enter_exit():
        with attnstats.record(model, layers=[]):
            pass

    variants = {"plain": lambda: model(ids), "enter + exit": enter_exit, "record(layers=[])": under(layers=[]),
                "record": under(), "record(store='stats')": under(store="stats")}
    times = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():
            fn()
            fn()
        for _ in range(args.rounds):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    plain = statistics.median(times["plain"])
    result = {"attnstats": attnstats.__file__, "torch": torch.__version__, "tokens": args.tokens, "rows": []}
    for name, ts in times.items():
        med = statistics.median(ts)
        result["rows"].append({"variant": name, "median_ms": med * 1e3, "ratio": med / plain})
        print(f"{name:24s} {med * 1e3:8.3f} ms  {med / plain:6.2f}×")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
