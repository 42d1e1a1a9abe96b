"""Statistics of softmax attention from ``q`` and ``k`` alone: the public streaming API.

:func:`streaming_stats` gives row entropy, ``LSE``, ``Σ P²`` and the entry moments of a matrix from
one online-softmax pass (:mod:`attnstats.stats.online`, or its fused Triton twin on CUDA);
:func:`sample_log_probs` draws ``ln P_ij = s_ij − LSE_i`` at the entries the dense log-normal fit
takes, and :func:`streaming_lognormal_fit` fits them. Memory is ``O(N·d + block²)`` per matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..masks import causal_mask, is_key_padding, no_valid_entry
from .dense import EntryMoments
from .online import _raise_if_not_finite, _reshape_rows, _row_pass, moments_from_rows, prepare_qk, streaming_row_accumulators

__all__ = ["StreamingStats", "streaming_stats", "sample_log_probs", "streaming_lognormal_fit"]


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
        :class:`StreamingStats`; memory ``O(N·d + block²)``, time ``O(N²·d)``.

    Example:
        >>> q, k = torch.randn(2, 4, 1024, 64), torch.randn(2, 4, 1024, 64)
        >>> st = streaming_stats(q, k, causal=True)
        >>> st.entropy.shape, st.entry_moments.log_var.shape
        (torch.Size([2, 4, 1024]), torch.Size([2, 4]))
    """
    rows, batch, used, finite = _row_pass(q, k, scale, mask, causal, backend, block_size)
    rows = _reshape_rows(rows, batch)
    moments = moments_from_rows(rows)
    # Checks that need the device are read last, so that all the work is queued before one sync.
    _raise_if_not_finite(q, k, finite)
    if mask is not None and bool((rows.count.reshape(-1, rows.count.shape[-1]).sum(-1) == 0).any()):
        raise no_valid_entry((rows.count.sum(-1) == 0).nonzero()[0].tolist())
    return StreamingStats(
        entropy=rows.entropy,
        lse=rows.lse,
        sum_p2=rows.sum_p2,
        row_count=rows.count,
        entry_moments=moments,
        backend=used,
    )


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
    ``max_samples``; beyond that, those at the ranks :func:`attnstats.stats.lognormal.sample_ranks` draws
    from the matrix's generator (:func:`attnstats.stats.lognormal.matrix_generator` of ``seed`` and the
    matrix's flat batch index plus ``first_matrix``), in row-major order. Only the sampled entries
    are computed: ``O(max_samples·d)`` memory, whatever N.

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
    from .lognormal import check_sampling, matrix_generator, sample_ranks

    check_sampling(max_samples, seed)
    if isinstance(first_matrix, bool) or not isinstance(first_matrix, int) or first_matrix < 0:
        raise ValueError(f"first_matrix: expected an int >= 0, got {first_matrix!r}")
    qb, kb, scale, m, batch = prepare_qk(q, k, scale, mask, causal)
    B, Hq, Nq, d = qb.shape
    Nk = kb.shape[2]
    g = Hq // kb.shape[1]
    if lse is not None and (not isinstance(lse, torch.Tensor) or lse.shape != (*batch, Nq)):
        raise ValueError(f"lse: expected a tensor of shape {(*batch, Nq)}, got {getattr(lse, 'shape', type(lse))}")
    masks, counts = [], []
    for t in range(B * Hq):
        mask_bh = None if m is None else m[t // Hq, t % Hq].cpu()
        count = _valid_count(mask_bh, Nq, Nk, causal)
        if count == 0:
            where = tuple(int(x) for x in torch.unravel_index(torch.tensor(t), tuple(batch))) if batch else ()
            raise no_valid_entry(where)
        masks.append(mask_bh)
        counts.append(count)
    if lse is None:
        rows, _, _ = streaming_row_accumulators(qb, kb, scale=scale, mask=m, causal=causal)
        lse_b = rows.lse
    else:
        lse_b = lse.reshape(B, Hq, Nq)
    out = []
    dev = qb.device
    for t, (mask_bh, count) in enumerate(zip(masks, counts)):
        b, h = divmod(t, Hq)
        ranks = sample_ranks(count, max_samples, matrix_generator(seed, first_matrix + t))
        i, j = _entries_of_ranks(ranks, mask_bh, Nq, Nk, causal)
        i, j = i.to(dev), j.to(dev)
        qi = qb[b, h].index_select(0, i).double()
        kj = kb[b, h // g].index_select(0, j).double()
        vals = (qi * kj).sum(-1) * scale - lse_b[b, h].double().index_select(0, i)
        out.append(vals.cpu())
    return out


def streaming_lognormal_fit(
    q, k, *, scale=None, mask=None, causal=False, lse=None, max_samples=100_000, seed=0, first_matrix=0
):
    """Log-normal fit of the entries of ``softmax(scale · q kᵀ)`` per matrix, without the matrix.

    Args: as :func:`sample_log_probs`.

    Returns:
        :class:`attnstats.LogNormalFit` with float64 tensor fields of the batch shape ``[...]``
        (``n`` int64), each from :func:`attnstats.stats.lognormal.fit_log_values` on that matrix's sample (NaN, with a
        warning, where fewer than 3 distinct values exist). On the same entries as
        :func:`attnstats.lognormal_fit` of the dense matrix, so the two agree to float rounding.
    """
    from .lognormal import fits_per_matrix

    _, _, _, _, batch = prepare_qk(q, k, scale, None, causal)
    samples = sample_log_probs(
        q, k, scale=scale, mask=mask, causal=causal, lse=lse, max_samples=max_samples, seed=seed,
        first_matrix=first_matrix,
    )
    return fits_per_matrix(samples, batch)
