"""LLN moment matching: the feature scale that gives LLN attention softmax's ``Var[ln P]`` (docs/theory.md §4).

LLN attention with feature maps ``exp(αq)``, ``exp(βk)`` on Gaussian q, k has a log-variance
``Var[ln P]`` that grows with the feature scale ``s = ασ_q = βσ_k``. Two rules choose ``s``:

- ``"curve"`` (the default of :class:`attnstats.kernels.LLNAttention`): the measured curve
  ``g_d(s) = Var[ln P_LLN]`` of head dim ``d`` (:func:`lln_log_variance_curve`; stored for the usual
  head dims in :data:`LLN_CURVES`), inverted at softmax's log-variance
  ``V(σ) = σ² + σ⁴/(2d)`` (:func:`softmax_log_variance`, ``σ²`` the score variance). The curve is
  convex in ``s²``, so no straight line follows it across the range; the inversion does.
- ``"paper"``: the paper's straight line ``Var[ln P] ≈ a·σ_t² + b`` (``σ_t² = 2s²``) solved at
  ``σ²``, with constants fitted by least squares over a sweep (:func:`fit_moment_matching`). It
  leaves LLN's log-variance at 80–167 % of softmax's for ``σ_qσ_k`` from 0.25 to 2 at d = 64 (within
  15 % only from 1 to 1.75), and further off at other head dims.
"""
from __future__ import annotations

import bisect
import functools
import math
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "fit_moment_matching", "MomentMatching", "lln_measured_log_variance", "log_variance_table", "DEFAULT_SIGMAS",
    "MATCHING_RULES", "CURVE_SIGMAS", "LLN_CURVES", "lln_log_variance_curve", "softmax_log_variance",
    "curve_feature_scale",
]

MATCHING_RULES = ("curve", "paper")

# Feature scales σ of the sweep. Least squares over this range reproduces the paper's d = 64
# constants (a = 0.1486, b = −0.355); it spans the σ_t² that those constants assign to softmax score
# variances σ_q²σ_k² from about 0.01 to 2.4.
DEFAULT_SIGMAS = tuple(float(s) for s in np.arange(0.75, 3.0 + 1e-9, 0.125))


# Feature scales s = ασ_q = βσ_k at which the LLN log-variance curve is measured: fine steps where the
# curve is small (it grows like s² there), then to s = 5, past the s that gives softmax's log-variance
# at σ_qσ_k = 2 for head dims 8 to 256.
CURVE_SIGMAS = tuple(float(x) for x in np.round(np.concatenate([np.arange(0.1, 1.0, 0.1), np.arange(1.0, 5.0 + 1e-9, 0.25)]), 3))

