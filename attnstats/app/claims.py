"""The propositions of docs/theory.md §2–4 and attnstats' own rules, each checked numerically on Gaussian inputs.

Each check yields a :class:`ClaimResult`: whose statement it is (the paper's, or attnstats' own
implementation), what is checked, the measured number, the regime, and the outcome the docs record
for it. A paper statement that fails where docs/theory.md says it fails is a documented finding;
``attnstats validate`` exits non-zero only when an outcome differs from the documented one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .. import theory
from ..stats.spectral import spectral_gap
from ..stats.dense import entry_moments, row_entropy, softmax_attention

__all__ = ["ClaimResult", "run_claims", "claims_frame"]


@dataclass(frozen=True)
class ClaimResult:
    """One numerical check.

    Attributes:
        section: where the statement stands in docs/theory.md (e.g. "§2").
        claim: what is checked, in words.
        prediction: the predicted value.
        measurement: the measured value.
        tolerance: how far they may differ, e.g. "rel 0.1" or "abs 0.02".
        holds: whether the measurement is within the tolerance of the prediction.
        expected: the outcome docs/theory.md records: True (holds), False (a documented failure), or
            None (outside the statement's regime, where nothing is claimed; reported for information).
        regime: the conditions of the measurement, and whether they are inside the statement's regime.
        source: ``"paper"`` (a statement of the paper) or ``"attnstats"`` (a rule of this implementation).
    """

    section: str
    claim: str
    prediction: float
    measurement: float
    tolerance: str
    holds: bool
    expected: bool | None
    regime: str
    source: str = "paper"

    @property
    def documented(self) -> bool:
        """Whether the outcome is the one the docs record (always, where nothing is claimed)."""
        return self.expected is None or self.holds == self.expected


def _check(section, claim, prediction, measurement, tol, kind="rel", expected=True, regime="", source="paper"):
    prediction, measurement = float(prediction), float(measurement)
    err = abs(measurement - prediction) / (abs(prediction) if kind == "rel" else 1.0)
    return ClaimResult(section, claim, prediction, measurement, f"{kind} {tol:g}", bool(err <= tol), expected, regime,
                       source)


def _gaussian(heads, n, d, sigma2, gen):
    s = sigma2**0.25  # σ_q = σ_k, so σ_q²σ_k² = σ²
    q = torch.randn(heads, n, d, generator=gen, dtype=torch.float64) * s
    k = torch.randn(heads, n, d, generator=gen, dtype=torch.float64) * s
    return q, k


def _section2(n, d, heads, gen):
    out = []
    for sigma2 in (0.5, 1.0, 2.0, 4.0):
        inside = bool(theory.sa_lognormal_holds(sigma2, n))
        regime = f"N={n}, d={d}, σ²={sigma2:g}: (e^σ²−1)/N={math.expm1(sigma2) / n:.4f} " + (
            "inside (≤ 0.01)" if inside else "outside (> 0.01)"
        )
        q, k = _gaussian(heads, n, d, sigma2, gen)
        m = entry_moments(softmax_attention(q, k))
        pred = theory.sa_lognormal(sigma2**0.5, 1.0, n)
        # outside the regime the paper claims nothing (None), except that the variance of P, a moment
        # of the heavy log-normal tail, is documented to fail there (by a factor 1.3 to 3: σ² = 2 and 4
        # at N = 256, σ² = 4 at N = 1024)
        out += [
            _check("§2", "mean of P entries = 1/N", pred.mean, m.mean.mean(), 1e-9, "rel", True, regime),
            _check("§2", "N²·Var[P] = e^σ² − 1", pred.var * n * n, m.var.mean() * n * n, 0.10, "rel", inside, regime),
            _check("§2", "mean of log P = −ln N − σ²/2", pred.log_mean, m.log_mean.mean(), 0.02, "abs",
                   True if inside else None, regime),
            _check("§2", "Var[log P] = σ²", pred.log_var, m.log_var.mean(), 0.05, "rel", True if inside else None, regime),
        ]
    return out


def _section3(n, d, heads, gen):
    out = []
    q, k = _gaussian(heads, n, d, 1.0, gen)
    regime = f"N={n}, d={d}, σ²=1"
    h = row_entropy(softmax_attention(q, k)).mean()
    out.append(_check("§3", "mean row entropy = ln N − σ²/2", theory.sa_entropy(1.0, n), h, 0.02, "abs", True, regime))

    taus = [0.25, 0.5, 1.0, 2.0, 4.0]
    ps = [softmax_attention(q, k, scale=d**-0.5 / t) for t in taus]
    hs = np.array([row_entropy(p).mean().item() for p in ps])
    gs = np.array([spectral_gap(p).mean().item() for p in ps])
    tau_regime = f"N={n}, d={d}, τ ∈ {taus}, mean over {heads} heads"
    out.append(ClaimResult("§3", "entropy rises with temperature: smallest step dH", 0.0, float(np.diff(hs).min()), "> 0", bool(np.diff(hs).min() > 0), True, tau_regime))
    out.append(ClaimResult("§3", "spectral gap rises with temperature: smallest step dγ", 0.0, float(np.diff(gs).min()), "> 0", bool(np.diff(gs).min() > 0), True, tau_regime))

    small = min(n, 256)
    q2, k2 = _gaussian(heads, small, d, 0.5, gen)
    out.append(_check("§3", "spectral gap ≈ 1 − sqrt((e^σ²−1)/N) (heuristic)", theory.sa_spectral_gap(0.5, small),
                      spectral_gap(softmax_attention(q2, k2)).mean(), 0.03, "abs", True, f"N={small}, d={d}, σ²=0.5"))

    causal = torch.ones(small, small, dtype=torch.bool).tril()
    pc = softmax_attention(q2[:1], k2[:1], mask=causal)[0]
    dense = 1 - np.sort(np.abs(np.linalg.eigvals(pc.numpy())))[-2]
    out.append(_check("§3", "causal gap = 1 − max_{i≥1} P_ii (exact)", dense, spectral_gap(pc, causal), 1e-9, "abs", True,
                      f"N={small}, eigenvalues by numpy.linalg.eigvals"))

    toy_n, e5 = 256, math.exp(5.0)
    s = torch.zeros(toy_n, toy_n, dtype=torch.float64)
    s[:, :4] = 5.0
    biased = torch.softmax(s, -1)
    perm = torch.randperm(toy_n, generator=gen)
    s = torch.zeros(toy_n, toy_n, dtype=torch.float64)
    s[torch.arange(toy_n), perm] = 5.0
    unbiased = torch.softmax(s, -1)
    toy = "N=256, logit 5 on chosen entries"
    z = 4 * e5 + toy_n - 4
    out.append(_check("§3", "biased concentration: entropy", math.log(z) - 20 * e5 / z, row_entropy(biased).mean(), 1e-9, "abs", True, toy))
    out.append(_check("§3", "biased concentration: gap = 1 (rank one)", 1.0, spectral_gap(biased), 1e-9, "abs", True, toy))
    z = e5 + toy_n - 1
    out.append(_check("§3", "unbiased concentration: entropy", math.log(z) - 5 * e5 / z, row_entropy(unbiased).mean(), 1e-9, "abs", True, toy))
    out.append(_check("§3", "unbiased concentration: gap = 1 − (e⁵−1)/Z", 1 - (e5 - 1) / z, spectral_gap(unbiased), 1e-9, "abs", True, toy))
    return out


def _section4(n, d, heads, gen):
    from ..kernels import get_kernel

    out = []
    q, k = (t[None] for t in _gaussian(heads, min(n, 256), d, 1.0, gen))  # kernels take [B, H, N, d]
    relu = get_kernel("relu")
    base = relu.matrix(q, k)
    for c in (0.5, 2.0):
        out.append(_check("§3", f"ReLU linear attention has no temperature: max |P(c·q, c·k) − P(q, k)|, c={c}", 0.0,
                          (relu.matrix(c * q, c * k) - base).abs().max(), 1e-12, "abs", True, f"N={q.shape[-2]}, d={d}"))
    paper, lln_raw = get_kernel("lln_paper"), get_kernel("lln_no_mm")
    n = 1024  # the claim is made at N = 1024, d = 64 (quick or not)
    for sigma in (0.25, 1.25, 1.5):  # σ_q = σ_k = sqrt(σ), so σ_qσ_k = σ
        q, k = (t[None] for t in _gaussian(heads, n, d, sigma**2, gen))
        sa = entry_moments(softmax_attention(q, k)).log_var.mean()
        matched = entry_moments(paper.matrix(q, k)).log_var.mean()
        raw = entry_moments(lln_raw.matrix(q, k)).log_var.mean()
        regime = f"N={n}, d={d}, σ_qσ_k={sigma:g}"
        # documented (docs/theory.md §4): a straight line cannot follow LLN's convex log-variance curve;
        # at σ_qσ_k = 0.25 its negative intercept sends the LLN variance to 1.6× softmax's, while at
        # 1.25 and 1.5 it stays within 7 %. (From 0.5 to 1 it is 12–18 % short, too close to the 15 %
        # bound for a check whose outcome must not depend on the seed, so those are left out.)
        out.append(_check("§4", "paper's matching line: LLN Var[log P] within 15 % of SA", sa, matched, 0.15, "rel",
                           sigma >= 1.0, regime))
        ratio = float(raw / sa)
        out.append(ClaimResult("§4", "before moment matching (α=β=1): LLN Var[log P] / SA's far below 1", 0.0, ratio,
                               "< 0.5", ratio < 0.5, True, regime))
    # attnstats' rule: the measured curve of the head dim, inverted. The per-head LLN variance scatters
    # by 3–6 % (its tail is set by a few large features), so 12 heads put the mean's scatter near 1.5 %,
    # and the 5 % bound tests the rule, not the draw.
    lln = get_kernel("lln")
    for dim in (32, 64, 128):
        for sigma in (0.25, 0.5, 1.0, 1.5, 2.0):
            q, k = (t[None] for t in _gaussian(12, 1024, dim, sigma**2, gen))
            sa = entry_moments(softmax_attention(q, k)).log_var.mean()
            matched = entry_moments(lln.matrix(q, k)).log_var.mean()
            out.append(_check("§4", "curve matching: LLN Var[log P] within 5 % of SA", sa, matched, 0.05, "rel", True,
                              f"N=1024, d={dim}, σ_qσ_k={sigma:g}, 12 heads", source="attnstats"))
    return out


def run_claims(quick: bool = False, seed: int = 0, sections=("§2", "§3", "§4")) -> list[ClaimResult]:
    """Measure every claim; ``quick`` uses N = 256 and 8 heads instead of 1024 and 4 (seconds instead of
    half a minute)."""
    # quick: fewer tokens need more heads for the same scatter of the means; with 2 heads of 256 tokens
    # the entropy (0.02 nats) and N²·Var[P] (10 %) checks missed by their sampling spread for 1 seed in
    # 10, with 8 none of 16 seeds did
    n, d, heads = (256, 64, 8) if quick else (1024, 64, 4)
    runners = {"§2": _section2, "§3": _section3, "§4": _section4}
    out = []
    for i, sec in enumerate(runners):
        if sec in sections:  # each section draws from its own seed: its numbers do not depend on the others run
            out += runners[sec](n, d, heads, torch.Generator().manual_seed(seed * 1000 + i))
    return out


def claims_frame(results) -> "pandas.DataFrame":  # noqa: F821
    """The results as a DataFrame, one row per claim."""
    import pandas as pd

    columns = list(ClaimResult.__dataclass_fields__) + ["documented"]
    return pd.DataFrame([asdict(r) | {"documented": r.documented} for r in results], columns=columns)
