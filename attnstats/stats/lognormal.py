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
from ..validation import _gather, check_square, check_tensor, probability_blocks

__all__ = [
    "LogNormalFit",
    "lognormal_fit",
    "fit_log_values",
    "fits_per_matrix",
    "log_entries",
    "sample_ranks",
    "matrix_generator",
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


def check_sampling(max_samples, seed) -> None:
    """Raise unless ``max_samples`` is an int ≥ 3 and ``seed`` an int ≥ 0 (bools are neither)."""
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 3:
        raise ValueError(f"max_samples: expected an int >= 3, got {max_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")


def matrix_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of the ``ln P`` sample of matrix ``index`` (flat over the batch, row-major).

    One generator per matrix, seeded from ``(seed, index)`` through numpy's ``SeedSequence``: the
    sample of a matrix does not depend on how the batch is split (the dense fit takes the whole batch,
    ``record(..., store="stats")`` one batch element at a time), and matrices get unrelated samples.
    """
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


def sample_ranks(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` distinct integers of ``[0, count)``, uniform without replacement, sorted (int64, CPU).

    The ranks of the valid entries (in row-major order) that an ``ln P`` sample takes; the dense
    (:func:`log_entries`) and streaming (:func:`attnstats.sample_log_probs`) samplers both call it,
    so that equal ``(count, size, generator)`` pick the same entries. ``count ≤ size`` gives every
    rank. Memory ``O(size)`` when ``count`` is large: draws with replacement, repeats dropped in draw
    order (which keeps the sample uniform), until ``size`` distinct ranks are in hand; a permutation
    of ``[0, count)`` when ``count ≤ 4·size``, where repeats would be frequent.
    """
    if count <= size:
        return torch.arange(count)
    if count <= 4 * size:
        return torch.randperm(count, generator=generator)[:size].sort().values
    picked = torch.empty(0, dtype=torch.int64)
    while picked.numel() < size:
        need = size - picked.numel()
        # at most a quarter of the draws repeat an earlier one (count > 4·size)
        cand = torch.cat([picked, torch.randint(0, count, (int(1.4 * need) + 16,), generator=generator)])
        uniq, inverse = torch.unique(cand, return_inverse=True)
        first = torch.full((uniq.numel(),), cand.numel(), dtype=torch.int64)
        first.scatter_reduce_(0, inverse, torch.arange(cand.numel()), reduce="amin")
        picked = cand[first.sort().values][:size]
    return picked.sort().values


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
    ``max_samples``, all of them; beyond that, the entries at ``max_samples`` ranks drawn by
    :func:`sample_ranks` from the matrix's own generator (:func:`matrix_generator` of ``seed`` and
    the matrix's flat batch index), in row-major order. Entries that are exactly 0 have no logarithm
    and are then left out. :func:`attnstats.sample_log_probs` enumerates and draws alike, so from
    ``q, k`` it takes the same entries. Rows are read renormalised, a block at a time
    (:func:`attnstats.validation.probability_blocks`); memory ``O(max_samples)`` per matrix.
    """
    check_sampling(max_samples, seed)
    check_tensor(p, "p")
    n = check_square(p, "p")
    batch = tuple(p.shape[:-2])
    m = broadcast_mask(mask, p.shape)
    count = math.prod(batch)
    if m is None:
        counts = torch.full((count,), n * n, dtype=torch.int64)
    else:
        counts = _mask_counts(m if batch else m[None], n)
    ranks = [None if int(c) <= max_samples else sample_ranks(int(c), max_samples, matrix_generator(seed, i))
             for i, c in enumerate(counts)]
    seen = [0] * count  # valid entries of each matrix in the blocks read so far
    parts: list[list[torch.Tensor]] = [[] for _ in range(count)]
    for i0, i1, r0, r1, x, valid in probability_blocks(p, m):
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
        max_samples: entries used per matrix at most (uniform subsample beyond that).
        seed: seed of the subsample.

    Returns:
        :class:`LogNormalFit` with float64 tensor fields of shape ``[...]``. Entries that are exactly
        0 have no logarithm and are left out; a matrix with fewer than 3 distinct values gets NaN
        fields and a warning (see :func:`fits_per_matrix`).
    """
    return fits_per_matrix(log_entries(p, mask, max_samples, seed), p.shape[:-2])


def fits_per_matrix(values, batch) -> LogNormalFit:
    """:func:`fit_log_values` on each matrix's ``ln P`` values, gathered into tensors of shape ``batch``.

    A matrix whose values admit no fit (fewer than 3, or all equal: a single valid token, uniform
    attention) gets NaN in every field but ``n``, with a warning naming its batch index; such
    matrices are left out of aggregates, as rows with no valid entry are.
    """
    import warnings

    names = [f for f in LogNormalFit.__dataclass_fields__ if f != "n"]
    rows, counts = [], []
    for i, v in enumerate(values):
        counts.append(int(v.numel()))
        if v.numel() < 3 or bool((v == v[0]).all()):
            where = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), tuple(batch))) if len(batch) else ()
            warnings.warn(
                f"lognormal_fit: the matrix at batch index {where} has {v.numel()} valid entries"
                f"{' all equal' if v.numel() >= 3 else ''}; its fit is NaN (a normal fit needs 3 distinct values)",
                RuntimeWarning,
                stacklevel=3,
            )
            rows.append([math.nan] * len(names))
        else:
            fit = fit_log_values(v)
            rows.append([getattr(fit, name) for name in names])
    table = torch.tensor(rows, dtype=torch.float64).reshape(*batch, len(names))
    fields = {name: table[..., i] for i, name in enumerate(names)}
    return LogNormalFit(**fields, n=torch.tensor(counts, dtype=torch.int64).reshape(batch))