# Var[ln P] of LLN attention at CURVE_SIGMAS, per head dim: lln_log_variance_curve(d) with its defaults
# (n = 1024, 16 heads of 100,000 sampled entries each, seed 0), printed by
# ``python -m attnstats.kernels.moment_matching``. Other head dims are measured on first use.
LLN_CURVES: dict[int, tuple[float, ...]] = {
    8: (0.00126232, 0.00529828, 0.0126481, 0.0238759, 0.0413966, 0.0659955, 0.0968584, 0.139923, 0.192334, 0.258876, 0.473385, 0.775073, 1.15894, 1.63284, 2.20378, 2.85515, 3.64027, 4.50155, 5.34271, 6.4598, 7.51175, 8.60364, 9.77641, 11.3306, 12.6028, 14.1305),
    16: (0.000638576, 0.00260731, 0.00633358, 0.0122472, 0.0217338, 0.0349057, 0.054622, 0.0803611, 0.114334, 0.158904, 0.308241, 0.538483, 0.836312, 1.23318, 1.7141, 2.2505, 2.88273, 3.61711, 4.45297, 5.31507, 6.34369, 7.24481, 8.32695, 9.83614, 11.0871, 12.5099),
    32: (0.000314141, 0.00132559, 0.00316154, 0.00622332, 0.010983, 0.0181618, 0.0288799, 0.0441513, 0.064572, 0.0928762, 0.199592, 0.377046, 0.617356, 0.925917, 1.32745, 1.81205, 2.35172, 2.96284, 3.67458, 4.52527, 5.591, 6.34851, 7.3102, 8.44334, 9.63912, 11.0665),
    64: (0.00016076, 0.000658241, 0.00160759, 0.00315553, 0.00563521, 0.00951196, 0.0152662, 0.0237233, 0.0363078, 0.0536604, 0.126116, 0.252248, 0.440046, 0.698398, 1.0441, 1.43859, 1.92253, 2.48749, 3.09376, 3.88386, 4.69487, 5.4335, 6.41697, 7.34519, 8.52514, 9.52838),
    128: (7.97335e-05, 0.000334741, 0.00081626, 0.00160897, 0.00284097, 0.00482686, 0.00781836, 0.0125477, 0.0194382, 0.0296753, 0.0772464, 0.167867, 0.31472, 0.519737, 0.798352, 1.15211, 1.53982, 2.03829, 2.61754, 3.27244, 3.95747, 4.76355, 5.54288, 6.47026, 7.51524, 8.36623),
    256: (3.89686e-05, 0.000168293, 0.000401951, 0.000800501, 0.00143108, 0.00242915, 0.00397292, 0.00646265, 0.0102548, 0.0158413, 0.0454529, 0.107612, 0.218857, 0.383854, 0.619749, 0.900741, 1.2703, 1.7112, 2.18737, 2.78736, 3.41272, 4.14554, 4.80728, 5.80807, 6.63267, 7.60264),
}


def lln_log_variance_curve(d: int, n: int = 1024, heads: int = 16, samples: int = 100_000, seed: int = 0,
                           sigmas=CURVE_SIGMAS) -> np.ndarray:
    """Measured ``Var[ln P]`` of LLN attention at each feature scale ``s`` of ``sigmas`` (head dim ``d``).

    Gaussian q, k of std ``s`` with ``α = β = 1`` (:func:`lln_measured_log_variance`), all scales from
    one seeded generator. Returns float64 ``[len(sigmas)]``, increasing in ``s``.
    """
    g = torch.Generator().manual_seed(int(seed))
    return np.array([lln_measured_log_variance(float(x), d, n, heads, samples, g) for x in sigmas])


_measured: dict[int, tuple[float, ...]] = {}


def _curve(d: int) -> tuple[float, ...]:
    """The LLN log-variance curve of head dim ``d``: stored, or measured once per process."""
    if d in LLN_CURVES:
        return LLN_CURVES[d]
    if d not in _measured:
        curve = lln_log_variance_curve(d)
        if not bool(np.all(np.diff(curve) > 0)):
            raise RuntimeError(f"d: the measured LLN log-variance curve of head dim {d} is not increasing: {curve}")
        _measured[d] = tuple(float(v) for v in curve)
    return _measured[d]


_tensors: dict = {}


def _curve_tensors(d: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ln Var, ln s)`` of the curve of head dim ``d`` as float64 tensors on ``device``, copied there once."""
    key = (d, str(device))
    if key not in _tensors:
        _tensors[key] = (torch.tensor(_curve(d), dtype=torch.float64, device=device).log(),
                         torch.tensor(CURVE_SIGMAS, dtype=torch.float64, device=device).log())
    return _tensors[key]


@functools.lru_cache(maxsize=None)
def _curve_logs(d: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(ln Var, ln s)`` of the curve of head dim ``d`` as Python floats."""
    return tuple(math.log(v) for v in _curve(d)), tuple(math.log(x) for x in CURVE_SIGMAS)


