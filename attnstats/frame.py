"""Tidy long-format DataFrames of attention statistics: one row per (layer, head, batch, metric).

:func:`records_frame` turns captured :class:`attnstats.capture.AttentionRecord` objects into a
``pandas.DataFrame`` with columns ``call, layer, name, kernel (with alongside kernels), head, batch,
metric, value``, so that ``groupby`` and ``pivot`` do the rest. Every statistic comes from the
foundation functions (:func:`attnstats.row_entropy`, :func:`attnstats.entry_moments`,
:func:`attnstats.spectral_gap`, :func:`attnstats.lognormal_fit`) on the record's dense matrix; from
the streaming statistics on its q, k when the matrices are large (:func:`uses_streaming`: the same
numbers without P); or, for records captured with ``store="stats"``, from the streaming statistics
computed during the forward.

Metrics (per matrix, i.e. per batch element and head):

============== ==========================================================================================
group          metric names
============== ==========================================================================================
entropy        ``entropy``: mean over valid query rows of the row entropy (nats)
spectral_gap   ``spectral_gap``: ``1 − |λ₂|`` over the valid tokens (exact diagonal rule when causal);
               self-attention only (no row for a cross-attention record, ``Nq ≠ Nk``)
lognormal      ``lognormal_mu``, ``lognormal_sigma``, ``lognormal_ks``, ``lognormal_ks_pvalue``,
               ``lognormal_ad``, ``lognormal_skew``, ``lognormal_excess_kurtosis``: fit of ``ln P``
moments        ``p_mean``, ``p_var``, ``logp_mean``, ``logp_var``: mean and variance of ``P`` and ``ln P``
temperature    ``temperature`` ``= 1/(σ_q σ_k)``, ``sigma_q``, ``sigma_k`` (THEORY.md §1), softmax only
============== ==========================================================================================
"""
from __future__ import annotations

import math

import pandas as pd
import torch

__all__ = ["METRICS", "METRIC_NAMES", "records_frame", "record_metrics"]

METRIC_NAMES = {
    "entropy": ("entropy",),
    "spectral_gap": ("spectral_gap",),
    "lognormal": (
        "lognormal_mu",
        "lognormal_sigma",
        "lognormal_ks",
        "lognormal_ks_pvalue",
        "lognormal_ad",
        "lognormal_skew",
        "lognormal_excess_kurtosis",
    ),
    "moments": ("p_mean", "p_var", "logp_mean", "logp_var"),
    "temperature": ("temperature", "sigma_q", "sigma_k"),
}
METRICS = tuple(METRIC_NAMES)
_AGGREGATIONS = ("each", "mean")
COLUMNS = ["call", "layer", "name", "kernel", "head", "batch", "metric", "value"]


def _check_metrics(metrics) -> tuple[str, ...]:
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    for i, m in enumerate(metrics):
        if m not in METRIC_NAMES:
            raise ValueError(f"metrics[{i}]: unknown metric group {m!r}, expected some of {METRICS}")
    if not metrics:
        raise ValueError(f"metrics: expected at least one of {METRICS}, got none")
    return metrics


def _square(p: torch.Tensor, mask):
    """A non-square ``[B, H, Nq, Nk]`` (cross-attention) embedded in ``[B, H, M, M]``, the rest masked out.

    The dense statistics take square matrices; the added rows have no valid entry (absent) and the
    added columns are masked, so entropy, moments and the log-normal fit are those of ``p`` itself.
    """
    b, h, nq, nk = p.shape
    if nq == nk:
        return p, mask
    m = max(nq, nk)
    big = p.new_zeros((b, h, m, m))
    big[..., :nq, :nk] = p
    valid = torch.zeros((b, h, m, m), dtype=torch.bool, device=p.device)
    valid[..., :nq, :nk] = True if mask is None else mask
    return big, valid


def _row_mean(h: torch.Tensor) -> torch.Tensor:
    """Mean over the last axis ignoring NaN (rows with no valid entry)."""
    ok = ~torch.isnan(h)
    return torch.where(ok, h, torch.zeros_like(h)).sum(-1) / ok.sum(-1)


def lognormal_fields(fit) -> dict:
    """The metric names of the log-normal group, mapped to the fields of a LogNormalFit."""
    return {
        "lognormal_mu": fit.mu,
        "lognormal_sigma": fit.sigma,
        "lognormal_ks": fit.ks_statistic,
        "lognormal_ks_pvalue": fit.ks_pvalue,
        "lognormal_ad": fit.ad_statistic,
        "lognormal_skew": fit.skew,
        "lognormal_excess_kurtosis": fit.excess_kurtosis,
    }


