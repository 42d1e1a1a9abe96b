"""The one-pass reference: per-row accumulators of softmax attention from ``q`` and ``k``, no N×N matrix.

The public statistics built on it are in :mod:`attnstats.stats.qk`. All per-row statistics come
from one online-softmax pass over blocks of keys (docs/theory.md §5). For
row ``i`` and its valid keys ``j``, with ``s_ij = scale · q_i·k_j`` and a running maximum ``m_i``,
the pass keeps

    l_i = Σ e^{s−m},   t_i = Σ e^{s−m}·(s−m),   u_i = Σ e^{2(s−m)},   n_i, mean and M2 of s_ij

(rescaled whenever ``m_i`` grows), which give exactly

    LSE_i = m_i + ln l_i,   H_i = ln l_i − t_i / l_i,   Σ_j P_ij² = u_i / l_i²,
    ln P_ij = s_ij − LSE_i  (so the mean/variance of ln P over a row are those of s, shifted).

Memory is ``O(N·d + block²)`` per matrix. Two implementations compute the same thing: the PyTorch
path in this module (CPU and GPU, float64 on the CPU, float32 on a GPU) and a fused Triton kernel
(:mod:`attnstats.stats.online_triton`) used automatically on CUDA when Triton is installed.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from .dense import EntryMoments
from ..masks import broadcast_mask
from ..validation import check_finite, check_qk, compute_dtype

__all__ = ["RowAccumulators", "streaming_row_accumulators", "prepare_qk", "moments_from_rows", "matrix_moments"]


@dataclass(frozen=True)
class RowAccumulators:
    """Per-row results of the online pass, before they are turned into statistics (all ``[..., Nq]``).

    Attributes:
        lse: ``LSE_i`` (nats); NaN where ``count`` is 0.
        entropy: ``H_i`` (nats).
        sum_p2: ``Σ_j P_ij²``.
        count: valid keys of the row (int64).
        s_mean: mean of ``s_ij`` over the row's valid keys.
        s_m2: ``Σ_j (s_ij − s_mean_i)²`` over the row's valid keys.
    """

    lse: torch.Tensor
    entropy: torch.Tensor
    sum_p2: torch.Tensor
    count: torch.Tensor
    s_mean: torch.Tensor
    s_m2: torch.Tensor


# ----------------------------------------------------------------------------------------------
# input checks


def _finite_flag(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor on q's device, True when q and k hold no NaN or Inf (no device sync).

    One reduction per tensor instead of an N·d bool tensor; a finite tensor whose sum overflows
    gives False, which only sends the caller to the exact search.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.isfinite(torch.sum(q, dtype=acc) + torch.sum(k, dtype=acc).to(acc))


def _raise_if_not_finite(q: torch.Tensor, k: torch.Tensor, flag: torch.Tensor) -> None:
    if not bool(flag):
        check_finite(q, "q")
        check_finite(k, "k")


def prepare_qk(q, k, scale=None, mask=None, causal=False, check_values=True):
    """Check ``q, k`` (and ``mask``) and return them in the shapes every path uses.

    Args:
        q: ``[..., Hq, Nq, d]`` (or ``[Nq, d]``) queries, any float dtype.
        k: ``[..., Hk, Nk, d]`` keys. Batch dims broadcast against q's; with grouped-query attention
            (GQA) ``Hq`` is a multiple of ``Hk`` and query head ``h`` uses key head ``h // (Hq/Hk)``.
        scale: positive float, default ``1/sqrt(d)``.
        mask: bool, broadcastable to ``[..., Hq, Nq, Nk]``, True = attend, or None.
        causal: query ``i`` attends to keys ``j ≤ i`` only (needs ``Nq == Nk``).
        check_values: raise here if q or k holds NaN/Inf (False: the caller checks later, which
            spares a device sync before the work is queued).

    Returns:
        ``(q, k, scale, mask, batch)``: q ``[B, Hq, Nq, d]``, k ``[B, Hk, Nk, d]`` (views, expanded
        over broadcast batch dims), the scale as float, the mask as a ``[B, Hq, Nq|1, Nk]`` bool view
        (one row for key padding, :func:`attnstats.masks.is_key_padding`) or None, and the batch
        shape ``[..., Hq]`` of the results.
    """
    check_qk(q, k, causal)
    nq, nk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    # Heads: the dim before N, with GQA allowed; everything before it broadcasts.
    q4 = q.reshape(1, 1, nq, d) if q.dim() == 2 else q
    k4 = k.reshape(1, 1, nk, d) if k.dim() == 2 else k
    hq, hk = q4.shape[-3], k4.shape[-3]
    if hq != hk and hk != 1 and hq != 1 and hq % hk != 0:
        raise ValueError(
            f"q, k: {hq} query heads and {hk} key heads; expected equal counts, one of them 1, "
            f"or a query head count that is a multiple of the key head count (GQA)"
        )
    try:
        outer = torch.broadcast_shapes(q4.shape[:-3], k4.shape[:-3])
    except RuntimeError:
        raise ValueError(f"q, k: batch dims {tuple(q.shape[:-3])} and {tuple(k.shape[:-3])} do not broadcast") from None
    hq_out = max(hq, hk)
    if hk > hq:  # one query head against several key heads: broadcast the query
        q4 = q4.expand(*q4.shape[:-3], hk, nq, d)
        hq = hk
    qb = q4.expand(*outer, hq, nq, d).reshape(-1, hq, nq, d)
    kb = k4.expand(*outer, hk, nk, d).reshape(-1, hk, nk, d)
    batch = () if q.dim() == 2 and k.dim() == 2 else (*outer, hq_out)
    if check_values:
        _raise_if_not_finite(q, k, _finite_flag(q, k))
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a positive finite float, got {scale!r}")
    # Key padding ([..., 1, Nk], or a mask expanded from one) stays one row: O(N) instead of O(N²).
    m = broadcast_mask(mask, (*batch, nq, nk), keep_key_padding=True, device=q.device)  # [*batch, Nq|1, Nk]
    if m is not None:
        m = m.reshape(qb.shape[0], hq, m.shape[-2], nk)
    return qb, kb, float(scale), m, batch


# ----------------------------------------------------------------------------------------------
# the PyTorch path


def _block_valid(mask, causal, i0, i1, j0, j1, device):
    """Valid entries of the tile rows ``i0:i1`` × keys ``j0:j1`` (None when every entry is valid)."""
    valid = None
    if causal and j1 - 1 > i0:
        rows = torch.arange(i0, i1, device=device)[:, None]
        cols = torch.arange(j0, j1, device=device)[None, :]
        valid = cols <= rows
    if mask is not None:
        mt = mask[..., i0:i1, j0:j1] if mask.shape[-2] != 1 else mask[..., :, j0:j1]
        valid = mt if valid is None else (mt & valid)
    return valid


def _default_block(n_matrices: int, nq: int, nk: int, itemsize: int) -> int:
    # Tiles of about 32 MiB over all matrices at once: large enough that PyTorch's per-call
    # overhead vanishes, small enough to be O(block²) next to O(N·d).
    per = max(1, (32 * 1024**2) // (itemsize * max(1, n_matrices)))
    b = int(math.sqrt(per))
    b = max(16, 1 << (b.bit_length() - 1))
    return min(b, max(nq, nk))


def _torch_row_accumulators(q, k, scale, mask, causal, block=None) -> RowAccumulators:
    """The online pass in PyTorch on ``q [B, Hq, Nq, d]``, ``k [B, Hk, Nk, d]`` (see module doc).

    ``mask``: bool ``[B, Hq, Nq|1, Nk]`` or None, as :func:`prepare_qk` returns it. Query tiles of
    ``R`` rows meet key tiles of ``C`` keys (both ``block``); every per-row array is ``[B, Hq, R]``.
    """
    dt = compute_dtype(q)
    B, Hq, Nq, d = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    if Hk != Hq:  # GQA: query head h reads key head h // g (the repeat_kv layout)
        k = k.repeat_interleave(Hq // Hk, dim=1)  # [B, Hq, Nk, d]
    if block is None:
        block = _default_block(B * Hq, Nq, Nk, torch.finfo(dt).bits // 8)
    dev = q.device
    shape = (B, Hq)
    lse = torch.empty(*shape, Nq, dtype=dt, device=dev)  # [B, Hq, Nq]
    ent, sp2, s_mean, s_m2 = (torch.empty_like(lse) for _ in range(4))  # [B, Hq, Nq] each
    cnt = torch.empty(*shape, Nq, dtype=torch.int64, device=dev)  # [B, Hq, Nq]
    for i0 in range(0, Nq, block):
        i1 = min(Nq, i0 + block)
        qi = q[:, :, i0:i1].to(dt)  # [B, Hq, R, d]
        R = i1 - i0
        m = torch.full((*shape, R), -math.inf, dtype=dt, device=dev)  # [B, Hq, R] running max of s
        l, t, u, mean, m2 = (torch.zeros(*shape, R, dtype=dt, device=dev) for _ in range(5))  # [B, Hq, R] each
        n = torch.zeros(*shape, R, dtype=dt, device=dev)  # [B, Hq, R] valid keys so far
        jend = min(Nk, i1) if causal else Nk
        for j0 in range(0, jend, block):
            j1 = min(jend, j0 + block)
            s = (qi @ k[:, :, j0:j1].to(dt).transpose(-1, -2)) * scale  # [B, Hq, R, C]
            valid = _block_valid(mask, causal, i0, i1, j0, j1, dev)  # broadcastable to [B, Hq, R, C], or None
            if valid is None:
                nb = torch.full_like(n, j1 - j0)  # [B, Hq, R]
                s_valid = s  # [B, Hq, R, C]
                s_for_max = s  # [B, Hq, R, C]
            else:
                valid = valid.expand(s.shape)  # [B, Hq, R, C]
                nb = valid.sum(-1).to(dt)  # [B, Hq, R]
                s_valid = s.masked_fill(~valid, 0)  # [B, Hq, R, C]
                s_for_max = s.masked_fill(~valid, -math.inf)  # [B, Hq, R, C]
            m_new = torch.maximum(m, s_for_max.amax(-1))  # [B, Hq, R]
            m_use = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # [B, Hq, R]
            # Rescale what was accumulated against the old maximum (nothing to rescale if n == 0).
            seen = n > 0  # [B, Hq, R]
            alpha = torch.where(seen, torch.exp(m - m_use), torch.zeros_like(m))  # [B, Hq, R]
            delta = torch.where(seen, m - m_use, torch.zeros_like(m))  # [B, Hq, R]
            dlt = s - m_use[..., None]  # [B, Hq, R, C]
            e = torch.exp(s_for_max - m_use[..., None])  # [B, Hq, R, C], 0 on invalid entries
            if valid is not None:
                dlt = dlt.masked_fill(~valid, 0)  # [B, Hq, R, C]
            t = alpha * (t + delta * l) + (e * dlt).sum(-1)  # [B, Hq, R]
            l = alpha * l + e.sum(-1)  # [B, Hq, R]
            u = alpha * alpha * u + (e * e).sum(-1)  # [B, Hq, R]
            # Mean and M2 of s merged block by block (Chan et al.): no cancellation.
            nb_safe = nb.clamp_min(1)  # [B, Hq, R]
            bmean = s_valid.sum(-1) / nb_safe  # [B, Hq, R]
            dev_b = s - bmean[..., None]  # [B, Hq, R, C]
            if valid is not None:
                dev_b = dev_b.masked_fill(~valid, 0)  # [B, Hq, R, C]
            bm2 = (dev_b * dev_b).sum(-1)  # [B, Hq, R]
            tot = n + nb  # [B, Hq, R]
            tot_safe = tot.clamp_min(1)  # [B, Hq, R]
            diff = bmean - mean  # [B, Hq, R]
            mean = torch.where(nb > 0, mean + diff * nb / tot_safe, mean)  # [B, Hq, R]
            m2 = torch.where(nb > 0, m2 + bm2 + diff * diff * n * nb / tot_safe, m2)  # [B, Hq, R]
            n = tot  # [B, Hq, R]
            m = torch.where(nb > 0, m_use, m)  # [B, Hq, R]
        empty = n == 0  # [B, Hq, R]
        nan = torch.full_like(l, math.nan)  # [B, Hq, R]
        l_safe = torch.where(empty, torch.ones_like(l), l)  # [B, Hq, R]
        lse[..., i0:i1] = torch.where(empty, nan, m + torch.log(l_safe))  # [B, Hq, R]
        ent[..., i0:i1] = torch.where(empty, nan, torch.log(l_safe) - t / l_safe)  # [B, Hq, R]
        sp2[..., i0:i1] = torch.where(empty, nan, u / (l_safe * l_safe))  # [B, Hq, R]
        s_mean[..., i0:i1] = torch.where(empty, nan, mean)  # [B, Hq, R]
        s_m2[..., i0:i1] = torch.where(empty, nan, m2)  # [B, Hq, R]
        cnt[..., i0:i1] = n.round().to(torch.int64)  # [B, Hq, R]
    return RowAccumulators(lse=lse, entropy=ent, sum_p2=sp2, count=cnt, s_mean=s_mean, s_m2=s_m2)


# ----------------------------------------------------------------------------------------------
# from rows to matrices


def moments_from_rows(rows: RowAccumulators, mass: torch.Tensor | None = None) -> EntryMoments:
    """Per-matrix :class:`EntryMoments` from per-row accumulators ``[..., Nq]`` (float64).

    Rows are merged with the parallel-variance rule, so that no step subtracts two large numbers:
    ``Σ_j (P_ij − 1/n_i)² = Σ_j P_ij² − 1/n_i`` within a row, then the spread of row means.

    ``mass``: ``[..., Nq]`` row sums ``c_i`` of the key entries when the softmax had a column besides
    the keys (an attention sink: ``c_i = 1 −`` the sink's probability), or None for rows summing to 1.
    The key entries are then ``c_i·P_ij`` (``P`` the softmax over the keys alone, whose ``Σ P²`` the
    pass keeps), and ``rows.lse`` must be the normaliser over keys and sink, so that ``s − LSE`` is
    their logarithm.
    """
    n = rows.count.to(torch.float64)  # [..., Nq] valid keys per row
    has = n > 0  # [..., Nq]
    count = n.sum(-1)  # [...]
    zero = lambda x: torch.where(has, x.to(torch.float64), torch.zeros_like(n))  # noqa: E731 - [..., Nq] -> [..., Nq]
    inv_n = torch.where(has, 1.0 / n.clamp_min(1), torch.zeros_like(n))  # [..., Nq] row mean of P
    if mass is None:
        row_mean = inv_n  # [..., Nq]
        mean = has.to(torch.float64).sum(-1) / count  # [...]
        # Within-row spread of P around the row mean 1/n_i, then between rows.
        within_p = zero(rows.sum_p2 - inv_n).clamp_min(0).sum(-1)  # [...]
    else:
        c = zero(mass)  # [..., Nq]
        row_mean = c * inv_n  # [..., Nq]
        mean = c.sum(-1) / count  # [...]
        # Σ_j (c P_ij − c/n_i)² = c² (Σ_j P_ij² − 1/n_i)
        within_p = (c * c * zero(rows.sum_p2 - inv_n).clamp_min(0)).sum(-1)  # [...]
    between_p = (n * (row_mean - mean[..., None]) ** 2).sum(-1)  # [...]
    var = (within_p + between_p) / count  # [...]
    row_log_mean = zero(rows.s_mean - rows.lse)  # [..., Nq] mean of ln P over the row
    log_mean = (n * row_log_mean).sum(-1) / count  # [...]
    within_l = zero(rows.s_m2).sum(-1)  # [...]
    between_l = (n * (row_log_mean - log_mean[..., None]) ** 2).sum(-1)  # [...]
    log_var = (within_l + between_l) / count  # [...]
    return EntryMoments(
        mean=mean,
        var=var,
        log_mean=log_mean,
        log_var=log_var,
        count=count.round().to(torch.int64),
        zero_count=torch.zeros_like(count, dtype=torch.int64),
    )


def matrix_moments(rows: RowAccumulators) -> EntryMoments:
    """:func:`moments_from_rows` (no sink), in one Triton launch where the rows are float32 on a GPU with
    Triton (:func:`attnstats.stats.online_triton.row_moments`); the reference elsewhere."""
    if rows.lse.is_cuda and rows.lse.dtype == torch.float32:
        from . import online_triton as streaming_triton

        if streaming_triton.available():
            mean, var, log_mean, log_var, count = streaming_triton.row_moments(
                rows.count, rows.sum_p2, rows.lse, rows.s_mean, rows.s_m2).unbind(0)
            count = count.round().to(torch.int64)
            return EntryMoments(mean=mean, var=var, log_mean=log_mean, log_var=log_var, count=count,
                                zero_count=torch.zeros_like(count))
    return moments_from_rows(rows)


def _use_triton(q: torch.Tensor, mask) -> bool:
    if q.device.type != "cuda" or q.dtype == torch.float64 or q.shape[-1] not in (16, 32, 64, 128, 256):
        return False  # float64 stays float64 (PyTorch path); odd head dims have no Triton tile
    if mask is not None and mask.shape[-2] != 1:
        return False  # full [Nq, Nk] masks stay on the PyTorch path; key-padding masks are fused
    from . import online_triton as streaming_triton

    return streaming_triton.available()


def streaming_row_accumulators(q, k, *, scale=None, mask=None, causal=False, backend="auto", block_size=None):
    """The per-row pass behind :func:`streaming_stats`; returns ``(RowAccumulators, batch, backend)``."""
    rows, batch, backend, finite = _row_pass(q, k, scale, mask, causal, backend, block_size)
    _raise_if_not_finite(q, k, finite)
    return rows, batch, backend


def _row_pass(q, k, scale, mask, causal, backend, block_size):
    """The pass, with the finiteness flag of q, k still on the device (read it before trusting rows)."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
    qb, kb, scale, m, batch = prepare_qk(q, k, scale, mask, causal, check_values=False)
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size: expected a positive int or None, got {block_size!r}")
    # Queue the finiteness reduction now and read it after the pass is queued: one sync, at the end.
    finite = _finite_flag(q, k)
    chosen = backend
    if backend == "auto":
        backend = "triton" if _use_triton(qb, m) else "torch"
    if backend == "triton":
        from . import online_triton as streaming_triton

        if m is not None and m.shape[-2] != 1:
            raise ValueError(
                "mask: the Triton path takes a key-padding mask of shape [..., 1, Nk]; "
                f"got a full mask with {m.shape[-2]} rows (use backend='torch')"
            )
        try:
            fields = streaming_triton.row_accumulators(qb, kb, scale, m, causal)
            return RowAccumulators(*fields), batch, backend, finite
        except Exception as err:  # a GPU or Triton version the kernel does not compile for
            if chosen != "auto":
                raise
            warnings.warn(
                f"streaming_stats: the Triton kernel failed ({type(err).__name__}: {str(err)[:200]}); "
                "using the PyTorch path instead",
                RuntimeWarning,
                stacklevel=3,
            )
            backend = "torch"
    rows = _torch_row_accumulators(qb, kb, scale, m, causal, block_size)
    return rows, batch, backend, finite


def _reshape_rows(rows: RowAccumulators, batch) -> RowAccumulators:
    nq = rows.lse.shape[-1]
    return RowAccumulators(**{f: getattr(rows, f).reshape(*batch, nq) for f in RowAccumulators.__dataclass_fields__})
