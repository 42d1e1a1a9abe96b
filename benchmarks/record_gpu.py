"""What a user pays on the GPU: ``record(model, store="stats")`` against the plain forward, end to end.

A Llama-style model from a config (random weights; hidden 2048, 32 query heads, 8 key-value heads,
head dim 64, SDPA, bf16) is run on one sequence of N tokens, causal, with ``torch.no_grad()``:

- ``plain``: the forward alone, the baseline of every ratio;
- ``stats[groups]``: the same forward under ``attnstats.record(model, store="stats", metrics=groups)``,
  for the default metrics and for subsets (to see what each group costs); ``default, eager`` with
  ``attnstats.cuda_graphs.ENABLED = False`` (each layer's statistics launched one by one, no graph replay).

The parts ``lognormal`` and ``streaming`` time the pieces on one layer's q, k: the GPU log-normal fit
(sample + fit of all heads of a layer) and ``streaming_stats`` against SDPA on the same q, k, v.
``overhead`` times the recorder alone (entering the block; a forward with no layer selected).
``corpus`` times ``attnstats analyze --store stats`` over CPython's documentation topics in windows of 4096
tokens against the plain forward over the same sequences.
``encoder`` runs a BERT-style (non-causal, 32 heads of 64) model through ``record(store="stats")``,
spectral gap included. Every time is the median of CUDA-event timings (``harness.bench``).

Usage (on a GPU): ``cd benchmarks && PYTHONPATH=.. python record_gpu.py --out $OUT/record_gpu.json``
(``ATTNSTATS_TOKENIZER=DIR`` for ``corpus`` where the packaged model is not installed: a folder holding
all-MiniLM-L6-v2's tokenizer files);
``--skip`` leaves out parts, ``--ns`` chooses the lengths.
"""
import argparse
import json
import time
import warnings

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import attnstats
from attnstats import cuda_graphs
from attnstats.metrics import METRICS
from attnstats.stats.qk import log_prob_table, streaming_lognormal_fit, streaming_stats
from harness import bench, run_parts, timed_shards

DEV = "cuda"


def llama_config(layers, n=131072, vocab=32000):
    """The Llama-style shape of these benchmarks: hidden 2048, 32 query heads, 8 key-value heads, head dim 64."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=n, attn_implementation="sdpa",
    )


def llama(layers):
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaModel(llama_config(layers)).to(DEV, torch.bfloat16).eval()


def tokenizer():
    """all-MiniLM-L6-v2's tokenizer: from ``ATTNSTATS_TOKENIZER`` (a folder of its files, on a machine
    without the packaged model), else the package."""
    import os

    import transformers

    if os.environ.get("ATTNSTATS_TOKENIZER"):
        return transformers.AutoTokenizer.from_pretrained(os.environ["ATTNSTATS_TOKENIZER"])
    from attnstats.app.models import load_model

    return load_model()[1]


def llama_folder(folder, n, layers=4):
    """A model folder ``attnstats analyze --model`` loads: the Llama-style model (random weights) and the
    MiniLM tokenizer, both taking up to ``n`` tokens."""
    import transformers

    tok = tokenizer()
    tok.model_max_length = n
    torch.manual_seed(0)
    transformers.LlamaModel(llama_config(layers, n, len(tok))).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def bert(layers, n):
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=30522, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=32,
        max_position_embeddings=n, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg, add_pooling_layer=False).to(DEV, torch.bfloat16).eval()


def timed(fn, target_ms):
    """``harness.bench`` for calls under a second; a median of 3 wall-clock runs (after one) for slower ones."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = time.perf_counter() - t0
    if est < 1.0:
        return bench(fn, target_ms)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[1] * 1e3


def timed_forward(model, ids, metrics=None, graphs=True):
    def run():
        cuda_graphs.ENABLED = graphs
        with torch.no_grad():
            if metrics is None:
                model(input_ids=ids)
            else:
                with attnstats.record(model, store="stats", metrics=metrics):
                    model(input_ids=ids)
    return run


