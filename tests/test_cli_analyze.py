"""attnstats analyze through its entry point: files written, exit codes, errors without tracebacks."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import attnstats
from attnstats.app.cli import main
from attnstats.app.models import load_model


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "attnstats", *args], capture_output=True, text=True, cwd=cwd,
                          env={"HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "PATH": "/usr/bin:/bin",
                               **{k: v for k, v in __import__("os").environ.items() if k in ("HOME", "PYTHONPATH")}})


def test_analyze_default_model_writes_stats_and_plots(tmp_path):
    text = tmp_path / "s.txt"
    text.write_text("The cat sat on the mat.\n\nAttention is what a transformer computes between tokens of a sentence.\n")
    r = run("analyze", "--text", str(text), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(tmp_path / "out" / "stats.csv")
    assert list(df.columns) == ["call", "layer", "name", "kernel", "head", "batch", "metric", "value"]
    assert set(df.kernel) == {"softmax", "lln"} and df.layer.nunique() == 6 and df["head"].nunique() == 12
    assert {"entropy", "spectral_gap", "temperature", "lognormal_sigma", "p_var"} <= set(df.metric)
    for png in ("concentration.png", "lognormal.png"):
        assert (tmp_path / "out" / png).stat().st_size > 10_000
    assert "entropy" in r.stdout and "wrote" in r.stdout


def test_analyze_user_errors_have_no_traceback(tmp_path, capsys):
    def error(*args):
        assert main(["analyze", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("attnstats analyze: error: "), err
        return err

    assert "is not a folder with a config.json" in error("--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert "is a directory" in error("--text", str(tmp_path), "--out", str(tmp_path / "o"))
    assert "--text: no such file" in error("--text", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o"))
    blocker = tmp_path / "f"
    blocker.write_text("")
    assert "cannot create the output folder" in error("--sentences", "a b c", "--out", str(blocker / "x"))
    assert "--alongside: unknown kernel 'nonsense'" in error("--alongside", "lln", "nonsense", "--out", str(tmp_path / "o"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the failed runs removed the folders they made
    with pytest.raises(SystemExit) as exit:
        main(["analyze", "--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0 and "--model" in out and "--alongside" in out


# ---- in-process runs: three short sentences of different lengths, so that a batch of them is padded ----

TEXTS = ["The cat sat on the mat.", "Attention is what a transformer computes between the tokens of a sentence.",
         "Dogs bark."]
ROW = ["call", "layer", "name", "kernel", "head", "metric"]
# q and k come from float32 forward passes of differently padded batches and differ by ~1e-7 relative
# (sigma_q: 7e-8); the float64 statistics of ln P, which magnifies small entries, then move by up to
# 5e-6 (measured on these sentences): 5e-5 leaves a tenfold margin and is far below the 0.1–1 that a
# wrong average or LLN's α, β taken over a padded batch give.
ATOL = 5e-5


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    """``analyze_model`` on TEXTS, two sentences per forward pass, with the lognormal figure's inputs kept."""
    import attnstats.app.analysis as analysis
    import attnstats.app.plot as plot

    out = tmp_path_factory.mktemp("batched")
    seen, notes = {}, []
    real_hist, real_save = plot.log_histograms, analysis.save_figure

    def hist(samples, fits):
        seen["samples"] = samples
        return real_hist(samples, fits)

    def save(fig, path, **kwargs):
        seen[Path(path).name] = fig
        return real_save(fig, path, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plot, "log_histograms", hist)
        mp.setattr(analysis, "save_figure", save)
        summary = analysis.analyze_model(None, TEXTS, out, batch_size=2, note=notes.append)
    return dict(summary=summary, stats=pd.read_csv(out / "stats.csv"), notes=notes, **seen)


@pytest.fixture(scope="module")
def alone(model):
    """Each sentence in a forward pass of its own (no padding): its records and ``frame()``."""
    net, tok = model
    runs = []
    for s in TEXTS:
        with torch.no_grad(), attnstats.record(net, alongside=["lln"]) as rec:
            net(**tok([s], return_tensors="pt"))
        runs.append((rec.records, rec.frame()))
    return runs


def test_batched_statistics_equal_one_forward_pass_per_sentence(batched, alone):
    stats = batched["stats"]
    assert list(stats.columns) == ["call", "layer", "name", "kernel", "head", "batch", "metric", "value"]
    assert stats.batch.isna().all() and not stats.duplicated(ROW).any()
    ref = pd.concat([f for _, f in alone]).groupby(ROW).value.agg(lambda v: np.nanmean(v.to_numpy()))
    got = stats.set_index(ROW).value
    assert len(got) == len(ref) == 2088  # 6 layers × 12 heads × (16 softmax + 13 lln metrics)
    np.testing.assert_allclose(got.loc[ref.index].to_numpy(), ref.to_numpy(), rtol=1e-5, atol=ATOL)


def test_batched_softmax_statistics_equal_one_padded_batch(batched, model):
    # the captured attention's statistics do not depend on the padding: one padded batch of all
    # three sentences, averaged by rec.frame(batch="mean"), gives the same numbers
    net, tok = model
    with torch.no_grad(), attnstats.record(net) as rec:
        net(**tok(TEXTS, padding=True, return_tensors="pt"))
    ref = rec.frame().assign(kernel="softmax").set_index(ROW).value
    got = batched["stats"].set_index(ROW).value
    np.testing.assert_allclose(got.loc[ref.index].to_numpy(), ref.to_numpy(), rtol=1e-5, atol=ATOL)


