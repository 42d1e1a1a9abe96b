"""Statistics of softmax attention from ``q`` and ``k`` alone: the public streaming API.

:func:`streaming_stats` gives row entropy, ``LSE``, ``Σ P²`` and the entry moments of a matrix from
one online-softmax pass (:mod:`attnstats.stats.online`, or its fused Triton twin on CUDA);
:func:`sample_log_probs` draws ``ln P_ij = s_ij − LSE_i`` at the entries the dense log-normal fit
takes, and :func:`streaming_lognormal_fit` fits them. Memory is ``O(N·d + block²)`` per matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import cuda_graphs
from ..masks import causal_mask, is_key_padding, no_valid_entry
from .dense import EntryMoments
from . import online_triton
from .online import _raise_if_not_finite, _reshape_rows, _row_pass, matrix_moments, prepare_qk, streaming_row_accumulators

__all__ = ["StreamingStats", "streaming_stats", "streaming_stats_unchecked", "sample_log_probs", "streaming_lognormal_fit"]


@dataclass(frozen=True)
class StreamingStats:
    """Statistics of the softmax attention of ``q, k``, computed without the N×N matrix.

    Row fields are ``[..., Nq]`` (the broadcast batch shape of q and k, then queries), in the
    compute dtype (float64 on the CPU, float32 on a GPU); a row with no valid key is NaN.

    Attributes:
        entropy: ``H_i = −Σ_j P_ij ln P_ij`` in nats (as :func:`attnstats.row_entropy`).
        lse: ``LSE_i = ln Σ_j exp(s_ij)``, the log of the softmax normaliser.
        sum_p2: ``Σ_j P_ij²`` (the inverse of the row's effective number of keys).
        row_count: ``[..., Nq]`` int64, valid keys per row.
        entry_moments: :class:`attnstats.EntryMoments` per matrix (fields ``[...]``, float64), as
            :func:`attnstats.entry_moments` gives for the dense matrix. ``ln P = s − LSE`` is exact
            here, so no entry underflows and ``zero_count`` is 0.
        backend: ``"torch"`` or ``"triton"``, the path that computed the pass.
    """

    entropy: torch.Tensor
    lse: torch.Tensor
    sum_p2: torch.Tensor
    row_count: torch.Tensor
    entry_moments: EntryMoments
    backend: str


def streaming_stats(q, k, *, scale=None, mask=None, causal=False, backend="auto", block_size=None) -> StreamingStats:
    """Row entropy, LSE, ``Σ P²`` and entry moments of ``softmax(scale · q kᵀ)`` without building it.

    Args:
        q: ``[..., Hq, Nq, d]`` queries (any float dtype; computed in float64 on the CPU, float32 on
            a GPU).
        k: ``[..., Hk, Nk, d]`` keys; batch dims broadcast, and ``Hq`` may be a multiple of ``Hk``
            (grouped-query attention: query head ``h`` uses key head ``h // (Hq/Hk)``).
        scale: positive logit scale, default ``1/sqrt(d)``.
        mask: bool, broadcastable to ``[..., Hq, Nq, Nk]``, True = attend. A key-padding mask
            ``[..., 1, Nk]`` costs ``O(N)``; a full ``[..., Nq, Nk]`` mask is read tile by tile.
        causal: query ``i`` attends to keys ``j ≤ i`` (with ``mask``, both apply).
        backend: ``"auto"`` (the Triton kernel on CUDA when Triton imports, else PyTorch),
            ``"torch"`` or ``"triton"``.
        block_size: tile edge of the PyTorch path (default: tiles of about 32 MiB).

    Returns:
        :class:`StreamingStats`; memory ``O(N·d + block²)``, time ``O(N²·d)``. On a GPU without a mask,
        the second and later calls of one shape replay the pass as a CUDA graph (the same numbers;
        :mod:`attnstats.cuda_graphs`).

    Example:
        >>> q, k = torch.randn(2, 4, 1024, 64), torch.randn(2, 4, 1024, 64)
        >>> st = streaming_stats(q, k, causal=True)
        >>> st.entropy.shape, st.entry_moments.log_var.shape
        (torch.Size([2, 4, 1024]), torch.Size([2, 4]))
    """
    if (mask is None and block_size is None and isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
            and q.is_cuda and k.is_cuda):
        st, finite = _replayed(q, k, scale, causal, backend)
    else:
        st, finite = streaming_stats_unchecked(q, k, scale=scale, mask=mask, causal=causal, backend=backend,
                                               block_size=block_size)
    # Checks that need the device are read last, so that all the work is queued before one sync.
    _raise_if_not_finite(q, k, finite)
    rows = st.row_count
    if mask is not None and bool((rows.reshape(-1, rows.shape[-1]).sum(-1) == 0).any()):
        raise no_valid_entry((rows.sum(-1) == 0).nonzero()[0].tolist())
    return st


def _replayed(q, k, scale, causal, backend):
    """:func:`streaming_stats_unchecked` without a mask on a GPU, replayed as one CUDA graph from the second
    call of a shape on (:data:`attnstats.cuda_graphs.SHARED`): at a few thousand tokens the pass's launches
    and their Python take the host longer than the kernels take the GPU. The outputs come packed in three
    tensors (rows, row counts, moments and the finiteness flag) to be copied out of the graph."""
    def packed(q, k):
        st, finite = streaming_stats_unchecked(q, k, scale=scale, causal=causal, backend=backend)
        m = st.entry_moments
        rows = torch.stack([st.entropy, st.lse, st.sum_p2])  # [3, ..., Nq]
        per_matrix = torch.stack([m.mean, m.var, m.log_mean, m.log_var, m.count.to(m.mean.dtype),
                                  m.zero_count.to(m.mean.dtype), finite.to(m.mean.dtype).expand_as(m.mean)])
        return rows, st.row_count, per_matrix, st.backend

    rows, count, per_matrix, used = cuda_graphs.SHARED(("streaming_stats", scale, causal, backend), packed, q, k)
    entropy, lse, sum_p2 = rows.unbind(0)
    mean, var, log_mean, log_var, n, zeros, finite = per_matrix.unbind(0)
    moments = EntryMoments(mean=mean, var=var, log_mean=log_mean, log_var=log_var, count=n.to(torch.int64),
                           zero_count=zeros.to(torch.int64))
    flag = finite.reshape(-1)[0] == 1.0 if finite.numel() else torch.ones((), dtype=torch.bool, device=q.device)
    return StreamingStats(entropy=entropy, lse=lse, sum_p2=sum_p2, row_count=count, entry_moments=moments,
                          backend=used), flag


def streaming_stats_unchecked(q, k, *, scale=None, mask=None, causal=False, backend="auto", block_size=None):
    """:func:`streaming_stats` without the checks that read the device: ``(StreamingStats, finite)``.

    ``finite`` is a 0-d bool tensor on q's device, False when q or k holds a NaN or Inf (the statistics
    are then not to be trusted). Nothing here waits for the device, so a caller inside a forward pass
    (``record(..., store="stats")``) reads ``finite`` later, once for many calls. A matrix with no valid
    entry is not detected here either (its rows are NaN).
    """
    rows, batch, used, finite = _row_pass(q, k, scale, mask, causal, backend, block_size)
    rows = _reshape_rows(rows, batch)
    moments = matrix_moments(rows)
    return StreamingStats(
        entropy=rows.entropy,
        lse=rows.lse,
        sum_p2=rows.sum_p2,
        row_count=rows.count,
        entry_moments=moments,
        backend=used,
    ), finite


# ----------------------------------------------------------------------------------------------
# samples of ln P for the log-normal fit


def _triangle_index(f: torch.Tensor):
    """Row and column of flat index ``f`` into the lower triangle ``j ≤ i`` enumerated row by row."""
    i = torch.floor((torch.sqrt(8.0 * f.double() + 1.0) - 1.0) / 2.0).to(torch.int64)
    # float64 rounding can put i one off near row boundaries: correct it exactly in integers.
    i = torch.where(i * (i + 1) // 2 > f, i - 1, i)
    i = torch.where((i + 1) * (i + 2) // 2 <= f, i + 1, i)
    return i, f - i * (i + 1) // 2


def _valid_count(mask_bh, nq: int, nk: int, causal: bool) -> int:
    """Number of valid entries of one matrix (``mask_bh``: ``[Nq or 1, Nk]`` bool or None)."""
    if mask_bh is None:
        return nq * (nq + 1) // 2 if causal else nq * nk
    if is_key_padding(mask_bh):
        keys = mask_bh[0]
        return int(keys.long().cumsum(0)[:nq].sum()) if causal else nq * int(keys.sum())
    return sum(int(blk.sum()) for blk in _mask_row_blocks(mask_bh, causal))


_CHUNK = 1 << 22  # mask entries handled at once when a full mask is read


def _mask_row_blocks(mask_bh, causal: bool):
    """A full mask ``[Nq, Nk]`` (with the causal rule) as consecutive blocks of rows of about ``_CHUNK`` entries."""
    nq, nk = mask_bh.shape
    step = max(1, _CHUNK // nk)
    for r0 in range(0, nq, step):
        blk = mask_bh[r0 : r0 + step]
        if causal:
            blk = blk & causal_mask(blk.shape[0], nk, blk.device, row0=r0)
        yield blk


def _entries_of_ranks(ranks, mask_bh, nq: int, nk: int, causal: bool):
    """Row and column of the valid entries with the given ranks (sorted) in row-major order.

    The enumeration is that of the dense matrix: ``P[valid]`` lists the valid entries row by row.
    """
    if mask_bh is None:
        return _triangle_index(ranks) if causal else (ranks // nk, ranks % nk)
    if is_key_padding(mask_bh):  # row i's valid keys are the first cnt_i valid key positions
        keys = torch.nonzero(mask_bh[0], as_tuple=False)[:, 0]
        if not causal:
            return ranks // keys.numel(), keys[ranks % keys.numel()]
        cnt = torch.searchsorted(keys, torch.arange(nq), right=True)  # valid keys j <= i
        ends = cnt.cumsum(0)
        i = torch.searchsorted(ends, ranks, right=True)
        return i, keys[ranks - (ends[i] - cnt[i])]
    rows, cols, base, r0 = [], [], 0, 0
    for blk in _mask_row_blocks(mask_bh, causal):
        flat = torch.nonzero(blk.reshape(-1), as_tuple=False)[:, 0]  # this block's valid entries, in order
        lo, hi = torch.searchsorted(ranks, torch.tensor([base, base + flat.numel()])).tolist()
        f = flat[ranks[lo:hi] - base]
        rows.append(r0 + f // nk)
        cols.append(f % nk)
        base += flat.numel()
        r0 += blk.shape[0]
    return torch.cat(rows), torch.cat(cols)


def sample_log_probs(
    q, k, *, scale=None, mask=None, causal=False, lse=None, max_samples=100_000, seed=0, first_matrix=0
):
    """Values of ``ln P_ij = s_ij − LSE_i`` at valid entries, one 1-d float64 tensor per matrix.

    The same entries as :func:`attnstats.stats.lognormal.log_entries` takes from the dense matrix: the valid
    entries of each matrix enumerated in row-major order; all of them where there are at most
    ``max_samples``; beyond that, those at the ranks :func:`attnstats.stats.sampling.sample_ranks`
    draws for ``seed`` and the matrix's flat batch index plus ``first_matrix``, in row-major order.
    Only the sampled entries are computed: ``O(max_samples·d)`` memory, whatever N.

    Args:
        q, k, scale, mask, causal: as :func:`streaming_stats`.
        lse: ``[..., Nq]`` row log-normalisers if already known (e.g. ``streaming_stats(...).lse``),
            else computed by one streaming pass.
        max_samples: values per matrix at most (int ≥ 3).
        seed: seed of the sample (int ≥ 0).
        first_matrix: flat batch index of this call's first matrix in a larger batch that the caller
            splits (``record(..., store="stats")`` passes one batch element at a time), so that each
            matrix gets the sample it has in the whole batch.

    Returns:
        A list over the flattened batch ``[...]`` of float64 CPU tensors.

    Raises:
        ValueError: if a matrix has no valid entry (naming its batch index).
    """
    table, counts = log_prob_table(q, k, scale, mask, causal, lse, max_samples, seed, first_matrix)
    table, counts = table.cpu().to(torch.float64), counts.cpu()
    return [row[: int(c)] for row, c in zip(table, counts)]


def log_prob_table(q, k, scale, mask, causal, lse, max_samples, seed, first_matrix, check_values=True):
    """:func:`sample_log_probs` as ``(values [M, W], counts [M] int64)`` on q's device: row ``t`` holds
    matrix ``t``'s values in its first ``counts[t]`` entries (NaN after them). The values are float64,
    or float32 where the fused sampler subtracts a float32 LSE (a GPU's; comment in the body).
    ``check_values=False`` leaves the finiteness of q, k to a caller that reads it later."""
    from .sampling import check_sampling, sample_ranks

    check_sampling(max_samples, seed)
    if isinstance(first_matrix, bool) or not isinstance(first_matrix, int) or first_matrix < 0:
        raise ValueError(f"first_matrix: expected an int >= 0, got {first_matrix!r}")
    qb, kb, scale, m, batch = prepare_qk(q, k, scale, mask, causal, check_values=check_values)
    B, Hq, Nq, d = qb.shape
    Nk = kb.shape[2]
    M = B * Hq
    dev = qb.device
    if lse is not None and (not isinstance(lse, torch.Tensor) or lse.shape != (*batch, Nq)):
        raise ValueError(f"lse: expected a tensor of shape {(*batch, Nq)}, got {getattr(lse, 'shape', type(lse))}")
    masks, counts = [], []
    for t in range(M if m is not None else 0):
        mask_bh = m[t // Hq, t % Hq].cpu()
        count = _valid_count(mask_bh, Nq, Nk, causal)
        if count == 0:
            where = tuple(int(x) for x in torch.unravel_index(torch.tensor(t), tuple(batch))) if batch else ()
            raise no_valid_entry(where)
        masks.append(mask_bh)
        counts.append(count)
    if m is None:  # every matrix has the same valid entries: one draw for all of them, on the device
        counts = [_valid_count(None, Nq, Nk, causal)] * M
    if lse is None:
        rows, _, _ = streaming_row_accumulators(qb, kb, scale=scale, mask=m, causal=causal)
        lse_b = rows.lse
    else:
        lse_b = lse.reshape(B, Hq, Nq)
    width = min(max(counts, default=0), max_samples)
    fused = dev.type == "cuda" and online_triton.available()
    # A float32 LSE (the GPU's streaming pass) leaves each value an error of about its float32 rounding
    # (~5e-7 at |ln P| ~ 10): the fused sampler then stores them as float32, which loses nothing they
    # hold and lets the fit sort 32-bit keys (32 rows of 100,000: 0.33 against 0.58 ms on an H100,
    # benchmarks/RESULTS.md §6). The fit itself sums in float64.
    out_dtype = torch.float32 if lse_b.dtype == torch.float32 else torch.float64
    if fused and m is None and counts[0] > max_samples:  # one launch draws the entries and scores them
        out = online_triton.sampled_log_probs(qb, kb, lse_b, None, None, scale, dtype=out_dtype,
                                              draw=(counts[0], max_samples, seed, first_matrix, causal))
        return out, torch.full((M,), max_samples, dtype=torch.int64, device=dev)  # no host copy: no sync
    cnt = torch.tensor([min(c, max_samples) for c in counts], dtype=torch.int64, device=dev)
    if m is None:
        ranks = sample_ranks(counts[0], max_samples, seed, torch.arange(first_matrix, first_matrix + M, device=dev))
        i, j = _entries_of_ranks(ranks, None, Nq, Nk, causal)  # [M, W] row and column of each sampled entry
    else:
        i = torch.zeros((M, width), dtype=torch.int64, device=dev)  # [M, W] row of each sampled entry
        j = torch.zeros((M, width), dtype=torch.int64, device=dev)  # [M, W] its column
        for t, (mask_bh, count) in enumerate(zip(masks, counts)):
            ranks = sample_ranks(count, max_samples, seed, first_matrix + t)
            it, jt = _entries_of_ranks(ranks, mask_bh, Nq, Nk, causal)
            i[t, : it.numel()], j[t, : jt.numel()] = it.to(dev), jt.to(dev)
    if fused:
        out = online_triton.sampled_log_probs(qb, kb, lse_b, i, j, scale, dtype=out_dtype)  # no gathered rows
    else:
        out = sampled_scores_reference(qb, kb, lse_b, i, j, scale)
    out.masked_fill_(torch.arange(width, device=dev)[None, :] >= cnt[:, None], float("nan"))
    return out, cnt


def sampled_scores_reference(q, k, lse, i, j, scale) -> torch.Tensor:
    """The PyTorch twin of :func:`attnstats.stats.online_triton.sampled_log_probs` (same arguments):
    ``[B·Hq, S]`` float64 ``scale·q_i·k_j − LSE_i``, the sampled rows gathered about 256 MiB at a time."""
    B, Hq, Nq, d = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    m, width = i.shape
    t_idx = torch.arange(m, device=q.device)
    kv_idx = (t_idx // Hq) * Hk + (t_idx % Hq) // (Hq // Hk)  # [M] key head of each matrix
    qf, kf, lse_f = q.reshape(m, Nq, d), k.reshape(B * Hk, Nk, d), lse.reshape(m, Nq)
    out = torch.empty((m, width), dtype=torch.float64, device=q.device)
    chunk = max(1, (256 << 20) // max(1, width * d * 8 * 2))
    for t0 in range(0, m, chunk):
        t1 = min(m, t0 + chunk)
        ii, jj = i[t0:t1], j[t0:t1]  # [c, W]
        qi = qf[t_idx[t0:t1, None], ii].double()  # [c, W, d]
        kj = kf[kv_idx[t0:t1, None], jj].double()  # [c, W, d]
        out[t0:t1] = (qi * kj).sum(-1) * scale - lse_f[t_idx[t0:t1, None], ii].double()
    return out


def streaming_lognormal_fit(
    q, k, *, scale=None, mask=None, causal=False, lse=None, max_samples=100_000, seed=0, first_matrix=0
):
    """Log-normal fit of the entries of ``softmax(scale · q kᵀ)`` per matrix, without the matrix.

    Args: as :func:`sample_log_probs`.

    Returns:
        :class:`attnstats.LogNormalFit` with float64 tensor fields of the batch shape ``[...]``
        (``n`` int64), each what :func:`attnstats.stats.lognormal.fit_log_values` gives on that
        matrix's sample (NaN, with a warning, where fewer than 3 distinct values exist). On the same
        entries as :func:`attnstats.lognormal_fit` of the dense matrix, so the two agree to float
        rounding. Sampled and fitted for all matrices at once on q's device.
    """
    from .lognormal import _fits_with_warnings

    _, _, _, _, batch = prepare_qk(q, k, scale, None, causal)
    table, counts = log_prob_table(q, k, scale, mask, causal, lse, max_samples, seed, first_matrix)
    # the sampler's own table of checked q, k and its own LSE needs no host-side checks; a given lse does
    return _fits_with_warnings(table, counts, batch, trusted=lse is None)
