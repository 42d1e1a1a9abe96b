"""Log-normal fit of attention entries and goodness-of-fit tests on ``ln P``.

Proposition 3.1: the entries of a softmax attention matrix are approximately log-normal, so
``ln P_ij`` is approximately normal. The fit is the normal maximum-likelihood fit of ``ln P``; the
tests are scipy's Kolmogorov–Smirnov and Anderson–Darling tests of normality on the same values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats as sps

from ..masks import broadcast_mask
from . import lognormal_triton
from .kolmogorov import kolmogorov_sf
from .parallel import map_each
from .sampling import check_sampling, sample_ranks
from ..budget import get_memory_budget
from ..validation import _gather, check_square, check_tensor, probability_blocks

__all__ = [
    "LogNormalFit",
    "lognormal_fit",
    "fit_log_values",
    "fit_log_values_batched",
    "fits_per_matrix",
    "log_entries",
    "entries_of_blocks",
    "fit_of_blocks",
]


@dataclass(frozen=True)
class LogNormalFit:
    """A normal fit of ``ln P`` and tests of it.

    From :func:`fit_log_values` the fields are floats; from :func:`lognormal_fit` they are float64
    tensors of the batch shape ``[...]`` (``n`` int64).

    Attributes:
        mu: mean of ``ln P`` (nats).
        sigma: standard deviation of ``ln P`` (maximum likelihood, divides by n).
        ks_statistic, ks_pvalue: Kolmogorov–Smirnov test of ``ln P`` against ``N(mu, sigma²)``. The
            parameters are estimated from the same values, so the p-value is conservative
            (Lilliefors); use it to compare fits, not as an exact level.
        ad_statistic: Anderson–Darling statistic for normality of ``ln P`` (scipy.stats.anderson).
        skew: sample skewness of ``ln P`` (0 for a normal).
        excess_kurtosis: Fisher kurtosis of ``ln P`` (0 for a normal).
        n: number of values used.
    """

    mu: float | torch.Tensor
    sigma: float | torch.Tensor
    ks_statistic: float | torch.Tensor
    ks_pvalue: float | torch.Tensor
    ad_statistic: float | torch.Tensor
    skew: float | torch.Tensor
    excess_kurtosis: float | torch.Tensor
    n: int | torch.Tensor


def _anderson_statistic(v: np.ndarray) -> float:
    # Only the statistic is used: how scipy turns it into a level changed in 1.17 (method=...).
    try:
        res = sps.anderson(v, dist="norm", method="interpolate")
    except TypeError:  # scipy < 1.17 has no method argument
        res = sps.anderson(v, dist="norm")
    return float(res.statistic)


def fit_log_values(log_values) -> LogNormalFit:
    """Fit a normal to samples of ``ln P`` and test it.

    Args:
        log_values: 1-d tensor or array of finite ``ln P`` values (at least 3).
    """
    v = log_values.detach().cpu().double().numpy() if isinstance(log_values, torch.Tensor) else np.asarray(log_values, float)
    v = v.reshape(-1)
    if v.size < 3:
        raise ValueError(f"log_values: expected at least 3 values for a fit, got {v.size}")
    if not np.all(np.isfinite(v)):
        i = int(np.argwhere(~np.isfinite(v))[0, 0])
        raise ValueError(f"log_values: expected finite values, found {v[i]} at index {i}")
    mu = float(v.mean())
    sigma = float(v.std())
    if sigma == 0:
        raise ValueError("log_values: all values are equal (sigma = 0); a normal fit needs spread")
    ks = sps.kstest(v, sps.norm(mu, sigma).cdf)  # a frozen cdf: "norm" with args= breaks on scipy 1.18
    return LogNormalFit(
        mu=mu,
        sigma=sigma,
        ks_statistic=float(ks.statistic),
        ks_pvalue=float(ks.pvalue),
        ad_statistic=_anderson_statistic(v),
        skew=float(sps.skew(v)),
        excess_kurtosis=float(sps.kurtosis(v, fisher=True)),
        n=int(v.size),
    )


def _mask_counts(m: torch.Tensor, n: int) -> torch.Tensor:
    """Valid entries per matrix ``[M]`` (int64, CPU) of a broadcast bool mask ``[*batch, N, N]``.

    Read in blocks of about 2 Mi entries: a sum over a bool mask makes an int64 copy of what it sums
    (16 MiB per block; of all of a broadcast mask, were it summed at once).
    """
    batch = tuple(m.shape[:-2])
    count = math.prod(batch)
    rows = max(1, (1 << 21) // n)
    per, step = max(1, rows // n), min(rows, n)
    out = torch.zeros(count, dtype=torch.int64)
    for i0 in range(0, count, per):
        i1 = min(count, i0 + per)
        idx = list(torch.unravel_index(torch.arange(i0, i1, device=m.device), batch))
        for r0 in range(0, n, step):
            out[i0:i1] += _gather(m, idx, slice(r0, r0 + step)).sum((-2, -1)).cpu()
    return out


def log_entries(
    p: torch.Tensor, mask: torch.Tensor | None = None, max_samples: int = 100_000, seed: int = 0
) -> list[torch.Tensor]:
    """The values of ``ln P`` that :func:`lognormal_fit` uses, one 1-d float64 tensor per matrix.

    The valid entries of each matrix are enumerated in row-major order. Where there are at most
    ``max_samples``, all of them; beyond that, the entries at the ``max_samples`` ranks that
    :func:`attnstats.stats.sampling.sample_ranks` draws for ``seed`` and the matrix's flat batch
    index, in row-major order. Entries that are exactly 0 have no logarithm
    and are then left out. :func:`attnstats.sample_log_probs` enumerates and draws alike, so from
    ``q, k`` it takes the same entries. Rows are read renormalised, a block at a time
    (:func:`attnstats.validation.probability_blocks`); memory ``O(max_samples)`` per matrix.
    """
    check_sampling(max_samples, seed)
    check_tensor(p, "p")
    n = check_square(p, "p")
    batch = tuple(p.shape[:-2])
    m = broadcast_mask(mask, p.shape)
    flat_mask = None if m is None else (m if batch else m[None])
    return entries_of_blocks(probability_blocks(p, m), math.prod(batch), n, flat_mask, max_samples, seed)


def entries_of_blocks(blocks, count: int, n: int, mask, max_samples: int, seed: int) -> list[torch.Tensor]:
    """:func:`log_entries` of ``count`` checked matrices given as blocks of rows (the protocol of
    :func:`attnstats.validation.probability_blocks`); ``mask``: their bool mask ``[*batch, N, N]`` (a
    broadcast view is fine) or None."""
    if mask is None:
        counts = torch.full((count,), n * n, dtype=torch.int64)
    else:
        counts = _mask_counts(mask, n)
    ranks = [None if int(c) <= max_samples else sample_ranks(int(c), max_samples, seed, i) for i, c in enumerate(counts)]
    seen = [0] * count  # valid entries of each matrix in the blocks read so far
    parts: list[list[torch.Tensor]] = [[] for _ in range(count)]
    for i0, i1, r0, r1, x, valid in blocks:
        vals = x.reshape(-1) if valid is None else torch.masked_select(x, valid)  # row-major, matrix after matrix
        sizes = ([x.shape[1] * n] * x.shape[0]) if valid is None else valid.sum((-2, -1)).tolist()
        for i, v in zip(range(i0, i1), torch.split(vals, sizes)):
            if ranks[i] is not None:
                r = ranks[i]
                lo, hi = torch.searchsorted(r, torch.tensor([seen[i], seen[i] + v.numel()])).tolist()
                v = v[(r[lo:hi] - seen[i]).to(v.device)]
            seen[i] += int(sizes[i - i0])
            parts[i].append(v[v > 0].to("cpu", torch.float64))
    return [torch.log(torch.cat(ps)) if ps else torch.zeros(0, dtype=torch.float64) for ps in parts]


def lognormal_fit(
    p: torch.Tensor, mask: torch.Tensor | None = None, max_samples: int = 100_000, seed: int = 0
) -> LogNormalFit:
    """Log-normal fit of the valid entries of each attention matrix.

    Args:
        p: ``[..., N, N]`` row-stochastic attention.
        mask: bool, broadcastable to ``p``, True = attend.
        max_samples: entries used per matrix at most (beyond that, a stratified sample in which
            every entry is equally likely: :func:`attnstats.stats.sampling.sample_ranks`).
        seed: seed of the subsample.

    Returns:
        :class:`LogNormalFit` with float64 tensor fields of shape ``[...]``. Entries that are exactly
        0 have no logarithm and are left out; a matrix with fewer than 3 distinct values gets NaN
        fields and a warning (see :func:`fits_per_matrix`).
    """
    check_sampling(max_samples, seed)
    check_tensor(p, "p")
    n = check_square(p, "p")
    batch = tuple(p.shape[:-2])
    m = broadcast_mask(mask, p.shape)
    flat_mask = None if m is None else (m if batch else m[None])
    return fit_of_blocks(lambda: probability_blocks(p, m), batch, n, flat_mask, max_samples, seed, p.device)


def fit_of_blocks(blocks, batch, n: int, mask, max_samples: int, seed: int, device) -> LogNormalFit:
    """:func:`lognormal_fit` of checked matrices of batch shape ``batch``; ``blocks()`` iterates over their
    rows in blocks (the protocol of :func:`attnstats.validation.probability_blocks`), ``mask`` is their
    bool mask ``[*batch, N, N]`` (a broadcast view is fine) or None."""
    count = math.prod(batch)
    if n * n > max_samples or count * n * n * 8 > get_memory_budget():
        return fits_per_matrix(entries_of_blocks(blocks(), count, n, mask, max_samples, seed), batch)
    # Every valid entry of every matrix is used (no sample is drawn): ln P of the whole batch as one
    # [M, N²] table, NaN where an entry is masked or 0, fitted at once. The same values as
    # log_entries gives, in another order, which the fit (sorted values, sums) does not see.
    table = torch.empty((count, n * n), dtype=torch.float64, device=device)
    for i0, i1, r0, r1, x, valid in blocks():
        keep = x > 0 if valid is None else valid & (x > 0)
        logs = torch.where(keep, x.log(), math.nan).to(torch.float64)  # [i1 - i0, r1 - r0, N]
        table[i0:i1, r0 * n : r1 * n] = logs.reshape(i1 - i0, -1)
    if mask is None:
        return _fits_with_warnings(table, None, batch)
    # Padded matrices: each row's values moved to its front (order kept), so that the fit works on
    # rows of about their own length rather than all of N² (a padded batch of sentences fills ~40 %).
    valid = ~torch.isnan(table)  # [M, N²]
    counts = valid.sum(1)  # [M]
    width = max(1, int(counts.max()))
    packed = torch.full((count, width), math.nan, dtype=torch.float64, device=device)  # [M, max count]
    packed[torch.arange(width, device=device) < counts[:, None]] = table[valid]  # row-major: each row's prefix
    return _fits_with_warnings(packed, counts, batch, trusted=True)  # finite logs, NaN past the counts


def fits_per_matrix(values, batch) -> LogNormalFit:
    """:func:`fit_log_values` on each matrix's ``ln P`` values, gathered into tensors of shape ``batch``.

    Computed for all matrices at once by :func:`fit_log_values_batched` (the values are padded with
    NaN to the longest). A matrix whose values admit no fit (fewer than 3, or all equal: a single
    valid token, uniform attention) gets NaN in every field but ``n``, with a warning naming its batch
    index; such matrices are left out of aggregates, as rows with no valid entry are.
    """
    values = list(values)
    counts = torch.tensor([int(v.numel()) for v in values], dtype=torch.int64)
    width = int(counts.max()) if len(values) else 0
    padded = torch.full((len(values), width), math.nan, dtype=torch.float64)
    for i, v in enumerate(values):
        padded[i, : v.numel()] = v.reshape(-1).to("cpu", torch.float64)
    return _fits_with_warnings(padded, counts, batch)


def _fits_with_warnings(table: torch.Tensor, counts, batch, trusted: bool = False) -> LogNormalFit:
    """The batched fit of ``table: [M, W]`` (see :func:`_fit_batched`, also for ``trusted``) in the batch
    shape, on the CPU, with a warning per matrix that admits no fit."""
    import warnings

    fit, bad = fit_to_host(*_fit_batched(table, counts, trusted=trusted))
    for i in bad.nonzero().reshape(-1).tolist():
        c = int(fit.n[i])
        where = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), tuple(batch))) if len(batch) else ()
        warnings.warn(
            f"lognormal_fit: the matrix at batch index {where} has {c} valid entries"
            f"{' all equal' if c >= 3 else ''}; its fit is NaN (a normal fit needs 3 distinct values)",
            RuntimeWarning,
            stacklevel=4,
        )
    return LogNormalFit(**{name: getattr(fit, name).reshape(batch) for name in LogNormalFit.__dataclass_fields__})


def fit_to_host(fit: LogNormalFit, bad: torch.Tensor) -> tuple[LogNormalFit, torch.Tensor]:
    """``(fit, bad)`` of :func:`_fit_batched` on the CPU in one transfer (a field at a time, each copy
    would wait for the device again)."""
    names = [f for f in LogNormalFit.__dataclass_fields__ if f != "n"]
    host = torch.stack([getattr(fit, name).to(torch.float64) for name in names]
                       + [fit.n.to(torch.float64), bad.to(torch.float64)]).cpu()  # counts < 2^53: exact
    return LogNormalFit(**{name: host[i] for i, name in enumerate(names)}, n=host[-2].to(torch.int64)), host[-1].bool()


def fit_log_values_batched(values: torch.Tensor, counts: torch.Tensor | None = None) -> LogNormalFit:
    """:func:`fit_log_values` on each row of ``values`` at once, in torch on the values' device.

    Args:
        values: ``[M, n]`` float ``ln P`` values, one matrix per row. Row ``i`` holds its values in
            its first ``counts[i]`` entries when ``counts`` is given (the rest is ignored); otherwise
            its values are its non-NaN entries (NaN pads a row shorter than ``n``).
        counts: ``[M]`` int, values per row, or None.

    Returns:
        :class:`LogNormalFit` with float64 tensor fields ``[M]`` on the values' device (``n``
        int64): the same numbers as :func:`fit_log_values` row by row (scipy's ``kstest``,
        ``anderson``, ``skew``, ``kurtosis``), computed in float64. The KS p-value is scipy's
        ``kstwo.sf(D, n)`` (kstest's default exact mode), evaluated for all rows at once on the
        values' device by :func:`attnstats.stats.kolmogorov.kolmogorov_sf`.
        A row with fewer than 3 values, or with all values equal, gets NaN fields and one warning
        lists such rows.
    """
    import warnings

    fit, bad = _fit_batched(values, counts)
    if bool(bad.any()):
        rows = bad.nonzero().reshape(-1).tolist()
        shown = ", ".join(str(i) for i in rows[:10]) + (", ..." if len(rows) > 10 else "")
        warnings.warn(
            f"fit_log_values_batched: {len(rows)} rows have fewer than 3 values or all values equal "
            f"(rows {shown}); their fit is NaN (a normal fit needs 3 distinct values)",
            RuntimeWarning,
            stacklevel=2,
        )
    return fit


def _fit_batched(values: torch.Tensor, counts: torch.Tensor | None, trusted: bool = False,
                 pvalues: bool = True) -> tuple[LogNormalFit, torch.Tensor]:
    """The fit of :func:`fit_log_values_batched` and the bool ``[M]`` of rows that admit none.

    ``trusted``: the values and counts come from attnstats itself (the sampler's table, or
    :func:`lognormal_fit`'s: finite values, NaN past the counts, counts within the width), so the checks
    that read them on the host are skipped and nothing waits for the device before the KS p-values, the
    last step: queued behind a forward pass, the fit's launches then
    overlap the forward's kernels instead of idling the device between syncs. ``pvalues=False`` leaves
    that step out too (``ks_pvalue`` NaN): nothing at all waits, and the caller computes the p-values
    of many fits at once with :func:`ks_pvalues`. On the CPU, rows given with counts are fitted in groups
    of similar counts (:func:`_bucketed_row_sums`).
    """
    if not isinstance(values, torch.Tensor) or values.dim() != 2 or not values.is_floating_point():
        raise TypeError(f"values: expected a 2-d float tensor [M, n], got {getattr(values, 'shape', type(values))}")
    if values.shape[1] == 0:  # reductions need a column: one of padding
        values = torch.full((values.shape[0], 1), math.nan, dtype=values.dtype, device=values.device)
    m, width = values.shape
    dev = values.device
    # float32 values (the GPU sampler's) are sorted as they are, 32-bit keys in half the time of float64 ones,
    # and summed in float64 after the sort: the same numbers, float32 → float64 being exact and monotone
    x = values.detach()
    x = x if x.dtype == torch.float32 else x.to(torch.float64)
    col = torch.arange(width, device=dev)
    if counts is None:
        valid = ~torch.isnan(x)
        cnt = valid.sum(1)
    else:
        if not isinstance(counts, torch.Tensor) or counts.shape != (m,) or counts.is_floating_point():
            raise TypeError(f"counts: expected an int tensor of shape [{m}], got {getattr(counts, 'shape', counts)}")
        cnt = counts.to(dev, torch.int64)
        if not trusted and bool(((cnt < 0) | (cnt > width)).any()):
            i = int(((cnt < 0) | (cnt > width)).nonzero()[0, 0])
            raise ValueError(f"counts: expected values in [0, {width}], got {int(cnt[i])} at row {i}")
        valid = None if trusted else col < cnt[:, None]
    if not trusted:  # a trusted table is finite up to its counts and NaN past them already
        bad_value = valid & ~torch.isfinite(x)
        if bool(bad_value.any()):
            i, j = (int(t) for t in bad_value.nonzero()[0])
            raise ValueError(f"values: expected finite values, found {float(x[i, j])} at row {i}, column {j}")
        x = torch.where(valid, x, math.nan)
    if counts is not None and not x.is_cuda:
        mu, m2, m3, m4, ks, ad, lo, hi = _bucketed_row_sums(x, cnt)
    else:
        mu, m2, m3, m4, ks, ad, lo, hi = _row_sums(x, cnt, trusted)
    bad = (cnt < 3) | ~(hi > lo)  # NaN (no value) compares False
    sigma = m2.sqrt()

    # scipy's skew/kurtosis give NaN where m2 is zero to rounding relative to the mean
    flat = m2 <= (torch.finfo(torch.float64).eps * mu) ** 2
    skew = torch.where(flat, math.nan, m3 / m2**1.5)
    kurt = torch.where(flat, math.nan, m4 / m2**2 - 3.0)

    # kstest's default (method="auto") for the two-sided one-sample test is exact: kstwo.sf(D, n),
    # here evaluated for all rows at once on the values' device (attnstats.stats.kolmogorov).
    pvalue = ks_pvalues(ks, cnt, bad) if pvalues else torch.full((m,), math.nan, dtype=torch.float64, device=dev)

    def keep(t):  # a Python scalar, not a device tensor built from the host (that copy waits for the device)
        return torch.where(bad, math.nan, t)

    fit = LogNormalFit(
        mu=keep(mu), sigma=keep(sigma), ks_statistic=keep(ks), ks_pvalue=pvalue, ad_statistic=keep(ad),
        skew=keep(skew), excess_kurtosis=keep(kurt), n=cnt,
    )
    return fit, bad


def _row_sums(x, cnt, trusted):
    """``(mu, m2, m3, m4, ks, ad, lo, hi)`` ``[M]`` float64 of the rows of ``x: [M, W]`` (float32 or float64,
    NaN past each row's ``cnt`` values, wherever they sit): sorted in their dtype, then summed in float64 by
    :func:`_sorted_row_sums` or its kernels."""
    # NaN sorts last, so each row's values lead its sorted row, as scipy's sort(v) of the row alone.
    # Past the longest row there is only padding: the rest works on the first max(count) columns
    # (reading that width is a sync: a trusted table is already as wide as its longest row).
    y = _sorted_rows(x).to(torch.float64)  # [M, W]
    width = y.shape[1]
    if not trusted:
        width = max(1, int(cnt.max()))
        y = y[:, :width].contiguous()  # [M, width]
    lo = y[:, 0]
    hi = y.gather(1, (cnt - 1).clamp(min=0)[:, None])[:, 0]
    if y.is_cuda and lognormal_triton.available():  # the same sums in four launches (module docstring)
        return (*lognormal_triton.sorted_row_sums(y, cnt), lo, hi)
    nf = cnt.to(torch.float64).clamp(min=1)
    col = torch.arange(width, device=y.device)
    return (*_sorted_row_sums(y, cnt, col < cnt[:, None], nf), lo, hi)


def _sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """``torch.sort(x, dim=1).values`` (NaN last): on the CPU by numpy, whose vectorised sort of float64 is
    about twice as fast as torch's, its rows shared out over torch's threads (one MiniLM layer's 192 × 16,384
    table on 2 cores: 57 against 112 ms, ``benchmarks/threads_cpu.py``)."""
    if x.device.type != "cpu":
        return torch.sort(x, dim=1).values
    rows = x.detach().contiguous().numpy()
    return torch.from_numpy(map_each(_sort_each_row, [rows])[0]) if rows.size else x.clone()


def _sort_each_row(a: np.ndarray) -> np.ndarray:
    return np.sort(a, axis=1)


# Rows whose counts lie within this factor of each other are fitted together, padded to the longest.
_BUCKET_RATIO = 1.25


def _bucketed_row_sums(x, cnt):
    """:func:`_row_sums` of rows that hold their values first (``x[i, :cnt[i]]``, NaN after), in groups
    of similar counts, each sorted and summed at its own width: a padded batch of short sequences, whose
    counts range over a factor of ten or more, is not sorted and summed at its longest row's width."""
    m = x.shape[0]
    out = torch.full((8, m), math.nan, dtype=torch.float64, device=x.device)  # mu, m2, m3, m4, ks, ad, lo, hi
    # bucket b holds counts in (r^(b-1), r^b]: the widest row of a bucket is at most r times its narrowest
    bucket = torch.ceil(torch.log(cnt.clamp(min=1).to(torch.float64)) / math.log(_BUCKET_RATIO)).to(torch.int64)
    for b in torch.unique(bucket).tolist():
        rows = (bucket == b).nonzero()[:, 0]  # [R]
        width = max(1, int(cnt[rows].max()))
        out[:, rows] = torch.stack(_row_sums(x[rows, :width], cnt[rows], trusted=True))
    return out.unbind(0)


def ks_pvalues(ks: torch.Tensor, n: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """``kstwo.sf(ks, n)`` of fits ``[M]`` (float64 statistics, int counts), NaN where ``bad``: the rows
    are not selected on the host, so nothing waits for the device before
    :func:`attnstats.stats.kolmogorov.kolmogorov_sf` itself."""
    return kolmogorov_sf(torch.where(bad, math.nan, ks), n.clamp(min=1))


def _sorted_row_sums(y, cnt, svalid, nf):
    """The PyTorch form of :func:`attnstats.stats.lognormal_triton.sorted_row_sums` (same returns),
    given also the ``[M, W]`` mask of valid samples and the float counts: the reference of the
    kernels, and the CPU's path."""
    width = y.shape[1]
    dev = y.device
    col = torch.arange(width, device=dev)
    # Central moments about the mean, as scipy's skew/kurtosis (_moment) and numpy's std (ddof=0).
    z0 = torch.where(svalid, y, 0.0)
    mu = z0.sum(1) / nf
    d = torch.where(svalid, y - mu[:, None], 0.0)
    d2 = d * d
    m2 = d2.sum(1) / nf
    m3 = (d2 * d).sum(1) / nf
    m4 = (d2 * d2).sum(1) / nf
    sigma = m2.sqrt()

    # Kolmogorov–Smirnov D = max(D+, D-) on the sorted row (scipy's _compute_d), against N(mu, sigma²).
    i1 = torch.arange(1, width + 1, device=dev, dtype=torch.float64)
    safe_sigma = torch.where(sigma > 0, sigma, 1.0)
    cdf = torch.special.ndtr((y - mu[:, None]) / safe_sigma[:, None])
    dplus = torch.where(svalid, i1 / nf[:, None] - cdf, -math.inf).amax(1)
    dminus = torch.where(svalid, cdf - (i1 - 1) / nf[:, None], -math.inf).amax(1)
    ks = torch.maximum(dplus, dminus)

    # Anderson–Darling A² as scipy.stats.anderson(dist="norm"): standardised by the ddof=1 std, and
    # A² = -N - Σ (2i-1)/N (log Φ(w_i) + log(1 - Φ(w_{N+1-i}))).
    s1 = (m2 * nf / (nf - 1).clamp(min=1)).sqrt()
    s1 = torch.where(s1 > 0, s1, 1.0)
    w = torch.where(svalid, (y - mu[:, None]) / s1[:, None], 0.0)
    logcdf = torch.special.log_ndtr(w)
    rev = (cnt[:, None] - 1 - col).clamp(min=0)
    logsf = torch.special.log_ndtr(-torch.gather(w, 1, rev))
    terms = torch.where(svalid, (2 * i1 - 1) / nf[:, None] * (logcdf + logsf), 0.0)
    ad = -nf - terms.sum(1)

    return mu, m2, m3, m4, ks, ad
