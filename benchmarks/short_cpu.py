"""Statistics at short length on the CPU: what `record` costs against the plain forward.

all-MiniLM-L6-v2 (the packaged model), a batch of 16 sentences of 64 tokens, on the CPU; every
figure is the median of ``--repeat`` runs in this process, and every ratio is against the plain
forward timed in the same run:

- plain forward (``torch.no_grad``), the baseline;
- ``record(model)`` around it: capture only;
- ``record(model)`` + ``rec.frame()``: every default metric from the kept q, k;
- ``record(model, store="stats")`` + ``rec.frame()``: every default metric during the forward;
- one piece of the statistics: the KS p-values of the batch's log-normal fits, attnstats' batched
  ``kolmogorov_sf`` against scipy's ``kstwo.sf``.

Usage: ``python benchmarks/short_cpu.py [--repeat 7] [--batch 16] [--tokens 64] [--out results/short_cpu.json]``.
"""
import argparse
import json
from pathlib import Path

import torch

import attnstats
from attnstats.app.corpus import sentences
from attnstats.app.models import load_model
from harness import median_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, tok = load_model()
    texts = sentences(args.batch * 4, seed=0)
    batch = tok(texts, padding="max_length", truncation=True, max_length=args.tokens, return_tensors="pt")
    batch = {k: v[: args.batch] for k, v in batch.items()}

    def plain():
        with torch.no_grad():
            model(**batch)

    def capture():
        with torch.no_grad(), attnstats.record(model):
            model(**batch)

    def qk_frame():
        with torch.no_grad(), attnstats.record(model) as rec:
            model(**batch)
        rec.frame()

    def stats_frame():
        with torch.no_grad(), attnstats.record(model, store="stats") as rec:
            model(**batch)
        rec.frame()

    res = {"threads": torch.get_num_threads(), "batch": args.batch, "tokens": args.tokens, "rows": {}}
    base = None
    for name, fn in [("plain forward", plain), ("record, capture only", capture),
                     ("record + frame()", qk_frame), ("record(store='stats') + frame()", stats_frame)]:
        med, lo, hi = median_s(fn, args.repeat)
        base = med if base is None else base
        res["rows"][name] = {"median_s": med, "min_s": lo, "max_s": hi, "ratio": med / base}
        print(f"{name:34s} {med * 1e3:9.1f} ms  (min {lo * 1e3:.1f}, max {hi * 1e3:.1f})  {med / base:6.2f}×", flush=True)
    # One piece: the KS p-values of the batch's log-normal fits (every layer and head), attnstats' batched
    # kstwo.sf against scipy's, which evaluates one test at a time.
    from scipy import stats as sps

    from attnstats.stats.kolmogorov import kolmogorov_sf

    with torch.no_grad(), attnstats.record(model) as rec:
        model(**batch)
    fits = [attnstats.lognormal_fit(r.probs(dtype=torch.float64), r.stats_mask()) for r in rec.records]
    d = torch.cat([f.ks_statistic.reshape(-1) for f in fits])  # [layers · B · H]
    n = torch.cat([f.n.reshape(-1) for f in fits])
    for name, fn in [("KS p-values, attnstats", lambda: kolmogorov_sf(d, n)),
                     ("KS p-values, scipy kstwo.sf", lambda: sps.kstwo.sf(d.numpy(), n.numpy()))]:
        med, lo, hi = median_s(fn, args.repeat)
        res["rows"][name] = {"median_s": med, "min_s": lo, "max_s": hi, "tests": int(d.numel())}
        print(f"{name:34s} {med * 1e3:9.1f} ms  (min {lo * 1e3:.1f}, max {hi * 1e3:.1f})  {d.numel()} tests", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