def model_table(make, ns, groups, label, target_ms=300):
    rows = []
    for n, layers in ns:
        model = make(layers, n)
        ids = torch.randint(0, 30000, (1, n), device=DEV, generator=torch.Generator(DEV).manual_seed(n))
        plain = timed(timed_forward(model, ids), target_ms)
        row = {"n": n, "layers": layers, "plain_ms": plain}
        print(f"{label} N={n} layers={layers}: plain {plain:.1f} ms", flush=True)
        for name, metrics in groups:
            eager = name.endswith(", eager")  # each layer's statistics launched one by one, no CUDA graph
            t = timed(timed_forward(model, ids, metrics, graphs=not eager), target_ms)
            cuda_graphs.ENABLED = True
            row[name + "_ms"] = t
            row[name + "_ratio"] = t / plain
            print(f"  {name:40s} {t:9.1f} ms  {t / plain:6.2f}×", flush=True)
        rows.append(row)
        del model
        torch.cuda.empty_cache()
    return rows


DECODER_GROUPS = [
    ("default", METRICS),
    ("default, eager", METRICS),
    ("entropy+moments", ("entropy", "moments")),
    ("entropy+moments+gap", ("entropy", "moments", "spectral_gap")),
    ("entropy+moments+lognormal", ("entropy", "moments", "lognormal")),
]


def part_decoder(ns):
    return model_table(lambda layers, n: llama(layers), ns, DECODER_GROUPS, "llama causal")


def part_overhead(ns):
    """The recorder alone: entering and leaving the block, and a forward with no layer selected."""
    rows = []
    model = llama(4)
    for n in ns:
        ids = torch.randint(0, 30000, (1, n), device=DEV, generator=torch.Generator(DEV).manual_seed(n))

        def enter_exit():
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # nothing captured: said once per block
                with attnstats.record(model, store="stats"):
                    pass

        def no_layer():
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with attnstats.record(model, store="stats", layers=[]):
                    model(input_ids=ids)

        row = {"n": n, "plain_ms": bench(timed_forward(model, ids)), "enter_exit_ms": bench(enter_exit),
               "no_layer_selected_ms": bench(no_layer)}
        rows.append(row)
        print(f"overhead N={n}: plain {row['plain_ms']:.2f} ms, enter+exit {row['enter_exit_ms']:.2f} ms, "
              f"forward under record(layers=[]) {row['no_layer_selected_ms']:.2f} ms", flush=True)
    return rows


def part_corpus(n, layers=4):
    """``analyze`` over a corpus with store="stats" on the GPU against the plain forward over the same batches.

    The Llama-style model of this file (float32, as ``analyze`` loads it) and the packaged MiniLM tokenizer
    are saved to a folder that ``analyze`` loads; the corpus is CPython's documentation topics, split
    into windows of ``n`` tokens, one sequence per batch.
    """
    import shutil
    import tempfile
    from pathlib import Path

    from attnstats.app import analysis
    from attnstats.app.corpus import documentation_corpus
    from attnstats.app.models import load_model

    folder = Path(tempfile.mkdtemp())
    llama_folder(folder / "model", n, layers)
    docs = documentation_corpus()
    net, tok = load_model(folder / "model")
    net = net.to(DEV)
    seqs = analysis._sequences(tok, docs, 0, n, "split")
    batches = [tok.pad({"input_ids": [s[2]]}, return_tensors="pt").to(DEV) for s in seqs]
    tokens = sum(len(s[2]) for s in seqs)

    def plain():
        with torch.no_grad():
            for b in batches:
                net(**b)

    plain()  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    plain()
    torch.cuda.synchronize()
    t_plain = time.perf_counter() - t0
    try:
        for attempt in range(2):  # the first compiles the kernels for these shapes
            shutil.rmtree(folder / "out", ignore_errors=True)
            t0 = time.perf_counter()
            with timed_shards(sync=True) as shard_time:
                analysis.analyze_model(folder / "model", docs, folder / "out", max_tokens=n, long="split",
                                       alongside=(), store="stats", device=DEV, batch_size=1, note=lambda m: None)
            t_whole = time.perf_counter() - t0
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    row = {"n": n, "layers": layers, "sequences": len(seqs), "tokens": tokens, "plain_s": t_plain,
           "plain_tokens_per_s": tokens / t_plain, "shard_loop_s": sum(shard_time),
           "shard_loop_tokens_per_s": tokens / sum(shard_time), "shard_loop_over_plain": sum(shard_time) / t_plain,
           "analyze_s": t_whole}
    print(f"corpus N={n}: {len(seqs)} sequences, {tokens} tokens; plain forward {t_plain:.2f} s "
          f"({tokens / t_plain:,.0f} tokens/s); analyze --store stats shards {sum(shard_time):.2f} s "
          f"({tokens / sum(shard_time):,.0f} tokens/s, {sum(shard_time) / t_plain:.2f}×); whole analyze {t_whole:.1f} s",
          flush=True)
    return row


