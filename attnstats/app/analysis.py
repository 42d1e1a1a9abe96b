"""The main job: measure a model's attention over a corpus and write every statistic and the plots."""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import plot
from .files import atomic_path, save_figure, write_csv

__all__ = ["AnalysisInputError", "analyze_model"]

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


def analyze_model(model=None, texts=None, out="attnstats-out", *, alongside=("lln",), max_tokens: int = 128,
                  seed: int = 0, batch_size: int = 16, note=None, long: str = "truncate",
                  shard_size: int = 32, store: str = "qk", device=None, dtype=None) -> pd.DataFrame | None:
    """Capture the attention of a transformers encoder over a corpus and write its statistics.

    The documents run through the model ``batch_size`` sequences at a time, sorted by length within a
    shard of ``shard_size`` documents so that padding stays small, and the statistics of each sequence
    are computed on its own (pad tokens are neither queries nor keys). Shards are written as they
    finish (:mod:`attnstats.app.corpus_run`): a run stopped and started again with the same arguments
    skips them, and under ``torchrun`` the ranks share the shards and merge through torch.distributed.

    Args:
        model: a local model folder, or None for the packaged all-MiniLM-L6-v2. Code in the folder is
            never run (see :func:`attnstats.app.models.load_model`).
        texts: the documents; None for the Python documentation topics (79 documents,
            :func:`attnstats.app.corpus.documentation_corpus`).
        out: output folder; receives ``stats.csv`` (long format: ``call, layer, name, kernel, head,
            batch, metric, value``; each value the corpus mean of the per-sequence statistic, ``batch``
            empty), ``summary.csv`` and ``summary.parquet`` (per kernel, layer, head and metric: count,
            mean, variance, min, max, quantiles; :class:`attnstats.summary.CorpusSummary`),
            ``shards/`` (per-sequence statistics as Parquet), ``concentration.png`` (corpus means of
            entropy and spectral gap per layer × head, each kernel), ``distributions.png`` (per layer,
            the spread over sequences and heads) and ``lognormal.png`` (``ln P`` per layer, heads and
            sequences pooled, over the same entries as the log-normal metrics).
        alongside: kernels evaluated on the same q, k (see :func:`attnstats.kernels.get_kernel`).
            ``"softmax"`` is the captured attention itself, which is always there: it is dropped
            with a note rather than written twice.
        max_tokens: tokens per sequence at most: at most what the model takes
            (:func:`attnstats.app.models.model_max_tokens`).
        seed: of the ``ln P`` sample drawn for the histogram.
        batch_size: sequences per forward pass.
        note: callable receiving one-line messages for the user (truncated or split documents, a dropped
            kernel, skipped shards); None emits them as warnings.
        long: a document longer than ``max_tokens``: ``"truncate"`` keeps its first window, ``"split"``
            cuts it into consecutive windows of ``max_tokens`` tokens, each a sequence.
        shard_size: documents per shard (the unit of resuming and of the work of one process).
        store: ``"qk"`` (q, k kept per batch; kernels alongside; ``lognormal.png``) or ``"stats"``
            (statistics computed during the forward, :func:`attnstats.record` ``store="stats"``: for long
            sequences on a GPU; no kernels alongside and no pooled ``ln P`` figure).
        device: where the model runs (``"cuda"``, ``"cpu"``; default the CPU). Under ``torchrun``,
            ``"cuda"`` without an index is the rank's own GPU (``LOCAL_RANK``). ``"auto"``: loaded with
            ``device_map="auto"`` (accelerate), its layers over the GPUs there are, for a model larger
            than one GPU; each layer's statistics are computed on its own device.
        dtype: the model's dtype (``torch.bfloat16``, ``"bfloat16"``, …), or None to keep the loaded one.

    Returns:
        A summary per layer and kernel: mean entropy (nats), spectral gap, temperature and the
        log-normal sigma, averaged over heads (and sequences); None on a rank other than 0.

    Raises:
        AnalysisInputError: ``texts`` empty, ``max_tokens`` above what the model takes or too large for
            the dense statistics within the memory budget, a bad ``long`` or ``shard_size``, or a
            tokenizer that turns every word of ``texts`` into its unknown token.
        attnstats.app.corpus_run.RunMismatchError, ShardFileError: ``out`` holds a run with other
            arguments, or a damaged shard file.
        FileNotFoundError, attnstats.app.models.ModelFolderError: a model folder that cannot be used.
    """
    from .corpus import documentation_corpus
    from .corpus_run import RunSpec, fingerprint, read_sequences, run_corpus
    from .models import load_model, model_max_tokens
    from .progress import progress

    def tell(message: str) -> None:
        if note is None:
            warnings.warn(message, stacklevel=3)
        else:
            note(message)

    texts = list(texts) if texts is not None else documentation_corpus()
    if not texts:
        raise AnalysisInputError("texts", "expected at least one document")
    if not isinstance(max_tokens, int) or max_tokens < 2:
        raise AnalysisInputError("max_tokens", f"expected an int of at least 2, got {max_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise AnalysisInputError("batch_size", f"expected a positive int, got {batch_size!r}")
    if long not in ("truncate", "split"):
        raise AnalysisInputError("long", f"expected 'truncate' or 'split', got {long!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise AnalysisInputError("shard_size", f"expected a positive int, got {shard_size!r}")
    if store not in ("qk", "stats"):
        raise AnalysisInputError("store", f"expected 'qk' or 'stats', got {store!r}")
    kernels = _alongside_kernels(alongside, tell)
    if store == "stats" and kernels:
        raise AnalysisInputError("store", "store='stats' computes the statistics during the forward pass and runs "
                                          "no kernel alongside; pass no alongside kernel (--alongside with no name)")

    spread = device == "auto"  # the model over every GPU there is, by transformers' device_map
    try:
        device = torch.device("cpu" if spread or device is None else device)
    except RuntimeError:
        raise AnalysisInputError("device", f"expected a torch device such as 'cpu' or 'cuda', or 'auto', got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AnalysisInputError("device", "CUDA is not available here (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # torchrun: each rank on its own GPU
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype) or not getattr(torch, dtype).is_floating_point:
            raise AnalysisInputError("dtype", f"expected a float dtype such as 'bfloat16', got {dtype!r}")
        dtype = getattr(torch, dtype)
    if spread:
        net, tok = load_model(model, device_map="auto", dtype=dtype)
        device = next(net.parameters()).device  # the inputs go where the embeddings are
    else:
        net, tok = load_model(model)
        net = net.to(device) if dtype is None else net.to(device, dtype)
    label = Path(str(model)).resolve().name if model else "all-MiniLM-L6-v2"
    limit = model_max_tokens(net, tok)
    if limit is not None and max_tokens > limit:
        raise AnalysisInputError("max_tokens", f"{label} takes at most {limit} tokens per sequence "
                                               f"(tokenizer model_max_length / config max_position_embeddings), "
                                               f"got {max_tokens}")
    lengths = _token_counts(tok, texts, label)
    long_docs = [n for n in lengths if n > max_tokens]
    if long_docs:
        room = f"; --max-tokens up to {limit} keeps more per sequence" if limit is not None and limit > max_tokens else ""
        done = f"truncated to {max_tokens}" if long == "truncate" else f"split into windows of {max_tokens}"
        tell(f"{len(long_docs)} of {len(texts)} documents are longer than {max_tokens} tokens (the longest has "
             f"{max(long_docs)}) and were {done}{room}")
    if store == "qk":
        _check_dense_fits(net, min(max(lengths), max_tokens))
    names = tuple(k.name if hasattr(k, "name") else str(k) for k in kernels)
    spec = RunSpec(model=label, max_tokens=max_tokens, long=long, alongside=names, shard_size=shard_size,
                   batch_size=batch_size, seed=seed, documents=len(texts), fingerprint=fingerprint(texts),
                   store=store, device="auto" if spread else device.type,
                   dtype=str(next(net.parameters()).dtype).replace("torch.", ""))

    def process_shard(index: int, docs: list[str]):
        pooled = _PooledLogP(max_values=20_000, seed=seed * 1_000_003 + index) if store == "qk" else None
        return _run_shard(net, tok, kernels, docs, index * shard_size, max_tokens, long, batch_size, pooled, label,
                          store, device)

    with progress(total=len(texts), desc=f"analyze {label}", unit="doc") as bar:
        result = run_corpus(texts, spec, out, process_shard, bar=bar)
    if result is None:
        return None
    summary, pooleds, tokens, kept = result
    if kept:
        tell(f"resumed: {len(kept)} finished shard(s) of an earlier run in {out} were kept")
    pooled = pooleds[0]
    for other in pooleds[1:]:
        if pooled is not None:
            pooled.merge(other)

    out = Path(out)
    table = summary.to_frame()
    write_csv(table, out / "summary.csv")
    with atomic_path(out / "summary.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    # the figure of distributions reads the per-sequence rows of at most 32 shards, evenly spaced, so that
    # its memory does not grow with the corpus (the summary holds the whole corpus)
    sequences, read, shards = read_sequences(out, max_shards=32)
    frame = _corpus_means(table, sequences)
    write_csv(frame, out / "stats.csv")

    import matplotlib.pyplot as plt

    n_seq = summary.sequences
    fig = plot.layer_head_heatmaps(frame, title=f"{label}: corpus means per layer and head ({len(texts)} documents, "
                                                f"{n_seq} sequences, {tokens:,} tokens)")
    save_figure(fig, out / "concentration.png")
    plt.close(fig)

    part = f"{sequences[['doc', 'window']].drop_duplicates().shape[0]} sequences of {read} of {shards} shards" \
        if read < shards else f"{n_seq} sequences"
    fig = plot.metric_distributions(sequences, title=f"{label}: per-sequence values over the corpus ({part}), "
                                                     "all heads of each layer")
    save_figure(fig, out / "distributions.png")
    plt.close(fig)

    if pooled is not None:  # store="stats" keeps no ln P to pool
        fig = _lognormal_figure(pooled, frame, label, n_seq)
        save_figure(fig, out / "lognormal.png")
        plt.close(fig)

    keep = ["entropy", "spectral_gap", "temperature", "lognormal_sigma"]
    return (frame[frame.metric.isin(keep)].groupby(["layer", "kernel", "metric"]).value.mean()
            .unstack("metric").reindex(columns=keep))


def _sequences(tok, docs: list[str], first_doc: int, max_tokens: int, long: str):
    """``(doc, window, input_ids)`` of every sequence of ``docs``: one window per document, or all of them."""
    enc = tok(docs, truncation=True, max_length=max_tokens, return_overflowing_tokens=long == "split",
              verbose=False)
    ids = enc["input_ids"]
    owner = enc["overflow_to_sample_mapping"] if long == "split" else list(range(len(docs)))
    seqs, seen = [], {}
    for seq, d in zip(ids, owner):
        window = seen.get(d, 0)
        seen[d] = window + 1
        seqs.append((first_doc + int(d), window, seq))
    return seqs


def _run_shard(net, tok, kernels, docs, first_doc, max_tokens, long, batch_size, pooled, label, store="qk",
               device="cpu"):
    """One shard: its per-sequence frame, CorpusSummary, pooled ln P (None with store="stats") and token count."""
    from ..capture import record
    from ..metrics import record_metrics
    from ..summary import CorpusSummary

    seqs = _sequences(tok, docs, first_doc, max_tokens, long)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][2]))  # by length: a batch pads little
    frames, tokens = [], 0
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = tok.pad({"input_ids": [seqs[i][2] for i in chunk]}, return_tensors="pt").to(device)
        with torch.no_grad(), record(net, alongside=kernels, store=store) as rec:
            net(**batch)
        if not rec.records:
            raise AnalysisInputError("model", f"no attention was captured from {label}; attnstats analyze "
                                              f"needs a transformers model whose attention it can record")
        # softmax statistics of the whole batch at once (pad tokens are masked out of every one, the
        # numbers of each sequence alone); kernels alongside one sequence at a time, since their
        # constants come from statistics of the sequence's own q, k
        parts = [(r, "softmax", record_metrics(r)) for r in rec.records]
        for j, i in enumerate(chunk):
            if store == "qk":
                one = [_batch_element(r, j) for r in rec.records]
                for r in one:
                    parts += [(r, getattr(kn, "name", str(kn)), record_metrics(r, kernel=kn), j) for kn in rec.kernels]
                    pooled.add(r)
            tokens += len(seqs[i][2])
        frames.append(_sequence_rows(parts, [seqs[i] for i in chunk]))
        del rec, batch  # the q, k of this batch go before the next one is captured
    frame = pd.concat(frames, ignore_index=True)
    summary = CorpusSummary().add(frame.assign(batch=frame["doc"] * 1_000_000 + frame["window"]))
    return frame, summary, pooled, tokens


def _sequence_rows(parts, seqs) -> pd.DataFrame:
    """Rows ``doc, window, tokens, call, layer, name, kernel, head, metric, value`` of one batch.

    ``parts``: ``(record, kernel, {metric: [B, H]})`` for the whole batch, or ``(record, kernel,
    {metric: [1, H]}, j)`` for its sequence ``j``; ``seqs``: the batch's ``(doc, window, input_ids)``.
    """
    cols = {c: [] for c in ("doc", "window", "tokens", "call", "layer", "name", "kernel", "head", "metric", "value")}
    for part in parts:
        r, kernel, values = part[:3]
        rows = range(len(seqs)) if len(part) == 3 else [part[3]]
        for metric, v in values.items():
            for local, j in enumerate(rows):
                doc, window, ids = seqs[j]
                for h, x in enumerate(v[local].tolist()):
                    for c, val in zip(cols, (doc, window, len(ids), r.call, r.layer, r.name, kernel, h, metric, x)):
                        cols[c].append(val)
    return pd.DataFrame(cols)


def _corpus_means(table: pd.DataFrame, sequences: pd.DataFrame) -> pd.DataFrame:
    """stats.csv: the summary's exact corpus means, in the long format with ``call`` and ``name``."""
    names = sequences[["call", "layer", "name"]].drop_duplicates()
    frame = table.merge(names, on="layer", how="left")
    frame = frame.assign(batch=pd.array([pd.NA] * len(frame), dtype="Int64"), value=frame["mean"])
    frame["head"] = frame["head"].astype("Int64")
    return frame[["call", "layer", "name", "kernel", "head", "batch", "metric", "value"]].sort_values(
        ["call", "kernel", "head", "metric"], kind="stable").reset_index(drop=True)


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


class _PooledLogP:
    """``ln P`` of the softmax attention of every head and sequence, pooled per layer, over the entries the
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

    def merge(self, other: "_PooledLogP") -> None:
        """Add another shard's pooled values (Chan et al.'s merge; the sample keeps the smallest keys)."""
        for layer in other.count:
            n0, n = self.count.get(layer, 0), other.count[layer]
            mean0, m20 = self.mean.get(layer, 0.0), self.m2.get(layer, 0.0)
            delta = other.mean[layer] - mean0
            self.count[layer] = n0 + n
            self.mean[layer] = mean0 + delta * n / (n0 + n)
            self.m2[layer] = m20 + other.m2[layer] + delta**2 * n0 * n / (n0 + n)
            values, keys = other.sample[layer]
            if layer in self.sample:
                values, keys = torch.cat([self.sample[layer][0], values]), torch.cat([self.sample[layer][1], keys])
            if values.numel() > self.max_values:
                keep = torch.topk(keys, self.max_values, largest=False).indices
                values, keys = values[keep], keys[keep]
            self.sample[layer] = (values, keys)

    def __getstate__(self):  # a generator does not pickle; a stored shard draws no more keys
        state = dict(self.__dict__)
        state.pop("gen", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.gen = None

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
        ax.set_xlabel("ln P_ij (nats), all heads and sequences of the layer")
    heads = frame[frame.kernel == "softmax"]["head"].nunique()
    fig.suptitle(f"{label}: ln P of softmax attention, the {heads} heads × {n_sentences} sequences of each layer "
                 f"pooled (valid query rows and keys; histogram of a uniform sample of ≤ {pooled.max_values:,})\n"
                 f"pooled σ² = mean of the per-head, per-sequence σ² + variance of their means (weighted by "
                 f"entries), so it exceeds the summary's lognormal σ, which fits each head and sequence and "
                 f"averages the fits.", fontsize=9)
    return fig