def moment_fields(mom) -> dict:
    """The metric names of the moments group, mapped to the fields of an EntryMoments."""
    return {"p_mean": mom.mean, "p_var": mom.var, "logp_mean": mom.log_mean, "logp_var": mom.log_var}


# A record whose matrices have at least this many tokens (max(Nq, Nk)) gets its softmax statistics
# from q, k by the streaming functions, as record(..., store="stats") computes them, instead of from
# the dense P. Measured on a shared 2-core CPU, one thread, d = 32, Gaussian q, k, entropy + moments +
# lognormal, seconds per head, dense vs streaming: N = 512: 0.38 vs 0.45; 1024: 0.53–1.02 vs
# 0.51–0.53; 2048: 1.06–1.13 vs 0.64–0.70; 4096: 3.2 vs 1.2, with a peak of 1.5 GiB vs 0.2 GiB for
# 4 heads (entropy and moments alone: 0.16 vs 0.08 s at 1024). The spectral gap then comes from
# attnstats.spectral_gap_from_qk, whose method="auto" picks LAPACK on P or Arnoldi by its own rule;
# with the gap too, one head: N = 1536: 3.5 vs 2.0 s; 2048: 5.8 vs 1.6 s.
STREAMING_FROM_TOKENS = 1024


def uses_streaming(rec) -> bool:
    """Whether :func:`record_metrics` computes the softmax statistics of ``rec`` from q, k, without P.

    True when the streaming statistics give every metric of the dense path (no bias or softcap; no
    mask, key padding, causal; see :func:`attnstats.capture.stats_store.gives_every_metric`) and the
    matrices are large: ``max(Nq, Nk) >= STREAMING_FROM_TOKENS``, or the dense ``[B, H, Nq, Nk]``
    matrix in the compute dtype would exceed the memory budget.
    """
    from .budget import get_memory_budget
    from .capture.stats_store import gives_every_metric
    from .validation import compute_dtype

    b, h, nq, nk = rec.shape
    if rec.q is None or rec.bias is not None or rec.softcap is not None or not gives_every_metric(rec.mask, nq, nk):
        return False
    itemsize = torch.finfo(compute_dtype(rec.q)).bits // 8
    return max(nq, nk) >= STREAMING_FROM_TOKENS or b * h * nq * nk * itemsize > get_memory_budget()


def record_metrics(rec, metrics=METRICS, *, kernel=None, max_samples: int = 100_000, seed: int = 0) -> dict:
    """Statistics of one record (or of ``kernel`` on its q, k): metric name -> float64 tensor ``[B, H]``.

    Softmax statistics come from the dense matrix, or from q, k by the streaming functions when the
    matrices are large (:func:`uses_streaming`); both give the same numbers (the log-normal fit on
    the same ``ln P`` entries). Kernels alongside use their own dense matrix and gap.

    Metrics that a record cannot give are left out: ``spectral_gap`` of a non-square (cross-attention)
    matrix, and with ``store="stats"`` the groups not computed during the forward (``metrics=`` of
    :func:`attnstats.record`) and the ``spectral_gap`` of a layer whose mask is neither key padding nor
    causal (warned about during the forward).
    """
    from .lognormal import lognormal_fit
    from .spectral import spectral_gap
    from .stats import entry_moments, row_entropy

    metrics = _check_metrics(metrics)
    b, h, nq, nk = rec.shape
    out: dict = {}
    if rec.q is None:  # store="stats": computed during the forward pass
        drawn = (getattr(rec.stats, "max_samples", max_samples), getattr(rec.stats, "seed", seed))
        if "lognormal" in metrics and "lognormal_mu" in rec.stats and drawn != (max_samples, seed):
            raise ValueError(
                f"max_samples, seed: record {rec.name!r} was captured with store='stats', whose ln P sample was "
                f"drawn during the forward with max_samples={drawn[0]}, seed={drawn[1]}; frame() cannot redraw it "
                f"with max_samples={max_samples}, seed={seed}"
            )
        for group in metrics:
            if group == "temperature":
                continue
            for name in METRIC_NAMES[group]:
                if name in rec.stats:
                    out[name] = rec.stats[name]
    elif kernel is None and uses_streaming(rec):
        from .capture.stats_store import streaming_values

        groups = [g for g in metrics if g != "temperature"]
        if groups:
            with torch.no_grad():
                out.update(
                    streaming_values(rec.q, rec.k, rec.mask, rec.is_causal, rec.scale, groups, rec.name, max_samples, seed)
                )
    else:
        needs_p = [g for g in metrics if g in ("entropy", "lognormal", "moments") or (g == "spectral_gap" and nq == nk)]
        if needs_p:
            mask = rec.stats_mask()
            if kernel is None:
                p = rec.probs(dtype=torch.float64 if rec.q.device.type == "cpu" else torch.float32)
            else:
                from .capture.alongside import kernel_probs

                p = kernel_probs(rec, kernel)
            p, mask = _square(p, mask)
            if "entropy" in metrics:
                out["entropy"] = _row_mean(row_entropy(p, mask))
            if "spectral_gap" in metrics and nq == nk:
                if kernel is not None and getattr(kernel, "name", "softmax") != "softmax":
                    from .capture.alongside import kernel_gap

                    out["spectral_gap"] = kernel_gap(rec, kernel)
                else:
                    out["spectral_gap"] = spectral_gap(p, mask)
            if "moments" in metrics:
                out.update(moment_fields(entry_moments(p, mask)))
            if "lognormal" in metrics:
                out.update(lognormal_fields(lognormal_fit(p, mask, max_samples=max_samples, seed=seed)))
    if "temperature" in metrics and kernel is None:
        out["sigma_q"] = rec.sigma_q
        out["sigma_k"] = rec.sigma_k
        out["temperature"] = 1.0 / (rec.sigma_q * rec.sigma_k)
    order = [n for g in metrics for n in METRIC_NAMES[g]]
    return {n: out[n].detach().to("cpu", torch.float64).reshape(b, h) for n in order if n in out}


