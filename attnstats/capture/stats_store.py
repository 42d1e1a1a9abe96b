"""``record(..., store="stats")``: statistics computed inside the forward pass, no q or k kept.

For each captured call, :func:`capture_stats` runs the streaming statistics of
:mod:`attnstats.streaming` (online softmax over key blocks, never the N×N matrix) and keeps only
per-matrix numbers ``[B, H]``: mean row entropy, entry moments of ``P`` and ``ln P``, the log-normal fit
of sampled ``ln P`` values, and the spectral gap of self-attention: exact ``1 − max_{i≥1} P_ii`` with
``P_ii = exp(scale·q_i·k_i − LSE_i)`` when causal, else the matrix-free Arnoldi solver of
:func:`attnstats.eigen.spectral_gap_from_qk` (matrix-vector products are attention with ``V = x``).
Extra memory is ``O(N)`` per layer. :func:`streaming_values` is the computation itself; ``rec.frame()``
also uses it on the kept q, k of large ``store="qk"`` records (:func:`attnstats.frame.uses_streaming`).

Pad tokens are removed as in the dense path (:func:`attnstats.capture.record.valid_tokens`): in
self-attention with a key-padding mask, each batch element is compacted to its valid tokens first
(order kept, so causality is unchanged), which is exact and needs no mask at all.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

__all__ = ["CapturedStats", "capture_stats", "streaming_values", "gives_every_metric"]


@dataclasses.dataclass(frozen=True)
class CapturedStats:
    """Statistics of one attention call computed during the forward pass.

    Attributes:
        shape: ``(B, H, Nq, Nk)`` of the attention matrix that was never built.
        values: metric name (as in :mod:`attnstats.frame`) -> float64 tensor ``[B, H]``.
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


def _gap(q, k, scale, causal, lse):
    """Spectral gap of one self-attention ``[1, H, N, d]`` without the matrix."""
    from ..spectral import causal_spectral_gap

    if causal:  # lower-triangular: the eigenvalues are the diagonal P_ii = exp(s_ii - LSE_i)
        diag_s = (q.double() * k.double()).sum(-1) * scale
        return causal_spectral_gap(torch.exp(diag_s - lse.double()))
    from ..eigen import spectral_gap_from_qk

    return spectral_gap_from_qk(q, k, scale=scale, causal=False).gap


def gives_every_metric(mask, nq: int, nk: int) -> bool:
    """Whether the streaming statistics of a call give every metric the dense path gives.

    They do without a mask, with key padding shared by the heads (pad tokens are compacted away), and
    in cross-attention with key padding (no spectral gap either way). Another mask leaves the spectral
    gap out, and a per-head key padding in self-attention would keep pad tokens as queries.
    """
    if mask is None:
        return True
    return mask.shape[-2] == 1 and (mask.shape[1] == 1 or nq != nk)


def streaming_values(q, k, mask, causal, scale, groups, name, max_samples=100_000, seed=0) -> dict:
    """Statistics of one call from ``q: [B, H, Nq, d]``, ``k: [B, H, Nk, d]``, canonical mask, no N×N matrix.

    Args:
        groups: metric groups of :mod:`attnstats.frame` to compute (``"temperature"`` is ignored).
        name: the layer, for the warning when a mask leaves the spectral gap out.
        max_samples, seed: of the log-normal fit (the sample of matrix ``(b, h)`` is that of
            :func:`attnstats.lognormal_fit` on the dense batch: same entries).

    Returns:
        metric name -> float64 CPU tensor ``[B, H]``, equal to what the dense statistics give on the
        record's :meth:`~attnstats.capture.AttentionRecord.stats_mask`.
    """
    from ..frame import lognormal_fields, moment_fields
    from ..streaming import streaming_lognormal_fit, streaming_stats

    b = max(q.shape[0], k.shape[0])
    h, nq, nk = q.shape[1], q.shape[2], k.shape[2]
    q = q.expand(b, *q.shape[1:])
    k = k.expand(b, *k.shape[1:])
    keypad = mask is not None and mask.shape[-2] == 1
    compact = keypad and nq == nk and mask.shape[1] == 1
    per_batch: list[dict] = []
    for bi in range(b):
        qb, kb = q[bi : bi + 1], k[bi : bi + 1]
        m = None if mask is None else mask[bi : bi + 1] if mask.shape[0] > 1 else mask
        if compact:
            idx = torch.nonzero(m[0, 0, 0], as_tuple=False)[:, 0]
            qb, kb, m = qb[:, :, idx], kb[:, :, idx], None
        st = streaming_stats(qb, kb, scale=scale, mask=m, causal=causal)
        vals = {}
        if "entropy" in groups:
            ok = ~torch.isnan(st.entropy)
            vals["entropy"] = torch.where(ok, st.entropy, torch.zeros_like(st.entropy)).sum(-1) / ok.sum(-1)
        if "moments" in groups:
            vals.update(moment_fields(st.entry_moments))
        square_self = m is None and qb.shape[2] == kb.shape[2]  # pad tokens compacted away, or none
        if "spectral_gap" in groups and square_self:
            vals["spectral_gap"] = _gap(qb, kb, scale, causal, st.lse)
        elif "spectral_gap" in groups and bi == 0:
            warnings.warn(
                f"record(store='stats'): layer {name!r} has a mask that is not key padding (+ causal) or is "
                "cross-attention; its spectral gap is not computed without the matrix (use store='qk')",
                RuntimeWarning,
                stacklevel=3,
            )
        if "lognormal" in groups:
            # matrix (bi, h) of the whole batch: the dense fit draws its sample from the same generator
            fit = streaming_lognormal_fit(
                qb, kb, scale=scale, mask=m, causal=causal, lse=st.lse, max_samples=max_samples, seed=seed,
                first_matrix=bi * h,
            )
            vals.update(lognormal_fields(fit))
        per_batch.append({key: v.detach().to("cpu", torch.float64).reshape(1, h) for key, v in vals.items()})
    return {key: torch.cat([pb[key] for pb in per_batch]) for key in per_batch[0]} if per_batch else {}


def capture_stats(recorder, q, k, mask, causal, scale, bias, softcap, name, max_samples=100_000, seed=0):
    """Streaming statistics of one call: ``q: [B, H, Nq, d]``, ``k: [B, H, Nk, d]``, canonical mask."""
    if bias is not None or softcap is not None:
        raise ValueError(
            f"record(store='stats'): layer {name!r} adds an attention bias or softcap, which the streaming "
            f"statistics do not model; use store='qk' for this model"
        )
    values = streaming_values(q, k, mask, causal, scale, recorder.stats_metrics, name, max_samples, seed)
    b = max(q.shape[0], k.shape[0])
    return CapturedStats(shape=(b, q.shape[1], q.shape[2], k.shape[2]), values=values, max_samples=max_samples, seed=seed)