def test_lognormal_figure_uses_the_entries_of_the_statistics(batched, alone, model):
    _, tok = model
    lengths = [len(ids) for ids in tok(TEXTS)["input_ids"]]
    samples, stats, summary = batched["samples"], batched["stats"], batched["summary"]
    fig = batched["lognormal.png"]
    mu = stats[(stats.kernel == "softmax") & (stats.metric == "lognormal_mu")].set_index(["layer", "head"]).value
    for layer in range(6):
        # reference: ln P of every query and key of each sentence alone, numpy float64 softmax
        per_sentence = []
        for records, _ in alone:
            r = records[layer]
            s = np.einsum("hqd,hkd->hqk", r.q[0].double().numpy(), r.k[0].double().numpy()) * r.scale
            per_sentence.append(s - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) - s.max(-1, keepdims=True))
        ref = np.sort(np.concatenate([lp.ravel() for lp in per_sentence]))
        got = np.sort(samples[samples.layer == layer].value.to_numpy())
        # all of them (fewer than the 20,000 drawn for the histogram): 12 heads × n² per sentence, pad
        # tokens neither queries nor keys (the padded batch's r.mask would add the pad-token rows)
        assert got.size == ref.size == 12 * sum(n * n for n in lengths)
        np.testing.assert_allclose(got, ref, atol=ATOL)  # sorting moves no value by more than the largest error
        # stats.csv's lognormal_mu of a head is the mean over sentences of that head's mean ln P
        head_mu = np.mean([lp.reshape(12, -1).mean(1) for lp in per_sentence], axis=0)
        np.testing.assert_allclose(mu.loc[layer].sort_index().to_numpy(), head_mu, atol=ATOL)
        title = fig.axes[layer].get_title()
        assert f"pooled σ = {ref.std():.3g} over {ref.size:,} entries" in title
        assert f"mean per-head σ = {summary.loc[(layer, 'softmax'), 'lognormal_sigma']:.3g}" in title
    assert "pooled" in fig._suptitle.get_text() and "averages the fits" in fig._suptitle.get_text()


def test_max_tokens_beyond_the_model_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    import attnstats.capture

    monkeypatch.setattr(attnstats.capture, "record", lambda *a, **k: pytest.fail("the work started"))
    for n in ("100000", str(10**20)):
        assert main(["analyze", "--sentences", "a cat", "--max-tokens", n, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"attnstats analyze: error: --max-tokens: all-MiniLM-L6-v2 takes at most 512 tokens per "
                       f"sequence (tokenizer model_max_length / config max_position_embeddings), got {n}")
    assert not (tmp_path / "o").exists()


def test_dense_attention_over_the_budget_is_refused_before_the_work(tmp_path, capsys, monkeypatch, model):
    import attnstats.capture

    monkeypatch.setattr(attnstats.capture, "record", lambda *a, **k: pytest.fail("the work started"))
    n = len(model[1]("The cat sat on the mat.")["input_ids"])
    budget = 1000  # bytes: 12 heads × n² float64 entries fit for n ≤ sqrt(1000 / 96), n = 3
    with attnstats.memory_budget(budget):
        assert main(["analyze", "--sentences", "The cat sat on the mat.", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"attnstats analyze: error: --max-tokens: a sentence of {n} tokens needs 12×{n}×{n} float64 "
                   f"attention entries per layer ({12 * n * n * 8 / 1024:.3g} KiB), more than the memory budget of "
                   f"{budget} bytes; use at most {math.isqrt(budget // (12 * 8))} tokens")


def test_dense_error_during_the_work_is_one_line(tmp_path, capsys, monkeypatch):
    import attnstats.app.analysis

    def too_large(*args, **kwargs):
        attnstats.budget.check_dense_fits((1, 12, 10**5, 10**5), 8)

    monkeypatch.setattr(attnstats.app.analysis, "analyze_model", too_large)
    assert main(["analyze", "--sentences", "a", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnstats analyze: error: the dense attention matrix of shape (1, 12, 100000, 100000)")
    assert err.endswith("lower --max-tokens") and "\n" not in err and not (tmp_path / "o").exists()


def test_alongside_softmax_truncation_and_progress(tmp_path, capsys, monkeypatch, model):
    _, tok = model
    texts = ["The cat sat on the mat.", "Dogs bark loudly at night."]
    longest = max(len(ids) for ids in tok(texts)["input_ids"])
    monkeypatch.setenv("ATTNSTATS_PROGRESS", "1")
    code = main(["analyze", "--sentences", *texts, "--alongside", "softmax", "lln", "lln", "--max-tokens", "4",
                 "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert ("attnstats analyze: note: --alongside softmax: the captured attention is softmax attention, always "
            "in stats.csv as kernel 'softmax'; it is not run a second time") in err
    assert (f"attnstats analyze: note: 2 of 2 documents are longer than 4 tokens (the longest has {longest}) and "
            f"were truncated to 4; --max-tokens up to 512 keeps more") in err
    assert "2/2" in err and "doc" in err and "tokens_per_s" in err  # the progress bar, with the throughput
    stats = pd.read_csv(tmp_path / "stats.csv")
    assert set(stats.kernel) == {"softmax", "lln"} and not stats.duplicated(ROW).any()
