"""``record(..., store="stats")``: statistics computed inside the forward pass, no q or k kept.

For each captured call, :func:`capture_stats` runs the streaming statistics of
:mod:`attnstats.stats.online` (online softmax over key blocks, never the N×N matrix) and keeps only
per-matrix numbers ``[B, H]``: mean row entropy, entry moments of ``P`` and ``ln P``, the log-normal fit
of sampled ``ln P`` values, and the spectral gap of self-attention: exact ``1 − max_{i≥1} P_ii`` with
``P_ii = exp(scale·q_i·k_i − LSE_i)`` when causal, else the matrix-free solvers of
:func:`attnstats.spectral_gap_from_qk` (matrix-vector products are attention with ``V = x``).
Extra memory is ``O(N)`` per layer. :func:`attnstats.metrics.streaming_values` is the computation itself; ``rec.frame()``
also uses it on the kept q, k of large ``store="qk"`` records (:func:`attnstats.metrics.uses_streaming`).
Short calls (:func:`attnstats.metrics.is_short`: fewer than ``STREAMING_FROM_TOKENS`` tokens, and the
dense matrices of the call within the memory budget) take the dense statistics of the whole batch at
once instead, the same numbers at a fraction of the cost (measured in ``benchmarks/RESULTS.md``), and
then also accept layers with an attention bias or softcap.

Pad tokens are removed as in the dense path (:func:`attnstats.capture.record.valid_tokens`): in
self-attention with a key-padding mask, each batch element is compacted to its valid tokens first
(order kept, so causality is unchanged), which is exact and needs no mask at all.
"""
from __future__ import annotations

import dataclasses

import torch

from ..metrics import gives_every_metric, is_short, record_metrics, streaming_values, warn_no_gap
from .record import AttentionRecord, expand_kv_heads

__all__ = ["CapturedStats", "capture_stats", "finish_pending"]


@dataclasses.dataclass(frozen=True)
class CapturedStats:
    """Statistics of one attention call computed during the forward pass.

    Attributes:
        shape: ``(B, H, Nq, Nk)`` of the attention matrix that was never built.
        values: metric name (as in :data:`attnstats.metrics.METRIC_NAMES`) -> float64 tensor ``[B, H]``.
        max_samples, seed: of the log-normal fit's ``ln P`` sample.
        pending: a :class:`attnstats.metrics.PendingStats` until :func:`finish_pending` has read it
            (the checks and the log-normal fit left for after the forward), else None.
    """

    shape: tuple
    values: dict
    max_samples: int = 100_000
    seed: int = 0
    pending: object = None

    def __contains__(self, name) -> bool:
        return name in self.values

    def __getitem__(self, name) -> torch.Tensor:
        return self.values[name]


def capture_stats(recorder, q, k, mask, causal, scale, bias, softcap, name, max_samples=100_000, seed=0, sinks=None):
    """Statistics of one call: ``q: [B, H, Nq, d]``, ``k: [B, H, Nk, d]`` (or grouped key heads ``[B, H/g,
    Nk, d]`` without a mask), canonical mask, and
    attention-sink logits broadcastable to ``[B, H, Nq]`` or None (the sink counts as one more key).

    A short call (:func:`attnstats.metrics.is_short`) gets the dense statistics of its whole batch at
    once, as ``frame()`` computes them for a kept q, k (bias and softcap included); a long one the
    streaming statistics, one batch element at a time. Both give the same numbers.
    """
    b = max(q.shape[0], k.shape[0])
    groups = [g for g in recorder.stats_metrics if g != "temperature"]
    rec = AttentionRecord(name=name, layer=0, q=q, k=k, mask=mask, is_causal=causal, scale=scale, bias=bias,
                          softcap=softcap, sinks=sinks)
    if is_short(rec):
        if k.shape[1] != q.shape[1]:  # the dense statistics take one key head per query head
            rec = dataclasses.replace(rec, k=expand_kv_heads(k, q.shape[1]))
        if "spectral_gap" in groups and not gives_every_metric(mask, q.shape[2], k.shape[2]):
            groups.remove("spectral_gap")  # as the streaming path: the gap of a general mask is left out
            warn_no_gap(name)
        values = record_metrics(rec, groups, max_samples=max_samples, seed=seed) if groups else {}
    else:
        if bias is not None or softcap is not None:
            raise ValueError(
                f"record(store='stats'): layer {name!r} adds an attention bias or softcap, which the streaming "
                f"statistics do not model; use store='qk' for this model"
            )
        values, pending = streaming_values(q, k, mask, causal, scale, recorder.stats_metrics, name, max_samples, seed,
                                           sinks=sinks, defer=True)
        return CapturedStats(shape=(b, q.shape[1], q.shape[2], k.shape[2]), values=values, max_samples=max_samples,
                             seed=seed, pending=pending)
    return CapturedStats(shape=(b, q.shape[1], q.shape[2], k.shape[2]), values=values, max_samples=max_samples, seed=seed)


