"""Tokens per second of `attnstats analyze` over a corpus against the plain forward over the same batches.

all-MiniLM-L6-v2 (the packaged model) on the CPU, over the default corpus (CPython's documentation
topics, 79 documents, the first ``--max-tokens`` tokens of each): the plain forward runs the same
sequences in the same batches (16, sorted by length) that ``analyze`` runs; ``analyze`` is timed end to
end into a fresh folder (model loading, every statistic with LLN alongside, shards, summary, figures),
and again without the figures' and files' share by timing only its shard loop.

Usage: ``python benchmarks/corpus_cpu.py [--max-tokens 128] [--out results/corpus_cpu.json]``.
"""
import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from attnstats.app import analysis
from attnstats.app.corpus import documentation_corpus
from attnstats.app.models import load_model
from harness import timed_shards


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    docs = documentation_corpus()
    model, tok = load_model()
    seqs = analysis._sequences(tok, docs, 0, args.max_tokens, "truncate")
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][2]))
    batches = [tok.pad({"input_ids": [seqs[i][2] for i in order[s:s + 16]]}, return_tensors="pt")
               for s in range(0, len(order), 16)]
    tokens = sum(len(s[2]) for s in seqs)
    with torch.no_grad():
        model(**batches[0])
        t0 = time.perf_counter()
        for b in batches:
            model(**b)
        plain = time.perf_counter() - t0

    folder = Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    with timed_shards() as shard_time:
        analysis.analyze_model(None, docs, folder / "out", max_tokens=args.max_tokens, note=lambda m: None)
    whole = time.perf_counter() - t0
    shutil.rmtree(folder)
    shards = sum(shard_time)
    res = {"threads": torch.get_num_threads(), "documents": len(docs), "sequences": len(seqs), "tokens": tokens,
           "plain_forward_s": plain, "plain_tokens_per_s": tokens / plain,
           "analyze_s": whole, "analyze_tokens_per_s": tokens / whole, "analyze_over_plain": whole / plain,
           "shard_loop_s": shards, "shard_loop_over_plain": shards / plain}
    for k, v in res.items():
        print(f"{k:24s} {v:.4g}" if isinstance(v, float) else f"{k:24s} {v}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