def part_encoder(ns):
    groups = [("default", METRICS), ("default without gap", tuple(m for m in METRICS if m != "spectral_gap"))]
    return model_table(bert, ns, groups, "bert encoder", target_ms=100)


def qkv(h, hk, n, d=64, seed=0):
    g = torch.Generator(DEV).manual_seed(seed)
    q = torch.randn(1, h, n, d, device=DEV, generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, hk, n, d, device=DEV, generator=g, dtype=torch.bfloat16)
    v = torch.randn(1, hk, n, d, device=DEV, generator=g, dtype=torch.bfloat16)
    return q, k, v


def part_check():
    """The GPU sample and fit against the CPU: the same ranks, and scipy's fit of the same values."""
    from attnstats.stats.lognormal import fit_log_values
    from attnstats.stats.qk import sample_log_probs
    from attnstats.stats.sampling import sample_ranks

    idx = torch.arange(64)
    same_ranks = torch.equal(sample_ranks(10**9, 100_000, 7, idx.to(DEV)).cpu(), sample_ranks(10**9, 100_000, 7, idx))
    q, k, _ = qkv(8, 2, 4096)
    fit = streaming_lognormal_fit(q, k, causal=True, max_samples=20_000)
    vals = sample_log_probs(q, k, causal=True, max_samples=20_000)
    worst = {}
    for h in range(8):
        ref = fit_log_values(vals[h].numpy())
        for f in ("mu", "sigma", "ks_statistic", "ks_pvalue", "ad_statistic", "skew", "excess_kurtosis"):
            a, b = float(getattr(fit, f)[0, h]), float(getattr(ref, f))
            err = abs(a - b) / max(abs(b), 1e-300) if b != 0 else abs(a)
            worst[f] = max(worst.get(f, 0.0), err)
    cpu_fit = streaming_lognormal_fit(q.cpu(), k.cpu(), causal=True, max_samples=20_000)
    mu_gap = float((fit.mu - cpu_fit.mu).abs().max())
    print(f"check: GPU ranks == CPU ranks: {same_ranks}; GPU fit vs scipy on the same values, worst relative "
          f"error per field: {worst}; GPU vs CPU (float64 scores) mu: {mu_gap:.2e}", flush=True)
    # The temperature's σ and the causal gap's diagonal, GPU kernels against the CPU's float64 torch.
    from attnstats.capture import head_sigmas
    from attnstats.stats.spectral import diagonal_log_probs

    q, k, _ = qkv(32, 8, 4096)
    kx = k.repeat_interleave(4, dim=1)
    lse = streaming_stats(q, kx, causal=True).lse
    sig = max(float(((a.cpu() - b) / b).abs().max())
              for a, b in zip(head_sigmas(q, kx, None, True), head_sigmas(q.cpu(), kx.cpu(), None, True)))
    diag = diagonal_log_probs(q, kx, 0.125, lse).cpu()
    diag_ref = diagonal_log_probs(q.cpu(), kx.cpu(), 0.125, lse.cpu())
    diag_err = float((diag - diag_ref).abs().max() / diag_ref.abs().max())
    print(f"check: head σ GPU vs CPU worst relative {sig:.2e}; causal gap diagonal ln P_ii {diag_err:.2e}", flush=True)
    # store="stats" reads the 8 grouped key heads for their query heads; store="qk" + frame() repeats them
    model = llama(2)
    ids = torch.randint(0, 30000, (1, 4096), device=DEV, generator=torch.Generator(DEV).manual_seed(1))
    frames = []
    for store in ("stats", "qk"):
        with torch.no_grad(), attnstats.record(model, store=store) as rec:
            model(input_ids=ids)
        frames.append(rec.frame(batch="each").set_index(["layer", "head", "batch", "metric"]).value.sort_index())
    a, b = (f.to_numpy() for f in frames)
    grouped = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))) if list(frames[0].index) == list(frames[1].index) else float("nan")
    print(f"check: store='stats' (grouped key heads) vs store='qk' frame() (repeated), 2 layers, N = 4096: "
          f"worst relative difference {grouped:.2e} over {a.size} values", flush=True)
    # each layer's statistics replayed as a CUDA graph (from a shape's second call on) against eager launches
    runs = []
    pair = torch.randint(0, 30000, (2, 2048), device=DEV, generator=torch.Generator(DEV).manual_seed(2))
    for graphs in (False, True, True, True):
        cuda_graphs.ENABLED = graphs
        frames = []
        for x in (ids, pair):  # one sequence; two, whose samples are drawn from different matrix keys
            with torch.no_grad(), attnstats.record(model, store="stats") as rec:
                model(input_ids=x)
            frames.append(rec.frame(batch="each").set_index(["layer", "head", "batch", "metric"]).value.sort_index())
        runs.append(pd.concat(frames, keys=["one", "two"]))
    cuda_graphs.ENABLED = True
    # a graph captured under inference mode, replayed outside it (and the other way round)
    modes = []
    for mode in (torch.inference_mode, torch.inference_mode, torch.no_grad, torch.inference_mode):
        with mode(), attnstats.record(model, store="stats") as rec:
            model(input_ids=pair[:, :1024])
        modes.append(rec.frame(batch="each").value.to_numpy())
    modes_ok = all(np.array_equal(m, modes[0], equal_nan=True) for m in modes[1:])
    print(f"check: graphs captured under torch.inference_mode() and replayed under no_grad: {modes_ok}", flush=True)
    replayed = len(cuda_graphs.SHARED)
    torch.cuda.synchronize()
    held = torch.cuda.memory_reserved()
    cuda_graphs.SHARED.clear()
    torch.cuda.empty_cache()
    held_mib = (held - torch.cuda.memory_reserved()) / 2**20  # what the graphs' pools and buffers kept
    same = all(r.index.equals(runs[0].index) and np.array_equal(r.to_numpy(), runs[0].to_numpy(), equal_nan=True)
               for r in runs[1:])
    print(f"check: store='stats' with CUDA graphs (3 blocks of 1 × 4096 and of 2 × 2048 tokens, {replayed} graph(s) captured, holding "
          f"{held_mib:.0f} MiB) identical to eager launches: {same}", flush=True)

    # streaming_stats itself: replayed from its second call of a shape on, against eager launches
    q, k, _ = qkv(32, 8, 4096)
    st_runs = []
    for graphs in (False, True, True, True):
        cuda_graphs.ENABLED = graphs
        st = streaming_stats(q, k, causal=True)
        m = st.entry_moments
        st_runs.append([st.entropy, st.lse, st.sum_p2, st.row_count, m.mean, m.var, m.log_mean, m.log_var,
                        m.count, m.zero_count])
    cuda_graphs.ENABLED = True
    st_same = all(all(torch.equal(a, b) for a, b in zip(r, st_runs[0])) for r in st_runs[1:])
    print(f"check: streaming_stats replayed as a CUDA graph identical to eager launches: {st_same}", flush=True)

    def syncs(x):  # not capturable: reads the device
        return (x * float(x.sum()),)

    x = torch.ones(4, device=DEV)
    cache = cuda_graphs.GraphCache()
    fell_back = all(torch.equal(cache("sync", syncs, x)[0], x * 4) for _ in range(3)) and len(cache) == 0
    print(f"check: a function that reads the device falls back to eager launches: {fell_back}", flush=True)
    return {"same_ranks": same_ranks, "graphs_identical_to_eager": same, "graphs_captured": replayed,
            "graphs_held_mib": held_mib, "streaming_stats_graph_identical": st_same, "graphs_across_inference_mode": modes_ok,
            "uncapturable_falls_back": fell_back, "worst_rel_err_vs_scipy": worst, "gpu_vs_cpu_mu_abs": mu_gap,
            "head_sigma_rel": sig, "diagonal_rel": diag_err, "grouped_vs_repeated_rel": grouped}


