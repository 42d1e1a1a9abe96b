"""Two GPUs: the corpus analysis under torchrun with NCCL, and a model split over both GPUs.

Part ``corpus``: a Llama-style model from a config (4 layers, hidden 2048, 32 query heads, 8 key-value
heads, head dim 64; random weights, run in bf16) and a corpus of generated documents (sentences of
CPython's documentation drawn at random until a document holds about N tokens) are written to a
folder; ``attnstats analyze --store stats --device cuda --dtype bfloat16`` runs over it with
``torchrun --nproc-per-node 1`` and ``--nproc-per-node 2`` (NCCL, NVLink multicast off:
``NCCL_NVLS_ENABLE=0``). The merged summaries are compared (exact columns: count, mean, variance,
min, max) and the throughput of the shard loops is reported in tokens per second.

Part ``split``: the same model loaded with ``device_map="auto"`` over both GPUs (through accelerate
when it is installed, else the layers moved by hand with a hook that brings each layer's inputs to its
device): the output with and without ``record(store="stats")`` is compared bit for bit, and the
statistics with those of the model on one GPU.

Usage (2 GPUs): ``cd benchmarks && PYTHONPATH=.. python multi_gpu.py --out $OUT/multi_gpu.json``
(``ATTNSTATS_TOKENIZER=DIR`` where the packaged model is not installed).
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from record_gpu import llama_folder, tokenizer

EXACT = ["kernel", "layer", "head", "metric", "count", "nan_count", "mean", "var", "min", "max"]


def make_corpus(path: Path, tok, docs: int, tokens: int, seed: int = 0) -> Path:
    from attnstats.app.corpus import sentences

    pool = sentences(1000, seed=seed)
    rng = random.Random(seed)
    per_sentence = sum(len(tok(s)["input_ids"]) for s in pool[:50]) / 50
    with open(path, "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(rng.choice(pool) for _ in range(int(tokens / per_sentence) + 2))}) + "\n")
    return path


def run_analyze(nproc: int, model: Path, corpus: Path, out: Path, n: int) -> dict:
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", ATTNSTATS_PROGRESS="0", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", "attnstats",
           "analyze", "--model", str(model), "--corpus", str(corpus), "--out", str(out), "--max-tokens", str(n),
           "--store", "stats", "--device", "cuda", "--dtype", "bfloat16", "--alongside", "--shard-size", "4"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    return {"nproc": nproc, "wall_s": wall}


def part_corpus(work: Path, runs) -> list:
    tok = tokenizer()
    model = llama_folder(work / "model", max(n for n, _ in runs))
    rows = []
    for n, docs in runs:
        corpus = make_corpus(work / f"corpus-{n}.jsonl", tok, docs, n)
        tokens = sum(min(n, len(tok(json.loads(line)["text"])["input_ids"])) for line in open(corpus))
        row = {"n": n, "documents": docs, "tokens": tokens}
        # a corpus of 2 documents per process: the fixed cost of a launch (processes, model loading,
        # compiling the kernels), taken off the full run's time for the throughput
        tiny = make_corpus(work / f"tiny-{n}.jsonl", tok, 2, n, seed=1)
        for nproc in (1, 2):
            out = work / f"out-{n}-{nproc}"
            fixed = run_analyze(nproc, model, tiny, out / "tiny", n)["wall_s"]
            r = run_analyze(nproc, model, corpus, out / "timed", n)
            row[f"wall_s_{nproc}gpu"] = r["wall_s"]
            row[f"launch_s_{nproc}gpu"] = fixed
            row[f"tokens_per_s_{nproc}gpu"] = tokens / max(r["wall_s"] - fixed, 1e-9)
        a = pd.read_csv(work / f"out-{n}-1" / "timed" / "summary.csv")
        b = pd.read_csv(work / f"out-{n}-2" / "timed" / "summary.csv")
        row["exact_columns_equal"] = bool(a[EXACT].equals(b[EXACT]))
        row["max_rel_var_diff"] = float(((a["var"] - b["var"]).abs() / a["var"].abs().clip(lower=1e-300)).max())
        qs = [c for c in a.columns if c.startswith("q")]
        row["max_abs_quantile_diff"] = float((a[qs] - b[qs]).abs().max().max())
        row["scaling_efficiency"] = row["tokens_per_s_2gpu"] / (2 * row["tokens_per_s_1gpu"])
        print(f"corpus N={n}: {docs} documents, {tokens} tokens; 1 GPU {row['tokens_per_s_1gpu']:,.0f} tokens/s "
              f"({row['wall_s_1gpu']:.1f} s, launch {row['launch_s_1gpu']:.1f} s), 2 GPUs {row['tokens_per_s_2gpu']:,.0f} "
              f"tokens/s ({row['wall_s_2gpu']:.1f} s, launch {row['launch_s_2gpu']:.1f} s), "
              f"efficiency {row['scaling_efficiency']:.2f}; exact columns equal: {row['exact_columns_equal']}, "
              f"max |Δq| {row['max_abs_quantile_diff']:.3g}", flush=True)
        rows.append(row)
    return rows


def split_model(folder: Path):
    """The model over cuda:0 and cuda:1: ``device_map="auto"`` through accelerate, else layers by hand."""
    import transformers

    try:
        import accelerate  # noqa: F401

        model = transformers.AutoModel.from_pretrained(folder, device_map="auto", torch_dtype=torch.bfloat16,
                                                       max_memory={0: "300MiB", 1: "40GiB"})
        how = "device_map=auto (accelerate)"
    except ImportError:
        model = transformers.AutoModel.from_pretrained(folder, torch_dtype=torch.bfloat16).to("cuda:0")
        half = len(model.layers) // 2
        for layer in model.layers[half:]:
            layer.to("cuda:1")

            def to_layer(module, args, kwargs, dev=torch.device("cuda:1")):
                move = lambda x: x.to(dev) if isinstance(x, torch.Tensor) else (  # noqa: E731
                    tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in x) if isinstance(x, tuple) else x)
                return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

            layer.register_forward_pre_hook(to_layer, with_kwargs=True)
        model.norm.to("cuda:1")
        how = "layers 2-3 moved to cuda:1 by hand (accelerate not installed)"
    return model.eval(), how


def part_split(work: Path, n: int = 4096) -> dict:
    import attnstats

    folder = work / "model" if (work / "model").exists() else llama_folder(work / "model", n)
    model, how = split_model(folder)
    devices = sorted({str(p.device) for p in model.parameters()})
    ids = torch.randint(0, 30000, (1, n), generator=torch.Generator().manual_seed(1)).to("cuda:0")
    with torch.no_grad():
        plain = model(input_ids=ids).last_hidden_state
        with attnstats.record(model, store="stats") as rec:
            recorded = model(input_ids=ids).last_hidden_state
    split_frame = rec.frame(batch="each")
    import transformers

    single = transformers.AutoModel.from_pretrained(folder, torch_dtype=torch.bfloat16).to("cuda:0").eval()
    with torch.no_grad(), attnstats.record(single, store="stats") as rec1:
        single(input_ids=ids)
    one = rec1.frame(batch="each")
    key = ["layer", "head", "batch", "metric"]
    a = split_frame.set_index(key).value.sort_index()
    b = one.set_index(key).value.sort_index()
    rel = (a - b).abs() / b.abs().clip(lower=1e-12)
    diff = rel.max()
    worst = rel.sort_values(ascending=False).head(5)
    print("split: largest differences:", [(k, float(a[k]), float(b[k])) for k in worst.index], flush=True)
    row = {"how": how, "devices": devices, "record_devices": sorted({str(r.stats['entropy'].device) for r in rec.records}),
           "outputs_bit_identical": bool(torch.equal(plain, recorded)), "max_rel_stat_diff_vs_one_gpu": float(diff),
           "records": len(rec.records),
           "largest_differences": [[list(map(str, k)), float(a[k]), float(b[k])] for k in worst.index]}
    print(f"split: {how}; parameters on {devices}; output with and without record bit-identical: "
          f"{row['outputs_bit_identical']}; statistics vs one GPU: max relative difference {diff:.3g}", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/multi_gpu.json")
    ap.add_argument("--skip", nargs="*", default=[])
    args = ap.parse_args()
    res = {"devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    work = Path(tempfile.mkdtemp())
    for name, fn in (("corpus", lambda: part_corpus(work, [(4096, 200), (16384, 40)])), ("split", lambda: part_split(work))):
        if name in args.skip:
            continue
        try:
            res[name] = fn()
        except Exception as err:  # keep what ran
            import traceback

            traceback.print_exc()
            res[name + "_error"] = f"{type(err).__name__}: {err}"
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