def records_frame(
    records,
    metrics=METRICS,
    *,
    batch: str = "mean",
    head: str = "each",
    kernels=(),
    max_samples: int = 100_000,
    seed: int = 0,
) -> pd.DataFrame:
    """Long-format statistics of captured attention records.

    Args:
        records: :class:`attnstats.capture.AttentionRecord` objects (``rec.records``).
        metrics: metric groups, some of ``"entropy", "spectral_gap", "lognormal", "moments",
            "temperature"`` (see the module docstring for the metric names each group gives).
        batch: ``"mean"`` (default): one value per head, the mean over batch elements (NaN-free ones),
            ``batch`` column ``<NA>``; ``"each"``: one row per batch element.
        head: ``"each"`` (default): one row per head; ``"mean"``: mean over heads, ``head`` ``<NA>``.
        kernels: kernels evaluated alongside (from ``record(..., alongside=...)``); adds rows with
            their names in the ``kernel`` column, ``"softmax"`` for the captured attention.
        max_samples, seed: of the log-normal fit (:func:`attnstats.lognormal_fit`).

    Returns:
        DataFrame with columns ``call, layer, name, head, batch, metric, value`` (``kernel`` after
        ``name`` when ``kernels`` is not empty); ``value`` float64, ``head``/``batch`` nullable Int64.
    """
    metrics = _check_metrics(metrics)
    for arg, val in (("batch", batch), ("head", head)):
        if val not in _AGGREGATIONS:
            raise ValueError(f"{arg}: expected one of {_AGGREGATIONS}, got {val!r}")
    records = list(records)
    if not records:
        raise ValueError("records: expected at least one AttentionRecord, got none")
    kernels = list(kernels or ())
    rows: list[dict] = []
    for rec in records:
        runs = [("softmax", None)] + [(getattr(kn, "name", str(kn)), kn) for kn in kernels]
        for kname, kn in runs:
            values = record_metrics(rec, metrics, kernel=kn, max_samples=max_samples, seed=seed)
            for metric, v in values.items():
                if batch == "mean":
                    v = _nanmean(v, 0, keepdim=True)
                if head == "mean":
                    v = _nanmean(v, 1, keepdim=True)
                for bi in range(v.shape[0]):
                    for hi in range(v.shape[1]):
                        rows.append(
                            {
                                "call": rec.call,
                                "layer": rec.layer,
                                "name": rec.name,
                                "kernel": kname,
                                "head": pd.NA if head == "mean" else hi,
                                "batch": pd.NA if batch == "mean" else bi,
                                "metric": metric,
                                "value": float(v[bi, hi]),
                            }
                        )
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["head"] = df["head"].astype("Int64")
    df["batch"] = df["batch"].astype("Int64")
    df["value"] = df["value"].astype("float64")
    if not kernels:
        df = df.drop(columns="kernel")
    return df


def _nanmean(v: torch.Tensor, dim: int, keepdim: bool) -> torch.Tensor:
    ok = ~torch.isnan(v)
    total = torch.where(ok, v, torch.zeros_like(v)).sum(dim, keepdim=keepdim)
    count = ok.sum(dim, keepdim=keepdim)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))
