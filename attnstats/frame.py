"""Tidy long-format DataFrames of attention statistics: one row per (layer, head, batch, metric).

:func:`records_frame` turns captured :class:`attnstats.capture.AttentionRecord` objects into a
``pandas.DataFrame`` with columns ``call, layer, name, kernel (with alongside kernels), head, batch,
metric, value``, so that ``groupby`` and ``pivot`` do the rest. The numbers come from the one metric table,
:func:`attnstats.metrics.record_metrics`, which also lists the metrics.

"""
from __future__ import annotations

import pandas as pd
import torch

from .metrics import METRICS, check_metrics, record_metrics

__all__ = ["records_frame", "COLUMNS"]

_AGGREGATIONS = ("each", "mean")
COLUMNS = ["call", "layer", "name", "kernel", "head", "batch", "metric", "value"]


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
    metrics = check_metrics(metrics)
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
                    v = torch.nanmean(v, 0, keepdim=True)  # NaN: a matrix with no fit
                if head == "mean":
                    v = torch.nanmean(v, 1, keepdim=True)
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

