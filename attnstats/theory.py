"""Closed-form predictions of the paper (docs/theory.md §2–4), for Gaussian queries and keys.

Model: entries of ``q_i`` i.i.d. ``N(0, σ_q²)``, of ``k_j`` i.i.d. ``N(0, σ_k²)``, scores
``s_ij = q_i·k_j / sqrt(d)`` with variance ``σ² = σ_q² σ_k²``. All functions accept Python floats or
NumPy arrays (broadcast together) and return the same; logarithms are natural.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "LLN_A",
    "LLN_B",
    "SALogNormal",
    "sa_temperature",
    "sa_lognormal",
    "sa_lognormal_holds",
    "sa_entropy",
    "sa_spectral_gap",
    "fenton_wilkinson",
    "lln_alpha_beta",
    "lln_predicted_log_variance",
]

# Moment-matching constants of the reference implementation, fitted on Gaussian inputs at d = 64:
# log-variance of LLN ≈ LLN_A · σ_t² + LLN_B, σ_t² = α²σ_q² + β²σ_k².
LLN_A = 0.14855178144710912
LLN_B = -0.35487039130661086


def _positive(x, name: str):
    arr = np.asarray(x, dtype=float)
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        bad = np.argwhere(~(np.isfinite(arr) & (arr > 0)))
        where = f" at index {tuple(int(i) for i in bad[0])}" if arr.ndim else ""
        raise ValueError(f"{name}: expected positive finite values, got {arr if not arr.ndim else arr[tuple(bad[0])]}{where}")
    return arr


def _count(n, name: str = "n"):
    arr = np.asarray(n, dtype=float)
    if np.any(arr < 1) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: expected a sequence length N >= 1, got {n!r}")
    return arr


def _out(x):
    return float(x) if np.ndim(x) == 0 else x


@dataclass(frozen=True)
class SALogNormal:
    """Predicted moments of the entries of a softmax attention matrix (docs/theory.md §2).

    Attributes:
        sigma2: score variance ``σ² = σ_q² σ_k²`` (dimensionless).
        mean: mean of the entries of ``P``, exactly ``1/N``.
        var: variance of the entries of ``P``, ``(e^{σ²} − 1)/N²``.
        log_mean: mean of ``log P``, ``−ln N − σ²/2``.
        log_var: variance of ``log P``, ``σ²``.
    """

    sigma2: float | np.ndarray
    mean: float | np.ndarray
    var: float | np.ndarray
    log_mean: float | np.ndarray
    log_var: float | np.ndarray


def sa_temperature(sigma_q, sigma_k):
    """Softmax temperature ``τ_sm = 1/(σ_q σ_k)``: ``s = z/τ_sm`` with ``z`` standard-normal logits.

    Args:
        sigma_q, sigma_k: standard deviations of the query and key entries (before the 1/sqrt(d) scale).
    """
    return _out(1.0 / (_positive(sigma_q, "sigma_q") * _positive(sigma_k, "sigma_k")))


def sa_lognormal(sigma_q, sigma_k, n) -> SALogNormal:
    """Log-normal prediction of Proposition 3.1 for an ``N×N`` softmax attention matrix.

    Holds for moderate ``σ²`` and large ``N``: it needs ``e^{σ²}`` small against ``N``
    (see :func:`sa_lognormal_holds`).
    """
    s2 = _positive(sigma_q, "sigma_q") ** 2 * _positive(sigma_k, "sigma_k") ** 2
    n = _count(n)
    return SALogNormal(
        sigma2=_out(s2),
        mean=_out(1.0 / n + 0 * s2),
        var=_out(np.expm1(s2) / n**2),
        log_mean=_out(-np.log(n) - s2 / 2),
        log_var=_out(s2 + 0 * n),
    )


def sa_lognormal_holds(sigma2, n, max_ratio: float = 0.01):
    """Whether the log-normal prediction is inside its regime: ``(e^{σ²} − 1)/N ≤ max_ratio``.

    The Fenton–Wilkinson step treats the row sum ``Z_i`` as nearly constant; its log-variance is
    ``ln(1 + (e^{σ²} − 1)/N)``, so the prediction degrades once ``(e^{σ²} − 1)/N`` is no longer
    small. With ``max_ratio = 0.01`` the measured ``N²·Var[P]`` is within 10 % of the prediction
    (tests/test_theory.py measures where it stops holding).
    """
    return np.expm1(np.asarray(sigma2, dtype=float)) / _count(n) <= max_ratio


def sa_entropy(sigma2, n):
    """Mean row entropy of softmax attention under the log-normal model: ``ln N − σ²/2`` nats."""
    return _out(np.log(_count(n)) - np.asarray(sigma2, dtype=float) / 2)


def sa_spectral_gap(sigma2, n):
    """Heuristic spectral gap of Gaussian softmax attention: ``1 − sqrt((e^{σ²} − 1)/N)``.

    A heuristic, not a theorem (docs/theory.md §3): ``|λ_2|`` is taken as ``sqrt(N·Var[P])``, the scale
    of the eigenvalues of the centred random part of ``P``. Good for small ``σ²``; clipped at 0.
    """
    s2 = np.asarray(sigma2, dtype=float)
    return _out(np.clip(1.0 - np.sqrt(np.expm1(s2) / _count(n)), 0.0, 1.0))


def fenton_wilkinson(sigma2, n):
    """Log-normal approximation of a sum of ``N`` i.i.d. ``LogNormal(0, σ²)``: ``(log_mean, log_var)``.

    ``log_var = ln(1 + (e^{σ²} − 1)/N)``, ``log_mean = ln N + σ²/2 − log_var/2``.
    """
    s2 = np.asarray(sigma2, dtype=float)
    n = _count(n)
    log_var = np.log1p(np.expm1(s2) / n)
    return _out(np.log(n) + s2 / 2 - log_var / 2), _out(log_var)


def lln_alpha_beta(sigma_q, sigma_k, a: float = LLN_A, b: float = LLN_B):
    """Moment-matching temperatures ``(α, β)`` of LLN attention (docs/theory.md §4).

    Solves ``σ_q²σ_k² = a·σ_t² + b`` with ``σ_t² = α²σ_q² + β²σ_k²`` and ``ασ_q = βσ_k``:
    ``σ̃ = sqrt((σ_q²σ_k² − b)/(2a))``, ``α = σ̃/σ_q``, ``β = σ̃/σ_k``.

    Args:
        sigma_q, sigma_k: standard deviations of the whole query and key tensors.
        a, b: the fitted linear relation (defaults: the paper's constants for d = 64; refit for
            other head dims with :func:`attnstats.fit_moment_matching`).
    """
    sq = _positive(sigma_q, "sigma_q")
    sk = _positive(sigma_k, "sigma_k")
    if not a > 0:
        raise ValueError(f"a: expected a positive slope, got {a!r}")
    num = sq**2 * sk**2 - b
    if np.any(num <= 0):
        raise ValueError(f"b: σ_q²σ_k² − b must be positive to match moments, got σ_q²σ_k² = {sq**2 * sk**2}, b = {b}")
    s_tilde = np.sqrt(num / (2 * a))
    return _out(s_tilde / sq), _out(s_tilde / sk)


def lln_predicted_log_variance(alpha, beta, sigma_q, sigma_k, a: float = LLN_A, b: float = LLN_B):
    """Predicted ``Var[ln P]`` of LLN attention entries, from the moment-matching line:
    ``a·(α²σ_q² + β²σ_k²) + b`` (docs/theory.md §4).

    A closed form, no sampling; :func:`attnstats.kernels.moment_matching.lln_measured_log_variance`
    measures the same quantity on Gaussian draws (it is what ``a, b`` are fitted to).
    """
    a_ = np.asarray(alpha, dtype=float)
    b_ = np.asarray(beta, dtype=float)
    return _out(a * (a_**2 * np.asarray(sigma_q, dtype=float) ** 2 + b_**2 * np.asarray(sigma_k, dtype=float) ** 2) + b)
