"""The metric table on records with attention sinks and on P-only records, against numpy / scipy.

A sink is one more softmax column per row: the references here append the sink logit to each row of
float64 scores, take the softmax with numpy, and compute every statistic from that with numpy and
scipy. The rule they check (attnstats/metrics.py, docs/theory.md §9): entropy over the keys and the
sink; moments and the log-normal fit over the key entries as the model used them; the spectral gap of
the key block with its rows renormalised; ``sink_mass`` the mean sink probability over valid rows.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import scipy.stats
import torch

import attnstats
from attnstats import metrics
from attnstats.capture.record import AttentionRecord
from attnstats.frame import records_frame

pytestmark = pytest.mark.usefixtures("one_thread")

FIELDS = {f.name for f in dataclasses.fields(AttentionRecord)}
needs_sinks = pytest.mark.skipif("sinks" not in FIELDS, reason="AttentionRecord has no 'sinks' field yet")
needs_p = pytest.mark.skipif("p" not in FIELDS, reason="AttentionRecord has no 'p' field (P-only records) yet")

B, H, N, D = 2, 3, 12, 8
LENGTHS = [12, 8]  # batch element 1 is right-padded to N
SCALE = D**-0.5
# Every metric below is float64 arithmetic over at most 13 entries per row and 144 per matrix, in
# attnstats and in the reference alike: sums agree to ~1e-15 relative, LAPACK eigenvalues of a 12×12
# matrix to ~1e-13, and scipy's KS p-value is a smooth function of the statistic. 1e-9 leaves room
# for all of it and still catches any change of rule (a renormalised row moves p_mean by the sink mass).
REL, ABS = 1e-9, 1e-12


def qk(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (1.5 * torch.randn(B, H, N, D, generator=g) for _ in range(2))  # float32, as a model's


def padding():
    pad = torch.zeros(B, 1, 1, N, dtype=torch.bool)
    for b, n in enumerate(LENGTHS):
        pad[b, ..., :n] = True
    return pad


def sink_logits(kind):
    if kind == "per_head":  # one learned logit per head (GPT-OSS)
        return torch.tensor([0.5, 2.0, -1.0]).reshape(1, H, 1)
    return 2.0 * torch.randn(B, H, N, generator=torch.Generator().manual_seed(1))  # one per row


def reference(q, k, sinks, b, h, causal):
    """float64 softmax over the valid keys and the sink of matrix (b, h), pad tokens removed; its statistics."""
    n = LENGTHS[b]
    s = q[b, h, :n].double().numpy() @ k[b, h, :n].double().numpy().T * SCALE
    valid = np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)
    sink = sinks.double().expand(B, H, N)[b, h, :n].numpy()
    full = np.concatenate([np.where(valid, s, -np.inf), sink[:, None]], 1)  # [n, n + 1]
    full = np.exp(full - full.max(1, keepdims=True))
    full /= full.sum(1, keepdims=True)
    p, p_sink = full[:, :n], full[:, n]
    keys = p[valid]
    logs = np.log(keys)
    mu, sigma = logs.mean(), logs.std()
    p_hat = p / p.sum(1, keepdims=True)
    ev = np.sort(np.abs(np.linalg.eigvals(p_hat)))[::-1]
    return {
        "entropy": np.mean([scipy.stats.entropy(np.append(row[m], ps)) for row, m, ps in zip(p, valid, p_sink)]),
        "spectral_gap": 1 - ev[1],
        "lognormal_mu": mu,
        "lognormal_sigma": sigma,
        "lognormal_ks": scipy.stats.kstest(logs, scipy.stats.norm(mu, sigma).cdf).statistic,
        "lognormal_ks_pvalue": scipy.stats.kstest(logs, scipy.stats.norm(mu, sigma).cdf).pvalue,
        "lognormal_ad": scipy.stats.anderson(logs, dist="norm", method="interpolate").statistic,
        "lognormal_skew": scipy.stats.skew(logs),
        "lognormal_excess_kurtosis": scipy.stats.kurtosis(logs),
        "p_mean": keys.mean(),
        "p_var": keys.var(),
        "logp_mean": mu,
        "logp_var": logs.var(),
        "sink_mass": p_sink.mean(),
    }


def sink_record(causal=True, kind="per_head", sinks=None, seed=0):
    q, k = qk(seed)
    sinks = sink_logits(kind) if sinks is None else sinks
    return AttentionRecord("attn", 0, q, k, padding(), causal, SCALE, sinks=sinks), q, k, sinks


@needs_sinks
@pytest.mark.parametrize("kind", ["per_head", "per_row"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_sink_counts_as_one_more_key(causal, kind):
    rec, q, k, sinks = sink_record(causal, kind)
    got = metrics.record_metrics(rec)
    assert "temperature" not in got  # a hand-built record has no sigma_q, sigma_k
    for b in range(B):
        for h in range(H):
            want = reference(q, k, sinks, b, h, causal)
            assert set(want) <= set(got)
            for name, value in want.items():
                assert float(got[name][b, h]) == pytest.approx(value, rel=REL, abs=ABS), (b, h, name)
    # the key entries are those the model used, rows summing to 1 − p_sink (batch element 0 is unpadded)
    count = N * (N + 1) // 2 if causal else N * N
    for h in range(H):
        assert float(got["p_mean"][0, h]) * count == pytest.approx(N * (1 - float(got["sink_mass"][0, h])), rel=REL)


@needs_sinks
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_streaming_statistics_with_sinks_equal_the_dense_ones(causal, monkeypatch):
    rec, q, k, sinks = sink_record(causal, "per_row")
    # 30 of the 144 (78 causal) entries of a matrix: both fits draw the same sample, so they agree
    dense = metrics.record_metrics(rec, max_samples=30, seed=3)
    assert not metrics.uses_streaming(rec)
    monkeypatch.setattr(metrics, "STREAMING_FROM_TOKENS", 1)
    assert metrics.uses_streaming(rec)
    streamed = metrics.record_metrics(rec, max_samples=30, seed=3)
    assert list(streamed) == list(dense)
    for name in dense:
        # s − LSE' against ln of a float64 softmax: equal to float64 rounding of 13-term sums
        np.testing.assert_allclose(streamed[name].numpy(), dense[name].numpy(), rtol=1e-10, atol=1e-13, err_msg=name)
    groups = [g for g in metrics.METRICS if g != "temperature"]
    direct = metrics.streaming_values(q, k, rec.mask, causal, SCALE, groups, "attn", 30, 3, sinks=sinks)
    for name in direct:
        np.testing.assert_allclose(direct[name].numpy(), dense[name].numpy(), rtol=1e-10, atol=1e-13, err_msg=name)


@needs_sinks
def test_sink_mass_only_where_there_are_sinks():
    assert metrics.METRIC_NAMES["sinks"] == ("sink_mass",) and "sinks" in metrics.METRICS
    rec, q, k, sinks = sink_record()
    plain = dataclasses.replace(rec, sinks=None)
    assert "sink_mass" not in metrics.record_metrics(plain)
    assert set(metrics.record_metrics(rec, ("entropy", "sinks"))) == {"entropy", "sink_mass"}
    assert metrics.record_metrics(plain, ("sinks",)) == {}  # no row rather than a 0 nobody measured
    df = records_frame([rec, dataclasses.replace(plain, call=1)])  # the default metrics
    assert set(df[df.metric == "sink_mass"].call) == {0}
    assert len(df[df.call == 0]) == len(df[df.call == 1]) + H  # one sink_mass row per head, nothing else


@needs_sinks
def test_sink_at_minus_infinity_takes_nothing():
    rec, q, k, _ = sink_record(sinks=torch.full((1, H, 1), -math.inf))
    got = metrics.record_metrics(rec)
    want = metrics.record_metrics(dataclasses.replace(rec, sinks=None))
    # the sink's probability is 1 − Σ_j P'_ij: a float64 sum of at most 12 terms, 0 to a few ulps of 1
    assert float(got.pop("sink_mass").abs().max()) < 1e-15
    assert list(got) == list(want)
    for name in want:
        # the same softmax rows; the entropy adds −p ln p ≤ 4e-14 for p < 1e-15
        np.testing.assert_allclose(got[name].numpy(), want[name].numpy(), rtol=1e-12, atol=1e-13, err_msg=name)


@needs_sinks
def test_cross_attention_with_sinks():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 2, 5, D, generator=g), torch.randn(1, 2, 7, D, generator=g)
    keep = torch.tensor([True, True, False, True, True, False, True]).reshape(1, 1, 1, 7)
    sinks = torch.tensor([1.0, -0.5]).reshape(1, 2, 1)
    rec = AttentionRecord("cross", 0, q, k, keep, False, SCALE, sinks=sinks)
    got = metrics.record_metrics(rec)
    assert "spectral_gap" not in got  # no spectrum for a 5×5-of-7 matrix
    for h in range(2):
        s = q[0, h].double().numpy() @ k[0, h, keep[0, 0, 0]].double().numpy().T * SCALE
        full = np.exp(np.concatenate([s, np.full((5, 1), float(sinks[0, h, 0]))], 1))
        full /= full.sum(1, keepdims=True)
        p = full[:, :-1]
        assert float(got["entropy"][0, h]) == pytest.approx(scipy.stats.entropy(full, axis=1).mean(), rel=REL)
        assert float(got["sink_mass"][0, h]) == pytest.approx(full[:, -1].mean(), rel=REL)
        assert float(got["p_mean"][0, h]) == pytest.approx(p.mean(), rel=REL)
        assert float(got["logp_var"][0, h]) == pytest.approx(np.log(p).var(), rel=REL)


@needs_sinks
def test_bad_sinks_are_named():
    rec, *_ = sink_record()
    bad = torch.zeros(1, H, 1)
    bad[0, 2, 0] = math.nan
    with pytest.raises(ValueError, match=r"sinks: record 'attn'.*nan at index \(0, 2, 0\)"):
        metrics.record_metrics(dataclasses.replace(rec, sinks=bad))
    with pytest.raises(ValueError, match=r"sinks: .*\[B, H, Nq\] = \[2, 3, 12\].*\(4, 1\)"):
        metrics.record_metrics(dataclasses.replace(rec, sinks=torch.zeros(4, 1)))
    with pytest.raises(TypeError, match=r"sinks: .*torch.int64"):
        metrics.record_metrics(dataclasses.replace(rec, sinks=torch.zeros(1, H, 1, dtype=torch.int64)))
    with pytest.raises(ValueError, match=r"sinks: .*inf at index"):
        metrics.streaming_values(rec.q, rec.k, None, False, SCALE, ["entropy"], "attn", sinks=torch.full((1,), math.inf))


# ---- P-only records: q = k = None, rec.p holds the matrix --------------------------------------


def p_only(p, mask, causal, sinks=None):
    extra = {} if sinks is None else {"sinks": sinks}
    return AttentionRecord("p_only", 0, None, None, mask, causal, SCALE, p=p, **extra)


@needs_p
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_p_only_record_gets_the_dense_statistics_of_p(causal):
    q, k = qk(4)
    pad = padding()
    allowed = pad & (torch.ones(N, N, dtype=torch.bool).tril() if causal else True)
    s = (q.double() @ k.double().transpose(-1, -2) * SCALE).masked_fill(~allowed, -math.inf)
    p = torch.nan_to_num(torch.softmax(s, -1)).float()  # left-pad rows would be NaN; none here
    rec = p_only(p, pad, causal)
    assert rec.q is None and rec.k is None
    got = metrics.record_metrics(rec)
    assert not {"temperature", "sigma_q", "sigma_k", "sink_mass"} & set(got)  # no q, k: no temperature
    assert metrics.record_metrics(rec, kernel="lln") == {}  # kernels alongside need q, k
    for b in range(B):
        n = LENGTHS[b]
        block = p[b, :, :n, :n].double()  # pad tokens removed: every remaining entry is valid or causal-masked
        m = torch.ones(n, n, dtype=torch.bool).tril() if causal else None
        want = {
            "entropy": torch.nanmean(attnstats.row_entropy(block, m), -1),
            "spectral_gap": attnstats.spectral_gap(block, m),
            **metrics.moment_fields(attnstats.entry_moments(block, m)),
            **metrics.lognormal_fields(attnstats.lognormal_fit(block, m)),
        }
        for name, value in want.items():
            # the same float32 p read by the same float64 functions, once padded and once cut to size
            np.testing.assert_allclose(got[name][b].numpy(), value.numpy(), rtol=1e-10, atol=1e-13, err_msg=name)
        # and against numpy: float32 rows renormalised in float64, as attnstats reads every p
        for h in range(H):
            rows = block[h].numpy() / block[h].numpy().sum(1, keepdims=True)
            kept = [r[: i + 1] if causal else r for i, r in enumerate(rows)]
            assert float(got["entropy"][b, h]) == pytest.approx(np.mean([scipy.stats.entropy(r) for r in kept]), rel=REL)
            assert float(got["p_var"][b, h]) == pytest.approx(np.concatenate(kept).var(), rel=REL)


@needs_p
def test_p_only_record_samples_the_entries_lognormal_fit_samples():
    # max_samples below the valid entries of every matrix (144 and 64): both fits draw the entries of
    # sample_ranks for each matrix's flat index, so they fit the same values with the same float64 sums
    q, k = qk(5)
    pad = padding()
    s = (q.double() @ k.double().transpose(-1, -2) * SCALE).masked_fill(~pad, -math.inf)
    p = torch.softmax(s, -1).float()
    rec = p_only(p, pad, False)
    got = metrics.record_metrics(rec, ("lognormal",), max_samples=40, seed=3)
    valid = rec.stats_mask()  # the key padding, and pad tokens as queries
    want = metrics.lognormal_fields(attnstats.lognormal_fit(p, valid, max_samples=40, seed=3))
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(got[name].numpy(), value.numpy(), rtol=REL, atol=ABS, err_msg=name)
    unsampled = metrics.lognormal_fields(attnstats.lognormal_fit(p, valid, seed=3))
    assert not np.allclose(got["lognormal_mu"].numpy(), unsampled["lognormal_mu"].numpy(), rtol=1e-6)


@needs_p
@needs_sinks
def test_p_only_record_with_sinks():
    rec, q, k, sinks = sink_record(causal=True, kind="per_row")
    p = rec.probs(dtype=torch.float64)  # the key columns, rows summing to 1 − p_sink
    got = metrics.record_metrics(p_only(p, rec.mask, True, sinks))
    want = metrics.record_metrics(rec)
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(got[name].numpy(), want[name].numpy(), rtol=1e-12, atol=1e-15, err_msg=name)
    over = p.clone()
    over[0, 1, 3, :2] += 0.5
    with pytest.raises(ValueError, match=r"row \(0, 1, 3\) of the key columns sums to"):
        metrics.record_metrics(p_only(over, rec.mask, True, sinks))
