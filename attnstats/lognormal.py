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

from .stats import prepare_probs

__all__ = ["LogNormalFit", "lognormal_fit", "fit_log_values", "fits_per_matrix", "log_entries"]


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


def log_entries(
    p: torch.Tensor, mask: torch.Tensor | None = None, max_samples: int = 100_000, seed: int = 0
) -> list[torch.Tensor]:
    """The values of ``ln P`` that :func:`lognormal_fit` uses, one 1-d float64 tensor per matrix.

    Valid, strictly positive entries of each matrix in row-major order; where there are more than
    ``max_samples``, a uniform sample without replacement (sorted back to row-major order) drawn
    from one generator seeded with ``seed`` and used matrix after matrix, so the result is
    reproducible.
    """
    if not isinstance(max_samples, int) or max_samples < 3:
        raise ValueError(f"max_samples: expected an int >= 3, got {max_samples!r}")
    x, m = prepare_probs(p, mask)
    flat = x.reshape(-1, x.shape[-2] * x.shape[-1]).cpu()
    mflat = None if m is None else m.reshape(flat.shape).cpu()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(flat.shape[0]):
        keep = flat[i] > 0
        if mflat is not None:
            keep &= mflat[i]
        vals = flat[i][keep]
        if vals.numel() > max_samples:
            pick = torch.randperm(vals.numel(), generator=gen)[:max_samples].sort().values
            vals = vals[pick]
        out.append(torch.log(vals.double()))
    return out


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