def part_lognormal(ns):
    rows = []
    for n in ns:
        q, k, _ = qkv(32, 8, n)
        lse = streaming_stats(q, k, causal=True).lse
        t = bench(lambda: streaming_lognormal_fit(q, k, causal=True, lse=lse))
        # the fit's sort of the sampler's table: float32 as the sampler stores it, and widened to float64
        table, _ = log_prob_table(q, k, None, None, True, lse, 100_000, 0, 0)
        wide = table.double()
        t32 = bench(lambda: torch.sort(table, dim=1))
        t64 = bench(lambda: torch.sort(wide, dim=1))
        rows.append({"n": n, "heads": 32, "max_samples": 100_000, "ms_per_layer": t, "table_dtype": str(table.dtype),
                     "sort_ms_table": t32, "sort_ms_float64": t64})
        print(f"lognormal fit N={n}: {t:.2f} ms per layer (32 heads, 100k samples each); the sort of its "
              f"{table.dtype} table {t32:.3f} ms, of the same widened to float64 {t64:.3f} ms", flush=True)
    return rows


def part_streaming(ns):
    rows = []
    for n in ns:
        for causal in (True, False):
            q, k, v = qkv(32, 8, n)
            t_sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True))
            t_st = bench(lambda: streaming_stats(q, k, causal=causal))
            rows.append({"n": n, "causal": causal, "sdpa_ms": t_sdpa, "stream_ms": t_st, "ratio": t_st / t_sdpa})
            print(f"streaming_stats N={n} causal={causal}: SDPA {t_sdpa:.3f} ms, stats {t_st:.3f} ms "
                  f"({t_st / t_sdpa:.2f}×)", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/record_gpu.json")
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--ns", nargs="*", type=int, default=[4096, 8192, 32768])
    ap.add_argument("--encoder-ns", nargs="*", type=int, default=[4096, 16384], help="N of the encoder table (2 layers)")
    ap.add_argument("--no-graphs", action="store_true",
                    help="attnstats.cuda_graphs.ENABLED = False (each call's kernels launched one by one) in the parts "
                         "other than check and decoder, which time both themselves")
    args = ap.parse_args()
    if args.no_graphs:
        cuda_graphs.ENABLED = False
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "started": time.ctime()}
    dec = [(n, 4) for n in args.ns] + [(131072, 2)]
    parts = [
        ("check", part_check),
        ("lognormal", lambda: part_lognormal([8192, 32768])),
        ("streaming", lambda: part_streaming([1024, 4096, 16384, 32768])),
        ("overhead", lambda: part_overhead([4096, 32768])),
        ("decoder", lambda: part_decoder(dec)),
        ("encoder", lambda: part_encoder([(n, 2) for n in args.encoder_ns])),
        ("corpus", lambda: part_corpus(4096)),
    ]
    print(json.dumps(run_parts(parts, set(args.skip), args.out, res), indent=1)[:2000])


if __name__ == "__main__":
    main()
