"""One captured attention call: :class:`AttentionRecord`, and the mask rules shared by every backend.

A record keeps what defines the attention matrix, not the matrix: queries and keys ``[B, H, N, d]``
(O(N·d)), the mask, the causal flag and the scale. :meth:`AttentionRecord.probs` rebuilds the dense
``[B, H, Nq, Nk]`` matrix on demand, under the memory budget of :mod:`attnstats.budget`. The one
exception is a *P-only* record (backend ``softmax``: attention a module computes by hand, whose q and k
cannot be recovered): it keeps the matrix ``p`` the module computed, and q = k = None.

Masks are normalised to one form for every backend: bool, True = attend, broadcastable to
``[B, H, Nq, Nk]``. A padding mask is kept as ``[B, 1, 1, Nk]`` and a causal pattern as
``is_causal=True`` (row ``i`` attends keys ``j ≤ i``), so that streaming statistics and linearised
kernels, which accept only key padding plus causality, can run on the record. Additive float masks are
split into a bool mask (entries at ``-inf`` or at most half the dtype's minimum, the value transformers
uses for "masked") and a finite ``bias`` (e.g. ALiBi), kept only when it is not all zero.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..budget import check_dense_fits
from ..masks import full_mask, is_key_padding, valid_parts
from ..validation import compute_dtype

__all__ = ["AttentionRecord", "normalize_mask", "expand_kv_heads", "to_4d", "valid_tokens"]


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionRecord:
    """The inputs of one attention call, captured from a model.

    Attributes:
        name: stable module path of the attention module, e.g. ``"encoder.layer.3.attention.self"``
            (``""`` when the call came from the root module or from no module of the model).
        layer: index of the attention module in the order modules were first called (the same module
            keeps its index over repeated forward passes).
        q: ``[B, H, Nq, d]`` queries, detached copy, dtype of the model (None with ``store="stats"`` and
            in a P-only record, see ``p``).
        k: ``[B, H, Nk, d]`` keys, grouped-query heads expanded to ``H`` (None where ``q`` is).
        mask: bool, True = attend, broadcastable to ``[B, H, Nq, Nk]``, or None (no mask besides
            ``is_causal``). Padding masks are ``[B, 1, 1, Nk]``.
        is_causal: row ``i`` attends only keys ``j ≤ i`` (top-left aligned, as in
            ``F.scaled_dot_product_attention``), on top of ``mask``.
        scale: the factor applied to ``q·k`` (``1/sqrt(d)`` unless the layer used another; NaN, unknown,
            in a P-only record).
        bias: float32 additive term broadcastable to ``[B, H, Nq, Nk]`` (e.g. ALiBi), or None.
        softcap: ``s → softcap·tanh(s/softcap)`` applied to the scaled scores before bias and mask, or None.
        backend: which backend captured it (``"sdpa"``, ``"hf"``, ``"mha"``, ``"module"``, ``"softmax"``).
        call: position in :attr:`Recorder.records`.
        sigma_q, sigma_k: ``[B, H]`` float64 standard deviations of the valid q and k entries (see
            :func:`attnstats.capture.head_sigmas`); the temperature is ``1/(sigma_q·sigma_k)``.
        stats: with ``store="stats"``, the statistics computed during the forward pass, else None.
        sinks: float32 ``[B|1, H|1, Nq|1]`` attention-sink logits, or None. Row ``i``'s softmax then runs
            over its valid keys plus one extra "sink" column of logit ``sinks[..., i]`` that attends to
            nothing (GPT-OSS, gpt-oss-style learned sinks); :meth:`probs` returns the key columns only,
            so each valid row sums to ``1 − p_sink``, exactly as the model weighs its values.
        p: float32 ``[B, H, Nq, Nk]`` attention probabilities captured directly, for calls whose q and k
            cannot be recovered (backend ``"softmax"``), else None. Such a *P-only* record has q = k =
            None (:attr:`has_qk` False); :meth:`probs` returns ``p`` (masked entries 0) and the
            statistics work from it, except the temperature (``sigma_q``, ``sigma_k`` are None),
            :meth:`scores` and kernels, which need q and k. ``mask`` and ``is_causal`` are those the
            layer applied, read from its scores.
    """

    name: str
    layer: int
    q: torch.Tensor | None
    k: torch.Tensor | None
    mask: torch.Tensor | None
    is_causal: bool
    scale: float
    bias: torch.Tensor | None = None
    softcap: float | None = None
    backend: str = "sdpa"
    call: int = 0
    sigma_q: torch.Tensor | None = None
    sigma_k: torch.Tensor | None = None
    stats: object | None = None
    sinks: torch.Tensor | None = None
    p: torch.Tensor | None = None

    def __repr__(self) -> str:
        b, h, nq, nk = self.shape
        mask = None if self.mask is None else tuple(self.mask.shape)
        return (
            f"AttentionRecord(name={self.name!r}, layer={self.layer}, shape=[B={b}, H={h}, Nq={nq}, Nk={nk}], "
            f"d={None if self.q is None else self.q.shape[-1]}, mask={mask}, is_causal={self.is_causal}, "
            f"scale={self.scale:.6g}, bias={self.bias is not None}, sinks={self.sinks is not None}, "
            f"backend={self.backend!r}, "
            f"store={'qk' if self.q is not None else 'p' if self.p is not None else 'stats'})"
        )

    @property
    def has_qk(self) -> bool:
        """Whether the record holds q and k (False with ``store="stats"`` and for a P-only record)."""
        return self.q is not None and self.k is not None

    def _device(self):
        return self.q.device if self.q is not None else self.p.device if self.p is not None else None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, Nq, Nk)`` of the attention matrix."""
        if self.q is None and self.p is not None:
            return tuple(self.p.shape)
        if self.q is None:
            return tuple(self.stats.shape)  # type: ignore[union-attr]  # store="stats"
        b = max(self.q.shape[0], self.k.shape[0])
        return (b, self.q.shape[1], self.q.shape[2], self.k.shape[2])

    def full_mask(self) -> torch.Tensor | None:
        """Bool ``[B, H, Nq, Nk]`` (expanded view) combining ``mask`` and ``is_causal``; None if neither."""
        return full_mask(self.mask, self.shape, self.is_causal, self._device())

    def scores(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[B, H, Nq, Nk]`` pre-softmax scores ``scale·q·kᵀ`` (+ softcap, + bias), masked entries ``-inf``.

        The key columns only: an attention sink (:attr:`sinks`) is one more logit per row, not a column here.
        """
        self._need_qk("scores()")
        b, h, nq, nk = self.shape
        dtype = dtype or compute_dtype(self.q)
        check_dense_fits((b, h, nq, nk), torch.finfo(dtype).bits // 8, f"record {self.name!r}: the scores")
        s = torch.matmul(self.q.to(dtype), self.k.to(dtype).transpose(-1, -2)) * self.scale
        s = s.expand(b, h, nq, nk)
        if self.softcap is not None:
            s = torch.tanh(s / self.softcap) * self.softcap
        if self.bias is not None:
            s = s + self.bias.to(dtype)
        m = self.full_mask()
        if m is not None:
            s = s.masked_fill(~m, -math.inf)
        return s

    def query_valid(self) -> torch.Tensor | None:
        """Bool ``[B, H, Nq]``: the query rows statistics use (see :func:`valid_tokens`), or None for all."""
        qv, _ = valid_tokens(self.mask, self.is_causal, self.shape, self._device())
        return None if bool(qv.all()) else qv

    def stats_mask(self) -> torch.Tensor | None:
        """Bool ``[B, H, Nq, Nk]``: :meth:`full_mask` without the rows of padded queries, or None.

        This is the mask every statistic of :meth:`Recorder.frame` uses: masked entries, rows with no
        valid key, and in self-attention with a key-padding mask the rows of pad tokens are absent.
        """
        m = self.full_mask()
        qv = self.query_valid()
        if qv is None:
            return m
        b, h, nq, nk = self.shape
        rows = qv[..., None].expand(b, h, nq, nk)
        return rows if m is None else m & rows

    def probs(self, kernel=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense attention ``[B, H, Nq, Nk]`` in float32, as the layer computed it (before dropout).

        Computed in float64 on the CPU (float32 on a GPU) and rounded to ``dtype`` (float32 unless
        asked otherwise). With :attr:`sinks`, the softmax runs over the keys plus the sink logit and the
        sink column is dropped: rows sum to ``1 − p_sink`` (< 1), as in the model. Masked entries are 0;
        a row with no valid key (e.g. a left-padding query under a causal mask) is all 0, and it is
        absent from every statistic. ``kernel``: a name or :class:`attnstats.kernels` kernel to evaluate
        on the same q, k (mask reduced to key padding + causality) instead of the captured softmax.
        A P-only record (:attr:`p`) returns ``p``, the softmax output the module computed, with masked
        entries and rows with no valid key set to 0 as above (a kernel needs q and k: ValueError).

        Raises:
            attnstats.DenseTooLargeError: if ``B·H·Nq·Nk`` numbers of the compute dtype (float64 on
                the CPU, float32 on a GPU) exceed the memory budget
                (default 2 GiB, :func:`attnstats.set_memory_budget`); use the streaming statistics then.
        """
        if self.p is not None and self.q is None:
            return self._probs_of_p(kernel, dtype)
        self._need_qk("probs()")
        b, h, nq, nk = self.shape
        # the largest tensor built is the scores in the compute dtype (float64 on the CPU), not the output
        nbytes = max(4, torch.finfo(dtype).bits // 8, torch.finfo(compute_dtype(self.q)).bits // 8)
        check_dense_fits((b, h, nq, nk), nbytes, f"record {self.name!r} (layer {self.layer}): the dense attention matrix")
        if kernel is not None:
            from ..metrics import kernel_probs

            return kernel_probs(self, kernel).to(dtype)
        s = self.scores()
        valid_row = torch.isfinite(s).any(-1, keepdim=True)
        s = s.masked_fill(~valid_row, 0.0)
        if self.sinks is not None:
            # the sink is one more softmax column that attends to nothing: normalise with it, then drop it
            sink = self.sinks.to(s.dtype).expand(b, h, nq)[..., None]
            p = torch.softmax(torch.cat([s, sink], dim=-1), dim=-1)[..., :nk]
        else:
            p = torch.softmax(s, dim=-1)
        return p.masked_fill(~valid_row, 0.0).to(dtype)

    def _probs_of_p(self, kernel, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`probs` of a P-only record: ``p`` in ``dtype``, entries outside :meth:`full_mask` 0."""
        if kernel is not None:
            self._need_qk("probs(kernel=...)")
        nbytes = max(4, torch.finfo(dtype).bits // 8)
        check_dense_fits(self.shape, nbytes, f"record {self.name!r} (layer {self.layer}): the dense attention matrix")
        m = self.full_mask()
        if m is None:
            return self.p.to(dtype, copy=True)
        # the model's own rows with no valid key are uniform (finfo.min everywhere) or NaN (-inf): 0 here
        return self.p.to(dtype).masked_fill(~m, 0.0)

    def _need_qk(self, what: str) -> None:
        if self.p is not None and (self.q is None or self.k is None):
            raise ValueError(
                f"record {self.name!r}: {what} needs q and k, but this record holds only P (backend {self.backend!r}: "
                f"its module computes softmax(scores) itself, and q, k cannot be recovered from P); probs() and "
                f"the statistics work from P"
            )
        if self.q is None or self.k is None:
            raise ValueError(
                f"record {self.name!r}: {what} needs q and k, but this record was captured with store='stats', "
                f"which keeps no q, k; use record(..., store='qk') to keep them"
            )


def to_4d(x: torch.Tensor, name: str) -> torch.Tensor:
    """``[..., N, d]`` as ``[B, H, N, d]``: missing leading dims become 1, extra ones fold into B."""
    if x.dim() < 2:
        raise ValueError(f"{name}: expected shape [..., N, d], got {tuple(x.shape)}")
    while x.dim() < 4:
        x = x.unsqueeze(0)
    if x.dim() > 4:
        x = x.reshape(-1, *x.shape[-3:])
    return x


def expand_kv_heads(k: torch.Tensor, heads: int, name: str = "key") -> torch.Tensor:
    """``k: [B, Hkv, N, d]`` with its heads repeated to ``heads`` (query head ``h`` uses kv head ``h // (heads/Hkv)``)."""
    hk = k.shape[1]
    if hk == heads:
        return k
    if heads % hk != 0:
        raise ValueError(f"{name}: {hk} key/value heads do not divide the {heads} query heads")
    return k.repeat_interleave(heads // hk, dim=1)


def valid_tokens(mask, is_causal: bool, shape, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which queries and keys of an attention call statistics use: ``(qv [B, H, Nq], kv [B, H, Nk])`` bool.

    Valid keys are those some query attends and valid queries rows with at least one valid key
    (:func:`attnstats.masks.valid_parts`); in self-attention with a key-padding mask (``Nq == Nk``,
    mask ``[..., 1, Nk]``) a query at a padded position is not valid either: BERT-style models let pad
    tokens attend, but a pad token is no query of interest. (A cross-attention whose query count
    happens to equal the key count would be misread by this rule; give it a full mask.)
    """
    qv, kv = valid_parts(mask, is_causal, shape, device)
    if mask is not None and is_key_padding(mask) and shape[-2] == shape[-1]:
        qv = qv & kv
    return qv, kv


def _mask_to_4d(m: torch.Tensor) -> torch.Tensor:
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.dim() > 4:
        m = m.reshape(-1, *m.shape[-3:])
    return m


def normalize_mask(attn_mask, is_causal: bool, nq: int, nk: int):
    """Split an SDPA-style ``attn_mask`` into ``(mask, bias, is_causal)`` in the record's canonical form.

    Args:
        attn_mask: None, bool (True = attend) or float additive, broadcastable to ``[B, H, Nq, Nk]``.
        is_causal: the causal flag of the call.

    Returns:
        ``mask``: bool ``[B|1, H|1, 1, Nk]`` for pure key padding, bool ``[B|1, H|1, Nq, Nk]`` otherwise,
        or None; ``bias``: finite float32 additive term or None; ``is_causal``: True when the call was
        causal or when ``attn_mask`` is exactly a causal pattern (times key padding), with ``Nq == Nk``.
    """
    if attn_mask is None:
        return None, None, bool(is_causal)
    m = _mask_to_4d(attn_mask.detach())
    bias = None
    if m.dtype != torch.bool:
        masked = torch.isneginf(m) | (m <= torch.finfo(m.dtype).min / 2)
        finite = m.masked_fill(masked, 0.0)
        if bool((finite != 0).any()):
            bias = finite.to(torch.float32).clone()
        m = ~masked
    if bool(m.all()):
        return None, bias, bool(is_causal)
    m = m.expand(*m.shape[:2], nq, nk)
    if m.shape[1] > 1 and bool((m == m[:, :1]).all()):
        m = m[:, :1]  # the same for every head
    last = m[..., -1:, :]
    if bool((m == last).all()):
        return last.clone(), bias, bool(is_causal)
    if nq == nk and not is_causal:
        tril = torch.ones((nq, nk), dtype=torch.bool, device=m.device).tril()
        if bool((m == (tril & last)).all()):
            return (None if bool(last.all()) else last.clone()), bias, True
    return m.clone(), bias, bool(is_causal)
