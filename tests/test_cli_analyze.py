"""attnstats analyze through its entry point: files written, exit codes, errors without tracebacks."""
import subprocess
import sys

import pandas as pd


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


def test_analyze_user_errors_have_no_traceback(tmp_path):
    r = run("analyze", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "is not a folder with a config.json" in r.stderr and "Traceback" not in r.stderr
    r = run("analyze", "--text", str(tmp_path), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "is a directory" in r.stderr and "Traceback" not in r.stderr
    r = run("analyze", "--text", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--text: no such file" in r.stderr and "Traceback" not in r.stderr
    blocker = tmp_path / "f"
    blocker.write_text("")
    r = run("analyze", "--sentences", "a b c", "--out", str(blocker / "x"))
    assert r.returncode == 2 and "cannot create the output folder" in r.stderr and "Traceback" not in r.stderr
    r = run("analyze", "--alongside", "lln", "nonsense", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "--alongside: unknown kernel 'nonsense'" in r.stderr and "Traceback" not in r.stderr
    r = run("analyze", "--help")
    assert r.returncode == 0 and "--model" in r.stdout and "--alongside" in r.stdout
