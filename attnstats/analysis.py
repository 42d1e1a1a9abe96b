"""The main job: capture a model's attention on sentences and write every statistic and the plots."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from . import plot
from .files import save_figure, write_csv

__all__ = ["analyze_model"]


def analyze_model(model=None, texts=None, out="attnstats-out", *, alongside=("lln",), max_tokens: int = 256,
                  seed: int = 0) -> pd.DataFrame:
    """Capture the attention of a transformers encoder on ``texts`` and write its statistics.

    Args:
        model: a local model folder, or None for the packaged all-MiniLM-L6-v2.
        texts: sentences (a padded batch); None for 8 sentences of the documentation text.
        out: output folder; receives ``stats.csv`` (long format: ``call, layer, name, kernel, head,
            batch, metric, value``, batch-averaged), ``concentration.png`` (entropy and spectral gap
            per layer × head, each kernel) and ``lognormal.png`` (``ln P`` per layer, normal fit).
        alongside: kernels evaluated on the same q, k (see :func:`attnstats.kernels.get_kernel`).
        max_tokens: sentences are truncated to this many tokens.

    Returns:
        A summary per layer and kernel: mean entropy (nats), spectral gap, temperature and the
        log-normal sigma, averaged over heads.
    """
    from .capture import record
    from .corpus import sentences
    from .lognormal import fit_log_values, log_entries
    from .models import load_model

    net, tok = load_model(model)
    texts = list(texts) if texts is not None else sentences(8, seed=seed)
    if not texts:
        raise ValueError("texts: expected at least one sentence")
    batch = tok(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    with torch.no_grad(), record(net, alongside=list(alongside or ())) as rec:
        net(**batch)
    frame = rec.frame()
    if "kernel" not in frame:
        frame.insert(3, "kernel", "softmax")
    out = Path(out)
    write_csv(frame, out / "stats.csv")

    import matplotlib.pyplot as plt

    fig = plot.layer_head_heatmaps(frame, title=f"{Path(str(model)).name if model else 'all-MiniLM-L6-v2'}: "
                                                f"concentration per layer and head ({len(texts)} sentences)")
    save_figure(fig, out / "concentration.png")
    plt.close(fig)

    samples, fits = [], []
    for r in rec.records:
        p = r.probs()
        mask = None if r.mask is None else r.mask.expand(p.shape)
        vals = torch.cat(log_entries(p, mask, max_samples=20_000, seed=seed)).numpy()
        fit = fit_log_values(vals)
        fits.append(dict(layer=r.layer, mu=fit.mu, sigma=fit.sigma))
        samples.append(pd.DataFrame(dict(layer=r.layer, value=vals)))
    fig = plot.log_histograms(pd.concat(samples), pd.DataFrame(fits))
    save_figure(fig, out / "lognormal.png")
    plt.close(fig)

    keep = ["entropy", "spectral_gap", "temperature", "lognormal_sigma"]
    summary = (frame[frame.metric.isin(keep)].groupby(["layer", "kernel", "metric"]).value.mean()
               .unstack("metric").reindex(columns=keep))
    return summary
