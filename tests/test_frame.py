"""Recorder.frame(): the statistics of captured attention against numpy / scipy computed here.

The attention comes from a plain SDPA module on random q, k (padded, causal or not); every reference
is built from a float64 softmax written out in this file, then numpy.linalg / scipy.stats.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

import attnstats
import attnstats.metrics  # patched by the tests of the streaming path

B, H, N, D = 2, 3, 12, 8
LENGTHS = [12, 8]  # batch element 1 is right-padded to N


class SelfAttention(nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v, pad):
        if self.causal:
            mask = torch.ones(N, N, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=pad[:, None, None, :])


class Stack(nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.layers = nn.ModuleList([SelfAttention(causal), SelfAttention(causal)])

    def forward(self, q, k, v, pad):
        for i, layer in enumerate(self.layers):
            v = layer(q * (1 + i), k, v, pad)  # layer 1 sees sharper attention
        return v


def inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (1.5 * torch.randn(B, H, N, D, generator=g) for _ in range(3))
    pad = torch.zeros(B, N, dtype=torch.bool)
    for b, n in enumerate(LENGTHS):
        pad[b, :n] = True
    return q, k, v, pad


def reference_block(q, k, b, h, layer, causal):
    """float64 attention of the valid tokens of batch element b, head h (pad tokens removed)."""
    n = LENGTHS[b]
    qq = q[b, h, :n].double().numpy() * (1 + layer)
    kk = k[b, h, :n].double().numpy()
    s = qq @ kk.T / math.sqrt(D)
    if causal:
        s = np.where(np.tril(np.ones((n, n), bool)), s, -np.inf)
    s = s - s.max(1, keepdims=True)
    p = np.exp(s)
    return p / p.sum(1, keepdims=True), qq, kk


def expected_metrics(p, qq, kk, causal):
    valid = np.tril(np.ones(p.shape, bool)) if causal else np.ones(p.shape, bool)
    vals = p[valid]
    logs = np.log(vals)
    ev = np.sort(np.abs(np.linalg.eigvals(p)))[::-1]
    ks = scipy.stats.kstest(logs, "norm", args=(logs.mean(), logs.std()))
    sq, sk = qq.std(ddof=1), kk.std(ddof=1)
    return {
        "entropy": np.mean([scipy.stats.entropy(row[m]) for row, m in zip(p, valid)]),
        "spectral_gap": 1 - ev[1],
        "p_mean": vals.mean(),
        "p_var": vals.var(),
        "logp_mean": logs.mean(),
        "logp_var": logs.var(),
        "lognormal_mu": logs.mean(),
        "lognormal_sigma": logs.std(),
        "lognormal_ks": ks.statistic,
        "lognormal_ks_pvalue": ks.pvalue,
        "lognormal_skew": scipy.stats.skew(logs),
        "lognormal_excess_kurtosis": scipy.stats.kurtosis(logs),
        "sigma_q": sq,
        "sigma_k": sk,
        "temperature": 1 / (sq * sk),
    }


@pytest.fixture(scope="module", params=[False, True], ids=["bidirectional", "causal"])
def recorded(request):
    causal = request.param
    q, k, v, pad = inputs()
    model = Stack(causal)
    with attnstats.record(model) as rec:
        model(q, k, v, pad)
    return causal, q, k, rec


def test_frame_columns_and_shape(recorded):
    causal, q, k, rec = recorded
    df = rec.frame()
    assert list(df.columns) == ["call", "layer", "name", "head", "batch", "metric", "value"]
    assert df["head"].dtype == "Int64" and df["batch"].dtype == "Int64" and df["value"].dtype == "float64"
    assert df.batch.isna().all()  # batch="mean" by default
    assert set(df.name) == {"layers.0", "layers.1"}
    per_matrix = 1 + 1 + 7 + 4 + 3  # entropy, gap, lognormal, moments, temperature
    assert len(df) == 2 * H * per_matrix


def test_frame_values_against_numpy_and_scipy(recorded):
    causal, q, k, rec = recorded
    df = rec.frame(batch="each")
    for layer in (0, 1):
        for b in range(B):
            for h in range(H):
                p, qq, kk = reference_block(q, k, b, h, layer, causal)
                want = expected_metrics(p, qq, kk, causal)
                got = df[(df.layer == layer) & (df.batch == b) & (df["head"] == h)].set_index("metric").value
                for metric, value in want.items():
                    assert got[metric] == pytest.approx(value, rel=1e-6, abs=1e-9), (layer, b, h, metric)


def test_frame_aggregation_is_explicit(recorded):
    causal, q, k, rec = recorded
    each = rec.frame(metrics=("entropy", "temperature"), batch="each", head="each")
    mean_b = rec.frame(metrics=("entropy", "temperature"))
    mean_bh = rec.frame(metrics="entropy", batch="mean", head="mean")
    manual = each.groupby(["layer", "head", "metric"]).value.mean()
    got = mean_b.set_index(["layer", "head", "metric"]).value
    pd.testing.assert_series_equal(got.sort_index(), manual.sort_index(), check_names=False, rtol=1e-12)
    manual_bh = each[each.metric == "entropy"].groupby("layer").value.mean()
    assert mean_bh.value.to_numpy() == pytest.approx(manual_bh.to_numpy(), rel=1e-12)
    assert mean_bh["head"].isna().all() and len(mean_bh) == 2
    with pytest.raises(ValueError, match="batch"):
        rec.frame(batch="sum")
    with pytest.raises(ValueError, match=r"metrics\[0\]"):
        rec.frame(metrics=("entropie",))


@contextlib.contextmanager
def stats_run(streaming: bool):
    """Around a store="stats" recording: short calls take the dense statistics of the whole batch;
    ``streaming=True`` makes every call long (threshold 2 tokens), for the streaming path. Only the
    recording is patched, so a store="qk" frame() stays dense, the independent side."""
    with pytest.MonkeyPatch.context() as mp:
        if streaming:
            mp.setattr(attnstats.metrics, "STREAMING_FROM_TOKENS", 2)
        yield


@pytest.mark.parametrize("streaming", [False, True], ids=["dense", "streaming"])
def test_store_stats_equals_dense(recorded, streaming):
    causal, q, k, rec = recorded
    model = Stack(causal)
    qq, kk, v, pad = inputs()
    with stats_run(streaming), attnstats.record(model, store="stats") as rs:
        model(qq, kk, v, pad)
    assert all(r.q is None and r.k is None for r in rs.records)
    with pytest.raises(ValueError, match="store='stats'"):
        rs.records[0].probs()
    dense = rec.frame(batch="each").set_index(["layer", "head", "batch", "metric"]).value.sort_index()
    streamed = rs.frame(batch="each").set_index(["layer", "head", "batch", "metric"]).value.sort_index()
    assert list(streamed.index) == list(dense.index)
    np.testing.assert_allclose(streamed.to_numpy(), dense.to_numpy(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("streaming", [False, True], ids=["dense", "streaming"])
def test_store_stats_with_grouped_key_heads_equals_dense(causal, streaming):
    # Without a mask, store="stats" keeps grouped key heads grouped (each read for its query heads, no
    # copy); store="qk" repeats them, and its frame() is the dense side. Same tolerance as above.
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 12, D, generator=g) * 1.5
    k = torch.randn(2, 2, 12, D, generator=g)
    v = torch.randn(2, 2, 12, D, generator=g)

    class GQA(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    with attnstats.record(GQA()) as rec:
        GQA()(q, k, v)
    assert rec.records[0].k.shape[1] == 4
    with stats_run(streaming), attnstats.record(GQA(), store="stats") as rs:
        GQA()(q, k, v)
    dense = rec.frame(batch="each").set_index(["layer", "head", "batch", "metric"]).value.sort_index()
    streamed = rs.frame(batch="each").set_index(["layer", "head", "batch", "metric"]).value.sort_index()
    assert list(streamed.index) == list(dense.index)
    assert "spectral_gap" in set(dense.index.get_level_values("metric"))
    np.testing.assert_allclose(streamed.to_numpy(), dense.to_numpy(), rtol=1e-6, atol=1e-9)


def test_alongside_kernels_side_by_side(recorded):
    causal, q, k, rec0 = recorded
    model = Stack(causal)
    qq, kk, v, pad = inputs()
    with attnstats.record(model, alongside=["lln", "relu"]) as rec:
        model(qq, kk, v, pad)
    df = rec.frame(metrics=("entropy", "spectral_gap", "temperature"), batch="each")
    assert list(df.columns) == ["call", "layer", "name", "kernel", "head", "batch", "metric", "value"]
    assert set(df.kernel) == {"softmax", "lln", "relu"}
    assert set(df[df.kernel != "softmax"].metric) == {"entropy", "spectral_gap"}
    # softmax rows are those of a record without kernels
    plain = rec0.frame(metrics=("entropy", "spectral_gap", "temperature"), batch="each")
    soft = df[df.kernel == "softmax"].drop(columns="kernel").reset_index(drop=True)
    pd.testing.assert_frame_equal(soft, plain)
    # ReLU linear attention written out in float64 on the valid tokens (no temperature: scale-free)
    layer, b, h = 1, 1, 2
    n = LENGTHS[b]
    fq = np.maximum(qq[b, h, :n].double().numpy() * 2, 0)
    fk = np.maximum(kk[b, h, :n].double().numpy(), 0)
    a = fq @ fk.T
    if causal:
        a = np.tril(a)
    p = a / a.sum(1, keepdims=True)
    valid = np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)
    want_h = np.mean([scipy.stats.entropy(row[m]) for row, m in zip(p, valid)])
    want_gap = 1 - np.sort(np.abs(np.linalg.eigvals(p)))[::-1][1]
    got = df[(df.kernel == "relu") & (df.layer == layer) & (df.batch == b) & (df["head"] == h)].set_index("metric").value
    assert got["entropy"] == pytest.approx(want_h, rel=1e-6)
    assert got["spectral_gap"] == pytest.approx(want_gap, rel=1e-6, abs=1e-9)
    # probs(kernel=...) gives the kernel's dense matrix on the same q, k
    pk = rec.records[layer].probs(kernel="relu")[b, h, :n, :n].double().numpy()
    np.testing.assert_allclose(pk, p, rtol=1e-5, atol=1e-7)


def test_cross_attention_frame():
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 2, 4, D, generator=g), torch.randn(1, 2, 7, D, generator=g), torch.randn(1, 2, 7, D, generator=g)
    keep = torch.tensor([True] * 5 + [False] * 2)

    class Cross(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[None, :])

    with attnstats.record(Cross()) as rec:
        Cross()(q, k, v)
    df = rec.frame(metrics=("entropy", "spectral_gap", "moments"), batch="each")
    assert "spectral_gap" not in set(df.metric)  # no spectrum for a 4×7 matrix
    for h in range(2):
        s = q[0, h].double().numpy() @ k[0, h, :5].double().numpy().T / math.sqrt(D)
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        got = df[df["head"] == h].set_index("metric").value
        assert got["entropy"] == pytest.approx(np.mean(scipy.stats.entropy(p, axis=1)), rel=1e-9)
        assert got["p_var"] == pytest.approx(p.var(), rel=1e-9)
        assert got["logp_mean"] == pytest.approx(np.log(p).mean(), rel=1e-9)


def test_store_stats_metrics_choice():
    q, k, v, pad = inputs()
    model = Stack(causal=True)
    with attnstats.record(model, store="stats", metrics=("entropy", "spectral_gap")) as rs:
        model(q, k, v, pad)
    df = rs.frame()
    assert set(df.metric) == {"entropy", "spectral_gap", "temperature", "sigma_q", "sigma_k"}
    with pytest.raises(ValueError, match="metrics"):
        attnstats.record(model, metrics=("entropy",))


@pytest.mark.parametrize("streaming", [False, True], ids=["dense", "streaming"])
def test_store_stats_warns_when_a_general_mask_leaves_out_the_gap(streaming):
    class Masked(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) > 0.3
    mask |= torch.eye(8, dtype=torch.bool)  # every row keeps a key
    with pytest.warns(RuntimeWarning, match="spectral gap is not computed without the matrix"):
        with stats_run(streaming), attnstats.record(Masked(), store="stats") as rec:
            Masked()(q, k, v, mask)
    f = rec.frame()
    assert "spectral_gap" not in set(f.metric) and "entropy" in set(f.metric)


def test_store_stats_takes_a_bias_on_short_calls_and_refuses_it_on_long_ones(monkeypatch):
    # An additive float mask is a bias the streaming statistics do not model. A short call gets the dense
    # statistics of its batch, bias included: the numbers of store="qk" + frame() on the same call,
    # checked against the entropy of a float64 softmax written out here.
    class Biased(torch.nn.Module):
        def forward(self, q, k, v, bias):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 9, 4, generator=g) for _ in range(3))
    bias = torch.randn(9, 9, generator=g)
    with torch.no_grad(), attnstats.record(Biased()) as dense:
        Biased()(q, k, v, bias)
    with torch.no_grad(), attnstats.record(Biased(), store="stats") as st:
        Biased()(q, k, v, bias)
    key = ["layer", "head", "batch", "metric"]
    a = dense.frame(batch="each").set_index(key).value.sort_index()
    b = st.frame(batch="each").set_index(key).value.sort_index()
    assert list(a.index) == list(b.index)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-12, atol=1e-12)  # the same dense arithmetic
    s = q.double() @ k.double().transpose(-2, -1) / 2 + bias.double()
    p = torch.softmax(s, -1).numpy()
    want = scipy.stats.entropy(p, axis=-1).mean(-1)  # [B, H]
    got = b.xs("entropy", level="metric").to_numpy().reshape(3, 2).T  # index order (head, batch)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    monkeypatch.setattr(attnstats.metrics, "STREAMING_FROM_TOKENS", 2)  # now a long call: streaming only
    with pytest.raises(ValueError, match="adds an attention bias or softcap"):
        with torch.no_grad(), attnstats.record(Biased(), store="stats"):
            Biased()(q, k, v, bias)


def test_store_stats_reads_the_finiteness_of_long_calls_after_the_forward(monkeypatch):
    # Long calls queue their statistics without waiting for the device; a NaN in q is caught when the
    # block ends (one read for every layer), naming the layer, with every hook already removed.
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    monkeypatch.setattr(attnstats.metrics, "STREAMING_FROM_TOKENS", 2)
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    q[0, 1, 3, 2] = float("nan")
    model = Attn()
    with pytest.raises(ValueError, match=r"layer '.*': q or k holds NaN or Inf"):
        with torch.no_grad(), attnstats.record(model, store="stats", metrics=("entropy", "moments", "lognormal")):
            out = model(q, k, v)
    assert torch.equal(out.nan_to_num(7.0), model(q, k, v).nan_to_num(7.0))  # the forward ran, unchanged
    with attnstats.record(model, store="stats", metrics=("entropy",)) as rec:  # hooks were removed: a new block works
        model(q.nan_to_num(), k, v)
    assert len(rec.frame()) > 0


# ---- the log-normal fit: store="stats" and the dense path take the same ln P entries ----------------

LOGNORMAL = [f"lognormal_{m}" for m in ("mu", "sigma", "ks", "ks_pvalue", "ad", "skew", "excess_kurtosis")]


def both_ways(model, inputs, metrics, streaming=False):
    """rec.frame(batch="each") of a dense (store="qk") and a store="stats" recording of one forward
    (on its streaming path if ``streaming``)."""
    with torch.no_grad(), attnstats.record(model) as dense:
        model(**inputs)
    with stats_run(streaming), torch.no_grad(), \
            attnstats.record(model, store="stats", metrics=[m for m in metrics if m != "temperature"]) as st:
        model(**inputs)
    key = ["layer", "head", "batch", "metric"]
    a = dense.frame(metrics=metrics, batch="each").set_index(key).value.sort_index()
    b = st.frame(metrics=metrics, batch="each").set_index(key).value.sort_index()
    assert list(a.index) == list(b.index)
    return a, b, dense


@pytest.mark.parametrize("streaming", [False, True], ids=["dense", "streaming"])
def test_store_stats_equals_dense_on_minilm(streaming):
    # Sentences of ~10 tokens: every valid entry is used both ways (far fewer than max_samples). The
    # values of ln P agree to ~1e-15 (float64 softmax vs s − LSE), so every fit agrees to ~1e-10; the
    # spectral gap to the eigen-solvers' 1e-10.
    from attnstats.app.models import load_model

    model, tok = load_model()
    enc = tok(["A cat sat on the mat.", "Attention maps, measured without eager mode at all."],
              padding=True, return_tensors="pt")
    a, b, _ = both_ways(model, dict(enc), ("entropy", "spectral_gap", "lognormal", "moments"), streaming)
    assert set(LOGNORMAL) <= set(a.index.get_level_values("metric"))
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("streaming", [False, True], ids=["dense", "streaming"])
def test_store_stats_lognormal_equals_dense_where_it_samples(streaming):
    # 400 tokens: batch element 0 has 160 000 valid entries per head, more than max_samples = 100 000,
    # so both paths sample, drawing the same ranks of the same enumeration; element 1 (310 real
    # tokens, 96 100 entries) uses every entry. Agreement to float rounding either way.
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(1, 100, (2, 400), generator=torch.Generator().manual_seed(1))
    att = torch.ones(2, 400, dtype=torch.long)
    att[1, 310:] = 0
    a, b, dense = both_ways(model, {"input_ids": ids, "attention_mask": att}, ("lognormal",), streaming)
    # n is no frame metric: the sizes from the dense fit itself
    fit = attnstats.lognormal_fit(dense.records[0].probs(dtype=torch.float64), dense.records[0].stats_mask())
    assert fit.n[0].tolist() == [100_000, 100_000] and fit.n[1].tolist() == [310**2, 310**2]
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-9, atol=1e-12)


def test_store_stats_frame_cannot_redraw_the_sample(recorded):
    causal, q, k, rec = recorded
    qq, kk, v, pad = inputs()
    with attnstats.record(Stack(causal), store="stats") as rs:
        Stack(causal)(qq, kk, v, pad)
    with pytest.raises(ValueError, match=r"max_samples, seed: .*drawn during the forward with max_samples=100000, seed=0"):
        rs.frame(max_samples=50)
    rs.frame(metrics=("entropy",), max_samples=50)  # no log-normal fit asked for: nothing to redraw


# ---- large records: statistics from q, k without the dense matrix ----------------------------------


def test_large_records_get_the_dense_numbers_from_q_and_k(recorded, monkeypatch):
    from attnstats.capture.record import AttentionRecord

    causal, q, k, rec = recorded
    dense = {ms: rec.frame(batch="each", max_samples=ms) for ms in (100_000, 20)}  # every entry; a sample
    monkeypatch.setattr(attnstats.metrics, "STREAMING_FROM_TOKENS", 2)  # N = 12: "large"

    def no_dense(*args, **kwargs):
        raise AssertionError("the dense matrix was built")

    monkeypatch.setattr(AttentionRecord, "probs", no_dense)
    for ms, want in dense.items():
        got = rec.frame(batch="each", max_samples=ms)
        pd.testing.assert_frame_equal(got.drop(columns="value"), want.drop(columns="value"))
        np.testing.assert_allclose(got.value.to_numpy(), want.value.to_numpy(), rtol=1e-9, atol=1e-12)


def test_records_past_the_memory_budget_get_their_statistics_from_q_and_k(recorded):
    causal, q, k, rec = recorded
    want = rec.frame(batch="each")
    with attnstats.memory_budget(B * H * N * N * 8 - 1):  # the float64 [B, H, N, N] matrix does not fit
        with pytest.raises(attnstats.DenseTooLargeError):
            rec.records[0].probs(dtype=torch.float64)
        got = rec.frame(batch="each")
    np.testing.assert_allclose(got.value.to_numpy(), want.value.to_numpy(), rtol=1e-9, atol=1e-12)