def softmax_log_variance(score_var, d: int):
    """Softmax's ``Var[ln P]`` for Gaussian q, k whose scores have variance ``score_var`` (head dim ``d``).

    ``ln P_ij = s_ij − lse_i``; over the entries, ``Var[s] = σ²`` and the log-normaliser varies with
    ``|q_i|²`` (a scaled χ²_d): ``lse_i ≈ const + σ_k² c² |q_i|²/2`` has variance ``σ⁴/(2d)``, uncorrelated
    with ``s_ij``. So ``V = σ² + σ⁴/(2d)`` (large N; within 1 % of the measured variance at N = 1024 for
    ``σ`` from 0.25 to 2 and d = 32 to 128, docs/theory.md §4). Works on floats, arrays and tensors.
    """
    return score_var + score_var**2 / (2 * d)


def curve_feature_scale(score_var, d: int):
    """The LLN feature scale ``s`` whose log-variance equals softmax's at score variance ``score_var``.

    Inverts the head dim's curve (:data:`LLN_CURVES`) at :func:`softmax_log_variance`, piecewise
    linearly in ``(ln s, ln Var)``; beyond the measured range the end segments are extended. ``score_var``
    may be a float or a tensor (then computed on its device, without a host sync).
    """
    if not isinstance(score_var, torch.Tensor):  # a float: the same arithmetic in Python (a few µs, not ~50)
        curve, grid = _curve_logs(d)
        target = math.log(softmax_log_variance(float(score_var), d))
        i = min(max(bisect.bisect_left(curve, target), 1), len(curve) - 1)  # as torch.searchsorted, clamped
        lo, hi = curve[i - 1], curve[i]
        return math.exp(grid[i - 1] + (target - lo) * (grid[i] - grid[i - 1]) / (hi - lo))
    x = torch.as_tensor(score_var, dtype=torch.float64)
    curve, grid = _curve_tensors(d, x.device)  # ln Var and ln s at CURVE_SIGMAS
    target = softmax_log_variance(x, d).log()
    i = torch.searchsorted(curve, target.reshape(-1)).reshape(target.shape).clamp(1, curve.numel() - 1)
    lo, hi = curve[i - 1], curve[i]
    s = (grid[i - 1] + (target - lo) * (grid[i] - grid[i - 1]) / (hi - lo)).exp()
    return s.to(score_var.dtype)


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
    """``Var[log P]`` of softmax attention and of LLN under both matching rules and before matching (Figure 5b).

    Gaussian ``q, k: [1, heads, n, d]`` with ``σ_q = σ_k = sqrt(σ_qσ_k)`` for each value of
    ``sigma_products``; the variance over all entries of each head's dense matrix, averaged over
    heads (float64; ``heads·n²`` entries per kernel must fit the memory budget).

    Args:
        a, b: constants of the paper's rule (default: the paper's).

    Returns:
        pandas DataFrame, long format, one row per (``sigma_qk``, ``kernel``) with columns
        ``sigma_qk``, ``kernel`` (``softmax``; ``lln``: the curve rule; ``lln_paper``: the paper's
        line; ``lln_no_mm``: α = β = 1), ``log_var`` (mean over heads),
        ``log_var_sd`` (standard deviation over heads), ``ratio`` (to softmax's ``log_var``).

    Example: ``python -c "from attnstats.kernels.moment_matching import log_variance_table as t; print(t())"``
    """
    import pandas as pd

    from .. import theory
    from .base import get_kernel  # by name: the LLN module imports this one

    kernels = {
        "softmax": get_kernel("softmax"),
        "lln": get_kernel("lln"),
        "lln_paper": get_kernel("lln_paper", a=theory.LLN_A if a is None else a, b=theory.LLN_B if b is None else b),
        "lln_no_mm": get_kernel("lln_no_mm"),
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


if __name__ == "__main__":  # regenerate LLN_CURVES
    for _d in (8, 16, 32, 64, 128, 256):
        print(f"    {_d}: ({', '.join(f'{v:.6g}' for v in lln_log_variance_curve(_d))}),", flush=True)
