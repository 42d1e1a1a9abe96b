"""Refit the LLN moment-matching constants ``(a, b)`` for any head dim (docs/theory.md §4).

LLN attention with feature maps ``exp(αq)``, ``exp(βk)`` on Gaussian q, k has a log-variance
``Var[log P]`` that grows with ``σ_t² = α²σ_q² + β²σ_k²``; moment matching uses the linear fit
``Var[log P] ≈ a·σ_t² + b``. This module measures ``Var[log P]`` over a sweep of feature scales
``σ = ασ_q = βσ_k`` (so ``σ_t² = 2σ²``) and fits ``a, b`` by least squares.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["fit_moment_matching", "MomentMatching", "lln_measured_log_variance", "log_variance_table", "DEFAULT_SIGMAS"]

# Feature scales σ of the sweep. Least squares over this range reproduces the paper's d = 64
# constants (a = 0.1486, b = −0.355); it spans the σ_t² that those constants assign to softmax score
# variances σ_q²σ_k² from about 0.01 to 2.4.
DEFAULT_SIGMAS = tuple(float(s) for s in np.arange(0.75, 3.0 + 1e-9, 0.125))


class MomentMatching(NamedTuple):
    """Fitted constants of ``Var[log P_LLN] ≈ a·σ_t² + b`` (unpacks as ``a, b``)."""

    a: float
    b: float


def lln_measured_log_variance(sigma: float, d: int, n: int, heads: int = 8, samples: int = 100_000,
                              generator: torch.Generator | None = None) -> float:
    """Measured ``Var[log P]`` of LLN attention with ``α = β = 1`` on Gaussian q, k of std ``sigma``.

    A Monte-Carlo measurement (the data :func:`fit_moment_matching` fits a line to);
    :func:`attnstats.theory.lln_predicted_log_variance` is the line's closed-form prediction.

    Exact row normalisers ``log D_i = logsumexp_l(q_il + logsumexp_j k_jl)`` (``O(N·d)``) and
    ``samples`` uniformly drawn entries ``(i, j)`` per head, ``log P_ij = logsumexp_l(q_il + k_jl) −
    log D_i``: an unbiased estimate of the variance over all ``N²`` entries without the N×N matrix.
    Float64; the mean over ``heads`` independent draws.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    q = torch.randn(heads, n, d, generator=g, dtype=torch.float64) * sigma
    k = torch.randn(heads, n, d, generator=g, dtype=torch.float64) * sigma
    log_den = torch.logsumexp(q + torch.logsumexp(k, dim=-2, keepdim=True), dim=-1)  # [heads, n]
    i = torch.randint(n, (heads, samples), generator=g)
    j = torch.randint(n, (heads, samples), generator=g)
    h = torch.arange(heads)[:, None]
    # chunks of entries keep the [heads, chunk, d] intermediate small (cache-sized, no large allocations)
    log_p = torch.cat([
        torch.logsumexp(q[h, i[:, c:c + 4096]] + k[h, j[:, c:c + 4096]], dim=-1) - log_den[h, i[:, c:c + 4096]]
        for c in range(0, samples, 4096)
    ], dim=-1)
    return float(log_p.var(dim=-1, correction=0).mean())


