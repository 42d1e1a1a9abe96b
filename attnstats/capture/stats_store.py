"""``record(..., store="stats")``: statistics computed inside the forward pass, no q or k kept.

For each captured call, :func:`capture_stats` runs the streaming statistics of
:mod:`attnstats.stats.online` (online softmax over key blocks, never the N×N matrix) and keeps only
per-matrix numbers ``[B, H]``: mean row entropy, entry moments of ``P`` and ``ln P``, the log-normal fit
of sampled ``ln P`` values, and the spectral gap of self-attention: exact ``1 − max_{i≥1} P_ii`` with
``P_ii = exp(scale·q_i·k_i − LSE_i)`` when causal, else the matrix-free Arnoldi solver of
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
from .record import AttentionRecord

__all__ = ["CapturedStats", "capture_stats"]


@dataclasses.dataclass(frozen=True)
class CapturedStats:
    """Statistics of one attention call computed during the forward pass.

    Attributes:
        shape: ``(B, H, Nq, Nk)`` of the attention matrix that was never built.
        values: metric name (as in :data:`attnstats.metrics.METRIC_NAMES`) -> float64 tensor ``[B, H]``.
        max_samples, seed: of the log-normal fit's ``ln P`` sample.
    """

    shape: tuple
    values: dict
    max_samples: int = 100_000
    seed: int = 0

    def __contains__(self, name) -> bool:
        return name in self.values

    def __getitem__(self, name) -> torch.Tensor:
        return self.values[name]


def capture_stats(recorder, q, k, mask, causal, scale, bias, softcap, name, max_samples=100_000, seed=0, sinks=None):
    """Statistics of one call: ``q: [B, H, Nq, d]``, ``k: [B, H, Nk, d]``, canonical mask, and
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
        values = streaming_values(q, k, mask, causal, scale, recorder.stats_metrics, name, max_samples, seed,
                                  sinks=sinks)
    return CapturedStats(shape=(b, q.shape[1], q.shape[2], k.shape[2]), values=values, max_samples=max_samples, seed=seed)