def finish_pending(records) -> None:
    """Finish what the forward pass left pending in ``store="stats"`` records, for all of them at once.

    During the forward nothing waits for the device: here the finiteness flags of every long call
    are read together, with the KS p-values of every layer's log-normal fits (made during the forward,
    :func:`attnstats.stats.lognormal.fit_log_values_batched`'s computation), computed at once; the fits
    are written into each record's values. Records already finished are skipped.

    Raises:
        ValueError: naming the first layer whose q or k held a NaN or Inf (its statistics would be NaN).
    """
    import warnings

    from ..metrics import lognormal_fields
    from ..stats.lognormal import LogNormalFit, fit_to_host, ks_pvalues

    todo = [r for r in records if r.stats is not None and getattr(r.stats, "pending", None) is not None
            and not r.stats.pending.done]
    if not todo:
        return
    # The fits were made during the forward; their KS p-values, the only step that reads the device, are
    # computed here for all layers at once, and the finiteness flags read with them.
    flags = [(r, f) for r in todo for f in r.stats.pending.finite]
    ok = torch.stack([f.to(flags[0][1].device) for _, f in flags]) if flags else None
    fitted = [r for r in todo if r.stats.pending.fits]
    fit = None
    if fitted:
        parts = [f for r in fitted for f in r.stats.pending.fits]
        dev = parts[0][0].mu.device

        def cat(name):
            return torch.cat([getattr(f, name).to(dev) for f, _ in parts])

        bad = torch.cat([b.to(dev) for _, b in parts])  # [Σ B·H]
        # a NaN in q or k gives fits of NaN scores, discarded below with the error
        fit = LogNormalFit(**{name: cat(name) for name in LogNormalFit.__dataclass_fields__ if name != "ks_pvalue"},
                           ks_pvalue=ks_pvalues(cat("ks_statistic"), cat("n"), bad))
    if ok is not None and not bool(ok.all()):
        culprit = flags[int((~ok).nonzero()[0, 0])][0]
        for r in todo:
            r.stats.pending.done = True
        raise ValueError(f"record(store='stats'): layer {culprit.name!r}: q or k holds NaN or Inf; its statistics "
                         "would be NaN")
    if fit is not None:
        fit, bad = fit_to_host(fit, bad)
        fields = lognormal_fields(fit)
        row = 0
        for r in fitted:
            bsz, heads = r.stats.pending.shape
            part = slice(row, row + bsz * heads)
            for name, value in fields.items():
                r.stats.values[name] = value[part].reshape(bsz, heads)
            for i in bad[part].nonzero().reshape(-1).tolist():
                warnings.warn(
                    f"lognormal_fit: record {r.name!r}, matrix (batch, head) = {divmod(i, heads)}: fewer than 3 "
                    "distinct values; its fit is NaN (a normal fit needs 3 distinct values)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            row += bsz * heads
    for r in todo:
        r.stats.pending.done = True
        r.stats.pending.fits, r.stats.pending.finite = [], []