def fit_moment_matching(d: int, n: int = 1024, sigmas=None, seed: int = 0, heads: int = 8,
                        samples: int = 100_000) -> MomentMatching:
    """Fit ``(a, b)`` of LLN moment matching for head dim ``d`` on Gaussian inputs.

    Args:
        d: head dim (number of LLN features).
        n: sequence length of the Gaussian draws.
        sigmas: feature scales ``σ = ασ_q = βσ_k`` of the sweep (``σ_t² = 2σ²``); default
            :data:`DEFAULT_SIGMAS` (0.75 to 3.0 by 0.125). At least two distinct positive values.
        seed: seed of the draws.
        heads, samples: independent draws per scale and entries sampled per draw
            (see :func:`lln_measured_log_variance`).

    Returns:
        :class:`MomentMatching` ``(a, b)``, for ``attnstats.kernels.LLNAttention(a=a, b=b)``.

    Example: ``a, b = attnstats.fit_moment_matching(32)``.
    """
    for label, val, low in (("d", d, 1), ("n", n, 2), ("heads", heads, 1), ("samples", samples, 2)):
        if isinstance(val, bool) or not isinstance(val, int) or val < low:
            raise ValueError(f"{label}: expected an int >= {low}, got {val!r}")
    s = np.asarray(DEFAULT_SIGMAS if sigmas is None else sigmas, dtype=float).reshape(-1)
    bad = ~(np.isfinite(s) & (s > 0))
    if bad.any():
        idx = int(np.argmax(bad))
        raise ValueError(f"sigmas: expected positive finite feature scales, got {s[idx]} at index {idx}")
    if np.unique(s).size < 2:
        raise ValueError(f"sigmas: a line needs at least two distinct scales, got {s.tolist()}")
    g = torch.Generator().manual_seed(int(seed))
    var = np.array([lln_measured_log_variance(float(x), d, n, heads, samples, g) for x in s])
    a, b = np.polyfit(2 * s**2, var, 1)
    if not a > 0 or not math.isfinite(b):
        raise ValueError(f"sigmas: the fitted slope is {a:.4g}; expected the log-variance to grow with σ_t² "
                         "(use a wider sweep)")
    return MomentMatching(float(a), float(b))


def log_variance_table(d: int = 64, n: int = 1024, sigma_products=(0.5, 0.75, 1.0, 1.25, 1.5), heads: int = 4,
                       seed: int = 0, a: float | None = None, b: float | None = None):
    """``Var[log P]`` of softmax attention and of LLN after and before moment matching (Figure 5b).

    Gaussian ``q, k: [1, heads, n, d]`` with ``σ_q = σ_k = sqrt(σ_qσ_k)`` for each value of
    ``sigma_products``; the variance over all entries of each head's dense matrix, averaged over
    heads (float64; ``heads·n²`` entries per kernel must fit the memory budget).

    Args:
        a, b: moment-matching constants (default: the paper's).

    Returns:
        pandas DataFrame, long format, one row per (``sigma_qk``, ``kernel``) with columns
        ``sigma_qk``, ``kernel`` (``softmax``, ``lln``, ``lln_no_mm``), ``log_var`` (mean over heads),
        ``log_var_sd`` (standard deviation over heads), ``ratio`` (to softmax's ``log_var``).

    Example: ``python -c "from attnstats.kernels.moment_matching import log_variance_table as t; print(t())"``
    """
    import pandas as pd

    from .. import theory
    from .lln import LLNAttention
    from .softmax import SoftmaxAttention

    kernels = {
        "softmax": SoftmaxAttention(),
        "lln": LLNAttention(a=theory.LLN_A if a is None else a, b=theory.LLN_B if b is None else b),
        "lln_no_mm": LLNAttention(moment_matching=False),
    }
    g = torch.Generator().manual_seed(int(seed))
    rows = []
    for s in sigma_products:
        if not s > 0:
            raise ValueError(f"sigma_products: expected positive values, got {s!r}")
        q = torch.randn(1, heads, n, d, generator=g, dtype=torch.float64) * math.sqrt(s)
        k = torch.randn(1, heads, n, d, generator=g, dtype=torch.float64) * math.sqrt(s)
        var = {name: torch.log(ker.matrix(q, k))[0].flatten(-2).var(-1) for name, ker in kernels.items()}
        for name, v in var.items():
            rows.append({"sigma_qk": float(s), "kernel": name, "log_var": float(v.mean()),
                         "log_var_sd": float(v.std()) if heads > 1 else 0.0,
                         "ratio": float(v.mean() / var["softmax"].mean())})
    return pd.DataFrame(rows)
