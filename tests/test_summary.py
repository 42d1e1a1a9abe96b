"""CorpusSummary: shards merge to the same summary as one pass, against numpy / exact rational references."""
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("datasketches")

from attnstats.summary import CorpusSummary  # noqa: E402


def tidy(n_seq=120, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(n_seq):
        for layer in range(2):
            for head in range(3):
                rows.append(("softmax", layer, head, b, "entropy", rng.normal(2.0, 0.5)))
                rows.append(("lln", layer, head, b, "spectral_gap", rng.uniform() * 10.0 ** rng.integers(-8, 3)))
    return pd.DataFrame(rows, columns=["kernel", "layer", "head", "batch", "metric", "value"])


EXACT = ["count", "nan_count", "mean", "var", "min", "max"]


def test_any_split_merges_to_the_same_bits_as_one_pass():
    df = tidy()
    whole = CorpusSummary().add(df).to_frame()
    rng = np.random.default_rng(1)
    parts = np.array_split(rng.permutation(df["batch"].unique()), 4)  # 4 shards, sequences shuffled
    shards = [CorpusSummary().add(df[df.batch.isin(p)]) for p in parts]
    merged = CorpusSummary()
    for s in reversed(shards):  # another order, through bytes as another process would send them
        merged.merge(CorpusSummary.from_bytes(s.to_bytes()))
    got = merged.to_frame()
    pd.testing.assert_frame_equal(got[["kernel", "layer", "head", "metric"]], whole[["kernel", "layer", "head", "metric"]])
    # exact sums: the same float64 bits whatever the split and the order
    assert (got[EXACT].to_numpy() == whole[EXACT].to_numpy()).all()
    assert merged.sequences == 120


def test_mean_and_variance_are_the_correctly_rounded_exact_values():
    df = tidy(n_seq=40, seed=3)
    got = CorpusSummary().add(df).to_frame().set_index(["kernel", "layer", "head", "metric"])
    for key, group in df.groupby(["kernel", "layer", "head", "metric"]):
        x = [Fraction(v) for v in group.value.tolist()]  # exact rationals of the float64 values
        n = len(x)
        mean = sum(x) / n
        var = sum((v - mean) ** 2 for v in x) / (n - 1)
        row = got.loc[key]
        assert row["mean"] == float(mean) and row["var"] == float(var)  # one rounding, at the end
        assert row["count"] == n and row["min"] == float(min(x)) and row["max"] == float(max(x))
        np.testing.assert_allclose(row["var"], np.var(group.value.to_numpy(), ddof=1), rtol=1e-12)


def test_quantiles_within_the_sketch_rank_error():
    # KLL at k = 200: normalised rank error about 1.3 % (99 % confidence); allow 2 %. Rank of the
    # reported quantile among the exact values, for a merged summary of 5 shards.
    rng = np.random.default_rng(5)
    values = rng.lognormal(size=20_000)
    df = pd.DataFrame({"layer": 0, "head": 0, "metric": "entropy", "value": values, "batch": np.arange(values.size)})
    merged = CorpusSummary()
    for part in np.array_split(np.arange(values.size), 5):
        merged.merge(CorpusSummary().add(df.iloc[part]))
    row = merged.to_frame().iloc[0]
    srt = np.sort(values)
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        rank = np.searchsorted(srt, row[f"q{round(100 * q):02d}"], side="right") / values.size
        assert abs(rank - q) < 0.02, (q, rank)


def test_nan_values_are_counted_apart_and_bad_input_is_refused():
    df = pd.DataFrame({"layer": 0, "head": 0, "metric": "lognormal_mu", "value": [1.0, np.nan, 3.0], "batch": [0, 1, 2]})
    row = CorpusSummary().add(df).to_frame().iloc[0]
    assert row["count"] == 2 and row["nan_count"] == 1 and row["mean"] == 2.0 and row["var"] == 2.0
    with pytest.raises(ValueError, match=r"frame: expected columns layer, head, metric, value; missing \['value'\]"):
        CorpusSummary().add(df.drop(columns="value"))
    with pytest.raises(ValueError, match="head = NaN"):
        CorpusSummary().add(df.assign(head=np.nan))
    with pytest.raises(ValueError, match="k: expected an int in"):
        CorpusSummary(k=3)
    with pytest.raises(ValueError, match="different sketch sizes"):
        CorpusSummary(k=100).merge(CorpusSummary(k=200))
