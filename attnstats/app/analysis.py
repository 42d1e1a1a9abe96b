"""The main job: capture a model's attention on sentences and write every statistic and the plots."""
from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import plot
from .files import save_figure, write_csv

__all__ = ["AnalysisInputError", "analyze_model"]

_GROUP = ["call", "layer", "name", "kernel", "head", "metric"]  # a stats.csv row, over sentences
_BYTES_PER_ENTRY = 8  # the dense statistics build P in float64 on the CPU


class AnalysisInputError(ValueError):
    """An argument of :func:`analyze_model` it cannot run on.

    Attributes:
        argument: the argument's name (``"max_tokens"``, ``"model"``, ``"texts"``).
        detail: what is wrong and what was expected.
    """

    def __init__(self, argument: str, detail: str):
        self.argument, self.detail = argument, detail
        super().__init__(f"{argument}: {detail}")


def analyze_model(model=None, texts=None, out="attnstats-out", *, alongside=("lln",), max_tokens: int = 256,
                  seed: int = 0, batch_size: int = 16, note=None) -> pd.DataFrame:
    """Capture the attention of a transformers encoder on ``texts`` and write its statistics.

    Sentences run through the model ``batch_size`` at a time, sorted by length so that padding stays
    small, and the statistics of each sentence are computed on its own (pad tokens are neither
    queries nor keys), so memory is bounded by one batch and the numbers equal those of one forward
    pass per sentence up to float rounding.

    Args:
        model: a local model folder, or None for the packaged all-MiniLM-L6-v2. Code in the folder is
            never run (see :func:`attnstats.app.models.load_model`).
        texts: sentences; None for 8 sentences of the documentation text.
        out: output folder; receives ``stats.csv`` (long format: ``call, layer, name, kernel, head,
            batch, metric, value``; every value is the mean over sentences of the per-sentence
            statistic, ``batch`` empty), ``concentration.png`` (entropy and spectral gap per layer ×
            head, each kernel) and ``lognormal.png`` (``ln P`` per layer, heads and sentences pooled,
            over the same entries as the log-normal metrics of ``stats.csv``).
        alongside: kernels evaluated on the same q, k (see :func:`attnstats.kernels.get_kernel`).
            ``"softmax"`` is the captured attention itself, which is always there: it is dropped
            with a note rather than written twice.
        max_tokens: sentences longer than this many tokens are truncated (with a note); at most
            what the model takes (:func:`attnstats.app.models.model_max_tokens`).
        seed: of the default sentences and of the ``ln P`` sample drawn for the histogram.
        batch_size: sentences per forward pass.
        note: callable receiving one-line messages for the user (truncated sentences, a dropped
            kernel); None emits them as warnings.

    Returns:
        A summary per layer and kernel: mean entropy (nats), spectral gap, temperature and the
        log-normal sigma, averaged over heads (and sentences).

    Raises:
        AnalysisInputError: ``texts`` empty, ``max_tokens`` above what the model takes or too large for
            the dense statistics within the memory budget, or a tokenizer that turns every word of
            ``texts`` into its unknown token.
        FileNotFoundError, attnstats.app.models.ModelFolderError: a model folder that cannot be used.
    """
    from ..capture import record
    from .corpus import sentences
    from ..frame import records_frame
    from .models import load_model, model_max_tokens
    from .progress import progress

    def tell(message: str) -> None:
        if note is None:
            warnings.warn(message, stacklevel=3)
        else:
            note(message)

    texts = list(texts) if texts is not None else sentences(8, seed=seed)
    if not texts:
        raise AnalysisInputError("texts", "expected at least one sentence")
    if not isinstance(max_tokens, int) or max_tokens < 2:
        raise AnalysisInputError("max_tokens", f"expected an int of at least 2, got {max_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise AnalysisInputError("batch_size", f"expected a positive int, got {batch_size!r}")
    kernels = _alongside_kernels(alongside, tell)

    net, tok = load_model(model)
    label = Path(str(model)).resolve().name if model else "all-MiniLM-L6-v2"
    limit = model_max_tokens(net, tok)
    if limit is not None and max_tokens > limit:
        raise AnalysisInputError("max_tokens", f"{label} takes at most {limit} tokens per sentence "
                                               f"(tokenizer model_max_length / config max_position_embeddings), "
                                               f"got {max_tokens}")
    lengths = _token_counts(tok, texts, label)
    long = [n for n in lengths if n > max_tokens]
    if long:
        room = f"; --max-tokens up to {limit} keeps more" if limit is not None and limit > max_tokens else ""
        tell(f"{len(long)} of {len(texts)} sentences are longer than {max_tokens} tokens (the longest has "
             f"{max(long)}) and were truncated to {max_tokens}{room}")
    _check_dense_fits(net, min(max(lengths), max_tokens))

    # sort by length so a batch pads little; frames keep each sentence's original index
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    frames, pooled = [], _PooledLogP(max_values=20_000, seed=seed)
    with progress(total=len(texts), desc=f"analyze {label}", unit="sentence") as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = tok([texts[i] for i in chunk], padding=True, truncation=True, max_length=max_tokens,
                        return_tensors="pt")
            with torch.no_grad(), record(net, alongside=kernels) as rec:
                net(**batch)
            if not rec.records:
                raise AnalysisInputError("model", f"no attention was captured from {label}; attnstats analyze "
                                                  f"needs a transformers model whose attention it can record")
            for j, index in enumerate(chunk):
                one = [_batch_element(r, j) for r in rec.records]
                f = records_frame(one, kernels=rec.kernels, batch="each")
                if "kernel" not in f:
                    f.insert(3, "kernel", "softmax")
                f["batch"] = index
                frames.append(f)
                for r in one:
                    pooled.add(r)
                bar.update(1)
            del rec, batch  # the q, k of this batch go before the next one is captured

    frame = _mean_over_sentences(pd.concat(frames, ignore_index=True))
    out = Path(out)
    write_csv(frame, out / "stats.csv")

    import matplotlib.pyplot as plt

    fig = plot.layer_head_heatmaps(frame, title=f"{label}: concentration per layer and head ({len(texts)} sentences)")
    save_figure(fig, out / "concentration.png")
    plt.close(fig)

    fig = _lognormal_figure(pooled, frame, label, len(texts))
    save_figure(fig, out / "lognormal.png")
    plt.close(fig)

    keep = ["entropy", "spectral_gap", "temperature", "lognormal_sigma"]
    summary = (frame[frame.metric.isin(keep)].groupby(["layer", "kernel", "metric"]).value.mean()
               .unstack("metric").reindex(columns=keep))
    return summary


def _alongside_kernels(alongside, tell) -> list:
    """``alongside`` without repeats and without ``"softmax"``, which the captured attention already is."""
    kernels = []
    for k in alongside or ():
        if (k.name if hasattr(k, "name") else k) == "softmax":
            tell("--alongside softmax: the captured attention is softmax attention, always in stats.csv "
                 "as kernel 'softmax'; it is not run a second time")
            continue
        if k not in kernels:
            kernels.append(k)
    return kernels


def _token_counts(tok, texts, label: str) -> list[int]:
    """Tokens per sentence, untruncated and with special tokens; refuses a tokenizer that knows no word."""
    ids = tok(texts, truncation=False, verbose=False)["input_ids"]
    unk = getattr(tok, "unk_token_id", None)
    if unk is not None:
        special = set(tok.all_special_ids)
        words = [t for seq in ids for t in seq if t not in special or t == unk]
        if words and all(t == unk for t in words):
            raise AnalysisInputError(
                "model", f"the tokenizer of {label} turns every word into its unknown token "
                         f"{tok.unk_token!r} ({len(tok)} tokens known): the folder's tokenizer files are "
                         f"missing or do not belong to the model")
    return [len(seq) for seq in ids]


def _check_dense_fits(net, tokens: int) -> None:
    """Refuse before any work when one sentence's dense attention ``[H, N, N]`` is over the budget."""
    from ..budget import DenseTooLargeError, check_dense_fits, get_memory_budget

    heads = getattr(getattr(net, "config", None), "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        return  # unknown: the check when the matrix is built still guards the memory
    try:
        check_dense_fits((1, heads, tokens, tokens), _BYTES_PER_ENTRY, "the dense attention of one sentence")
    except DenseTooLargeError:
        fits = math.isqrt(get_memory_budget() // (heads * _BYTES_PER_ENTRY))
        raise AnalysisInputError(
            "max_tokens", f"a sentence of {tokens} tokens needs {heads}×{tokens}×{tokens} float64 attention "
                          f"entries per layer ({_size(heads * tokens**2 * _BYTES_PER_ENTRY)}), more than the "
                          f"memory budget of {_size(get_memory_budget())}; use at most {fits} tokens") from None


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} bytes"


def _batch_element(rec, j: int):
    """Record ``rec`` reduced to batch element ``j`` (``B = 1``), as if the sentence had run alone.

    A self-attention record with a key-padding mask loses its pad positions too (queries, keys and
    the mask), so that statistics of the whole q, k tensor, such as LLN's moment-matching α and β,
    see the sentence's tokens only. Other masks are kept as they are; the statistics leave their
    masked entries out either way.
    """
    b, _, nq, nk = rec.shape

    def pick(t, dims: int):
        # tensors that broadcast over the batch (leading size 1) stay as they are
        return t[j:j + 1] if isinstance(t, torch.Tensor) and t.dim() == dims and t.shape[0] == b else t

    one = dataclasses.replace(rec, q=pick(rec.q, 4), k=pick(rec.k, 4), mask=pick(rec.mask, 4),
                              bias=pick(rec.bias, 4), sigma_q=pick(rec.sigma_q, 2), sigma_k=pick(rec.sigma_k, 2))
    m = one.mask
    if m is None or nq != nk or m.shape[-2] != 1:
        return one
    columns = m.reshape(-1, nk)
    tokens = columns.all(0)
    if not torch.equal(tokens, columns.any(0)) or bool(tokens.all()) or not bool(tokens.any()):
        return one  # heads that disagree on the padding, or nothing to remove
    keep = tokens.nonzero().squeeze(1)
    bias = one.bias
    if bias is not None:
        bias = bias.index_select(-1, keep) if bias.shape[-1] == nk else bias
        bias = bias.index_select(-2, keep) if bias.shape[-2] == nq else bias
    return dataclasses.replace(one, q=one.q.index_select(2, keep), k=one.k.index_select(2, keep), mask=None,
                               bias=bias)


def _mean_over_sentences(each: pd.DataFrame) -> pd.DataFrame:
    """Per-sentence rows (``batch`` = sentence) → one row per (record, kernel, head, metric), the mean over
    sentences leaving NaN out, as ``rec.frame(batch="mean")`` averages a batch."""
    mean = each.groupby(_GROUP, sort=False, dropna=False).value.mean().reset_index()
    mean.insert(5, "batch", pd.array([pd.NA] * len(mean), dtype="Int64"))
    mean["head"] = mean["head"].astype("Int64")
    return mean[["call", "layer", "name", "kernel", "head", "batch", "metric", "value"]]


class _PooledLogP:
    """``ln P`` of the softmax attention of every head and sentence, pooled per layer, over the entries the
    log-normal metrics use (:meth:`AttentionRecord.stats_mask`; exact zeros have no log and are left out).

    Keeps per layer the exact count, mean and variance of all values (merged batch by batch) and a
    uniform sample of ``max_values`` of them for the histogram (the smallest of independent uniform
    keys, which stays uniform when batches are merged).
    """

    def __init__(self, max_values: int, seed: int):
        self.max_values = max_values
        self.gen = torch.Generator().manual_seed(seed)
        self.count: dict[int, int] = {}
        self.mean: dict[int, float] = {}
        self.m2: dict[int, float] = {}  # sum of squared deviations from the mean
        self.sample: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def add(self, rec) -> None:
        from ..stats.lognormal import log_entries

        p = rec.probs(dtype=torch.float64)
        values = torch.cat(log_entries(p, rec.stats_mask(), max_samples=max(3, p[0, 0].numel())))
        if values.numel() == 0:
            return
        layer, n = rec.layer, values.numel()
        mean, m2 = float(values.mean()), float(((values - values.mean()) ** 2).sum())
        n0, mean0, m20 = self.count.get(layer, 0), self.mean.get(layer, 0.0), self.m2.get(layer, 0.0)
        delta = mean - mean0  # Chan et al.: merge two (count, mean, M2) without revisiting the values
        self.count[layer] = n0 + n
        self.mean[layer] = mean0 + delta * n / (n0 + n)
        self.m2[layer] = m20 + m2 + delta**2 * n0 * n / (n0 + n)
        keys = torch.rand(n, generator=self.gen, dtype=torch.float64)
        if layer in self.sample:
            old_values, old_keys = self.sample[layer]
            values, keys = torch.cat([old_values, values]), torch.cat([old_keys, keys])
        if values.numel() > self.max_values:
            keep = torch.topk(keys, self.max_values, largest=False).indices
            values, keys = values[keep], keys[keep]
        self.sample[layer] = (values, keys)

    def sigma(self, layer: int) -> float:
        return math.sqrt(self.m2[layer] / self.count[layer])  # maximum likelihood, as lognormal_fit


def _lognormal_figure(pooled: _PooledLogP, frame: pd.DataFrame, label: str, n_sentences: int):
    """Histograms of pooled ``ln P`` per layer, titled with the pooled fit and the mean per-head σ."""
    layers = sorted(pooled.count)
    samples = pd.concat([pd.DataFrame(dict(layer=layer, value=pooled.sample[layer][0].numpy())) for layer in layers])
    fits = pd.DataFrame([dict(layer=layer, mu=pooled.mean[layer], sigma=pooled.sigma(layer)) for layer in layers])
    fig = plot.log_histograms(samples, fits)
    sigma = frame[(frame.kernel == "softmax") & (frame.metric == "lognormal_sigma")]
    per_head = sigma.groupby("layer").value.mean()  # as the printed summary: heads of the sentence-mean
    for ax, layer in zip(fig.axes, layers):
        ax.set_title(f"layer {layer}: pooled σ = {pooled.sigma(layer):.3g} over {pooled.count[layer]:,} entries\n"
                     f"mean per-head σ = {per_head.get(layer, np.nan):.3g} (summary, stats.csv)", fontsize=9)
        ax.set_xlabel("ln P_ij (nats), all heads and sentences of the layer")
    heads = frame[frame.kernel == "softmax"]["head"].nunique()
    fig.suptitle(f"{label}: ln P of softmax attention, the {heads} heads × {n_sentences} sentences of each layer "
                 f"pooled (valid query rows and keys; histogram of a uniform sample of ≤ {pooled.max_values:,})\n"
                 f"pooled σ² = mean of the per-head, per-sentence σ² + variance of their means (weighted by "
                 f"entries), so it exceeds the summary's lognormal σ, which fits each head and sentence and "
                 f"averages the fits.", fontsize=9)
    return fig
