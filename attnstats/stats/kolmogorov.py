"""The two-sided Kolmogorov–Smirnov p-value, ``P(D_n ≥ d)``, for many tests at once.

:func:`kolmogorov_sf` gives the numbers of scipy's ``scipy.stats.kstwo.sf(d, n)`` (the exact
distribution that ``scipy.stats.kstest`` uses by default) and follows its choice of method, after
Simard & L'Ecuyer (2011). scipy evaluates one statistic at a time, and in the regime where attention
fits land (``n`` in the thousands, ``2.2 ≤ n·d² < 370``: a visible misfit) each costs about 3 ms in
its exact one-sided sum, so a batch of a thousand heads spent seconds there. That regime is computed
here as one array operation over all tests: ``2·S_n(d)``, with ``S_n`` the exact one-sided Smirnov
tail (Birnbaum & Tingey 1951),

    S_n(d) = d · Σ_{j=0}^{⌊n(1-d)⌋} C(n, j) (1 - d - j/n)^(n-j) (d + j/n)^(j-1),

summed in log space (all terms are positive, so there is no cancellation). Where ``n·d² ≥ 370`` (and
``n > 140``) the p-value is 0, as in scipy.

Where scipy uses Durbin's matrix formula (Marsaglia, Tsang & Wang 2003) or Pomeranz's recursion — every
``n ≤ 140`` with ``n·d² ≤ 4``, and a good fit at larger ``n`` (``n·d² < 2.2``, ``n ≤ 100000``,
``n·d^1.5 ≤ 1.4``) — the CDF is Durbin's formula for all those tests at once:

    P(D_n < d) = n!/nⁿ · (Hⁿ)_{kk},   k = ⌈n·d⌉, H an (2k−1)×(2k−1) matrix of inverse factorials,

the powers taken by repeated squaring of the batch of matrices (all entries are ≥ 0: no cancellation).
Pomeranz's recursion in scipy costs about 3 ms per test in Python, and it is where short sequences land:
a causal head of 16 tokens has 136 entries. The rest of ``n > 140`` with ``n·d² < 2.2`` is scipy's
Pelz–Good series, here for all those tests at once (:func:`pelz_good_cdf`; in scipy ~0.05 ms per test in
Python, half the heads of a padded batch of sentences). The closed forms at ``n·d ≤ 1`` and
``n·d ≥ n − 1`` go to scipy itself.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats as sps

from . import kolmogorov_triton

__all__ = ["durbin_cdf", "kolmogorov_sf", "pelz_good_cdf", "smirnov_sf"]

# Terms per chunk of the one-sided sum: bounds the temporaries (float64) to a few tens of MiB.
_CHUNK_TERMS = 1 << 22


def smirnov_sf(n, d):
    """The exact one-sided Smirnov tail ``P(D⁺_n ≥ d)`` for ``n`` (int ≥ 1) and ``d`` in ``(0, 1)``.

    Equal to ``scipy.special.smirnov(n, d)`` to about 1e-11 relative (float64 rounding of ``ln n!``).
    ``n``, ``d``: 1-d arrays or tensors of equal length; a tensor ``d`` is computed on its device and
    a tensor returned, else a numpy array. All tests of one ``n`` at once, a chunk at a time; the sum
    runs over ``j ≤ ⌊n(1-d)⌋``: ``O(n)`` terms per test.
    """
    as_numpy = not isinstance(d, torch.Tensor)
    dt = torch.as_tensor(d, dtype=torch.float64).reshape(-1)
    # the sizes are grouped on the host (they usually are there already): no sync per group
    n_host = np.asarray(n.cpu() if isinstance(n, torch.Tensor) else n).reshape(-1).astype(np.int64)
    out = torch.empty_like(dt)
    for size in np.unique(n_host).tolist():
        idx = torch.from_numpy(np.nonzero(n_host == size)[0]).to(dt.device)
        if dt.is_cuda and kolmogorov_triton.available():  # one launch, the terms never in memory
            out[idx] = kolmogorov_triton.smirnov_sf_one_n(int(size), dt[idx])
            continue
        rows = max(1, _CHUNK_TERMS // (int(size) + 1))
        for i0 in range(0, idx.numel(), rows):
            part = idx[i0 : i0 + rows]
            out[part] = _smirnov_one_n(int(size), dt[part])
    return out.numpy() if as_numpy else out


def _smirnov_one_n(n: int, d: torch.Tensor) -> torch.Tensor:
    """S_n(d) for one n in PyTorch tables [T, n + 1]: the CPU's path and the reference of
    :func:`attnstats.stats.kolmogorov_triton.smirnov_sf_one_n`."""
    dt = d[:, None]  # [T, 1]
    jmax = torch.floor(n * (1.0 - dt))  # [T, 1] last term of each sum
    j = torch.arange(n + 1, dtype=torch.float64, device=d.device)  # [J] (terms past jmax are masked)
    # ln C(n, j) from lgamma: absolute error about eps·ln n!, ~1e-11 relative at n = 1e5; one row
    # shared by the tests of this n.
    log_binom = math.lgamma(n + 1) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1)  # [J]
    frac = j / n  # [J]
    a = torch.log((1.0 - frac - dt).clamp_min_(0.0))  # [T, J] -inf at j = n(1-d) exactly: that term is 0
    a.mul_(n - j)
    b = torch.log(frac + dt).mul_(j - 1)  # [T, J]
    log_term = a.add_(b).add_(log_binom)
    log_term.masked_fill_(j > jmax, -math.inf)  # terms past ⌊n(1-d)⌋
    total = torch.logsumexp(log_term, dim=1) + torch.log(d)  # [T]
    return total.exp().clamp(0.0, 1.0)


def pelz_good_cdf(n, d):
    """``P(D_n ≤ d)`` by the Pelz–Good series (Pelz & Good 1976; Simard & L'Ecuyer 2011, §3), for many
    tests at once: scipy's method for ``n > 140`` where ``n·d² < 2.2`` and Durbin's formula is not used.

    With ``z = √n·d``, ``P ≈ K₀(z) + K₁(z)/√n + K₂(z)/n + K₃(z)/n^{3/2}``, each ``K_i`` a sum over odd
    ``m = 2k − 1`` of a polynomial in ``m²`` times ``exp(−π²m²/(8z²))`` (and, for ``K₂`` and ``K₃``, a sum over
    ``k`` of ``exp(−π²k²/(2z²))``), ``k`` up to ``⌈16z/π⌉``, as scipy sums them. Args: ``n``: int64 tensor
    ``[T]``; ``d``: float64 tensor ``[T]`` in ``(0, 1)``. Returns float64 ``[T]`` on ``d``'s device.
    """
    nf = n.to(torch.float64)
    z = nf.sqrt() * d  # [T]
    z2 = z * z
    pi2 = math.pi**2
    kmax = torch.ceil(16.0 * z / math.pi)  # [T] terms per test
    k = torch.arange(1, max(1, int(kmax.max())) + 1, dtype=torch.float64, device=d.device)  # [K]
    use = k[None, :] <= kmax[:, None]  # [T, K]
    zc = z2[:, None]  # [T, 1]
    m2 = ((2.0 * k - 1.0) ** 2)[None, :]  # [1, K] odd squares
    # exp(−π²m²/(8z²)); below e^-708 scipy's series is 0 for the whole test (z < 0.0417)
    odd = torch.where(use, torch.exp(-pi2 * m2 / (8.0 * zc)), 0.0)  # [T, K]
    c1 = -zc + pi2 / 4 * m2
    c2 = (6 * zc**3 + 2 * zc**2) + (2 * zc**2 - 5 * zc) * pi2 / 4 * m2 + pi2**2 * (1 - 2 * zc) / 16 * m2**2
    c3 = ((-30 * zc**3 - 90 * zc**4) + pi2 * (135 * zc**2 - 96 * zc**3) / 4 * m2
          + pi2**2 * (-60 * zc + 212 * zc**2) / 16 * m2**2 + pi2**3 * (5 - 30 * zc) / 64 * m2**3)
    root = math.sqrt(2 * math.pi)
    k0 = root * odd.sum(1) / z
    k1 = root * (c1 * odd).sum(1) / (6 * z2**2)
    k2 = root * (c2 * odd).sum(1) / (72 * z**7)
    k3 = root * (c3 * odd).sum(1) / (6480 * z**10)
    ks = (k * k)[None, :]  # [1, K]
    every = torch.where(use, ks * torch.exp(-pi2 * ks / (2.0 * zc)), 0.0)  # [T, K] k² exp(−π²k²/(2z²))
    k2 = k2 + every.sum(1) * pi2 * root / (-36 * z**3)
    k3 = k3 + ((3 * zc - pi2 * ks) * every).sum(1) * pi2 * root / (216 * z2**3)
    cdf = k0 + k1 / nf.sqrt() + k2 / nf + k3 / nf**1.5
    return torch.where(-pi2 / (8.0 * z2) < -708.0, 0.0, cdf)


def durbin_cdf(n, d):
    """``P(D_n < d)`` by Durbin's matrix formula (module docstring), for many tests at once.

    Args: ``n``: int64 tensor ``[T]`` of sample sizes ≥ 1; ``d``: float64 tensor ``[T]`` with
    ``1/2 < n·d`` and ``d < 1``. Returns float64 ``[T]`` on ``d``'s device. Each test's matrix has size
    ``m = 2k − 1`` (``k = ⌈n·d⌉``); tests whose ``m`` round up to the same multiple of 4 share one batch, their
    matrices padded with zeros (``[[H, 0], [0, 0]]ⁿ`` holds ``Hⁿ``), so the cost is ``O(m³ log n)`` per test:
    meant for the regimes of small ``k`` where scipy uses it (``k`` ≤ 24 for ``n ≤ 140``).
    """
    out = torch.empty_like(d)
    nd = n.to(torch.float64) * d
    k = torch.ceil(nd).to(torch.int64)  # [T]
    bucket = (2 * k - 1 + 3) // 4  # [T] padded size / 4
    for size in torch.unique(bucket).tolist():
        idx = (bucket == size).nonzero()[:, 0]
        out[idx] = _durbin_batch(4 * int(size), k[idx], n[idx], k[idx] - nd[idx])
    return out


def _durbin_batch(size: int, k: torch.Tensor, n: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``P(D_n < (k − h)/n)`` for tests ``k, n, h [T]`` (``h`` in ``[0, 1)``) whose matrices fit in ``size``."""
    dev, t = h.device, h.shape[0]
    m = 2 * k - 1  # [T]
    inv_fact = torch.exp(-torch.lgamma(torch.arange(1, size + 2, dtype=torch.float64, device=dev)))  # 1/i!, i ≤ size
    rows = torch.arange(size, device=dev)
    lag = rows[:, None] - rows[None, :] + 1  # [S, S] i − j + 1
    band = torch.where(lag >= 0, inv_fact[lag.clamp(0, size)], 0.0)  # [S, S] 1/(i−j+1)! on and below the superdiagonal
    hp = h[:, None] ** torch.arange(1, size + 1, dtype=torch.float64, device=dev)  # [T, S] h^1 … h^S
    v = (1.0 - hp) * inv_fact[1:]  # [T, S] first column: (1 − h^i)/i!
    h_m = hp.gather(1, (m - 1)[:, None])[:, 0]  # [T] h^m
    corner = (1.0 + (2.0 * h - 1.0).clamp_min(0.0) ** m - 2.0 * h_m) * inv_fact[m]  # [T]
    v.scatter_(1, (m - 1)[:, None], corner[:, None])
    H = band.expand(t, size, size).clone()  # [T, S, S]
    H[:, :, 0] = v
    src = (m - 1)[:, None] - rows[None, :]  # [T, S] the last row is the first column reversed
    last = torch.where(src >= 0, v.gather(1, src.clamp_min(0)), 0.0)  # [T, S]
    H.scatter_(1, (m - 1)[:, None, None].expand(t, 1, size), last[:, None, :])
    inside = (rows[None, :] < m[:, None])  # [T, S]
    H.mul_(inside[:, :, None] & inside[:, None, :])  # zero padding past each test's m
    # Row sums of H are at most e, so (H/e)ⁿ stays ≤ 1 entrywise at any n: no overflow; eⁿ comes back in
    # the log-space factor below
    H.div_(math.e)
    power = torch.eye(size, dtype=torch.float64, device=dev).expand(t, size, size)  # [T, S, S]
    bits = int(n.max()).bit_length()
    for b in range(bits):
        odd = ((n >> b) & 1).bool()[:, None, None]  # [T, 1, 1]
        power = torch.where(odd, power @ H, power)
        if b + 1 < bits:
            H = H @ H
    nf = n.to(torch.float64)
    # n!/nⁿ · eⁿ, in logs: ln n! − n ln n + n (about ½ ln 2πn)
    log_scale = torch.lgamma(nf + 1.0) - nf * torch.log(nf) + nf
    entry = power.diagonal(dim1=1, dim2=2).gather(1, (k - 1)[:, None])[:, 0]  # [T] (Hⁿ)_kk
    return entry * torch.exp(log_scale)


def kolmogorov_sf(d, n):
    """``P(D_n ≥ d)`` of the two-sided one-sample KS statistic, as ``scipy.stats.kstwo.sf(d, n)``.

    Args:
        d: KS statistics in ``[0, 1]``: an array-like (any shape), or a tensor, which is computed on
            its device (the regimes scipy handles cheaply go through scipy on the CPU).
        n: sample sizes, ints ≥ 1, broadcastable to ``d``.

    Returns:
        float64 values of the broadcast shape in ``[0, 1]``, NaN where ``d`` is NaN: a tensor on
        ``d``'s device for a tensor ``d``, else a numpy array.
    """
    as_numpy = not isinstance(d, torch.Tensor)
    dt = torch.as_tensor(d, dtype=torch.float64)
    dev = dt.device
    # The regimes are chosen on the host from one copy of (d, n), a few numbers per test: masks on the
    # device would each wait for it (a row of short launches and syncs at the end of a fit).
    n_host = np.asarray(n.cpu() if isinstance(n, torch.Tensor) else n)
    if n_host.size and np.issubdtype(n_host.dtype, np.floating) and not np.all(n_host == np.floor(n_host)):
        raise ValueError("n: expected integer sample sizes")
    n_host = n_host.astype(np.int64)
    if n_host.size and int(n_host.min()) < 1:
        raise ValueError(f"n: expected sample sizes >= 1, got {int(n_host.min())}")
    shape = np.broadcast_shapes(tuple(dt.shape), n_host.shape)
    d_dev = dt.broadcast_to(shape).reshape(-1)
    flat_d = d_dev.detach().cpu().numpy()
    flat_n = np.broadcast_to(n_host, shape).reshape(-1)
    nf = flat_n.astype(np.float64)
    t = nf * flat_d
    nx2 = t * flat_d
    with np.errstate(invalid="ignore"):  # NaN statistics fall in no regime
        inner = (t > 1.0) & (t < nf - 1)  # scipy's closed forms hold at the ends
        big = flat_n > 140
        # scipy's exact branches that are 2·S_n(d): d ≥ 1/2; n > 140 with 2.2 ≤ n·d² < 370; n ≤ 140 with n·d² > 4
        smirnov = inner & ((flat_d >= 0.5) | (big & (nx2 >= 2.2) & (nx2 < 370.0)) | (~big & (nx2 > 4.0)))
        zero = inner & (flat_d < 0.5) & big & (nx2 >= 370.0)
        # scipy's Durbin and Pomeranz branches: the same CDF, by Durbin's formula for all tests at once
        durbin = inner & ~smirnov & (flat_d < 0.5) & (
            (~big & (nx2 <= 4.0)) | (big & (nx2 < 2.2) & (flat_n <= 100000) & (nf * flat_d ** 1.5 <= 1.4)))
        # scipy's Pelz–Good branch: the rest of n > 140 with n·d² < 2.2
        pelz = inner & big & (flat_d < 0.5) & (nx2 < 2.2) & ~durbin
    rest = ~(smirnov | zero | durbin | pelz) & ~np.isnan(flat_d)
    out = torch.full((flat_d.size,), math.nan, dtype=torch.float64, device=dev)

    def on_device(mask):
        return torch.from_numpy(np.nonzero(mask)[0]).to(dev)

    if smirnov.any():
        idx = on_device(smirnov)
        out[idx] = (2.0 * smirnov_sf(flat_n[smirnov], d_dev[idx])).clamp(0.0, 1.0)
    if durbin.any():
        idx = on_device(durbin)
        out[idx] = (1.0 - durbin_cdf(torch.from_numpy(flat_n[durbin]).to(dev), d_dev[idx])).clamp(0.0, 1.0)
    if pelz.any():
        idx = on_device(pelz)
        out[idx] = (1.0 - pelz_good_cdf(torch.from_numpy(flat_n[pelz]).to(dev), d_dev[idx])).clamp(0.0, 1.0)
    if zero.any():
        out[on_device(zero)] = 0.0
    if rest.any():
        values = np.asarray(sps.kstwo.sf(flat_d[rest], flat_n[rest]), dtype=np.float64)
        out[on_device(rest)] = torch.from_numpy(values).to(dev)
    out = out.reshape(shape)
    return out.numpy() if as_numpy else out
