"""attnstats analyze over a corpus: the readers, resuming, refusing, and two processes under torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasketches")
pytest.importorskip("pyarrow")

from attnstats.app import analysis  # noqa: E402
from attnstats.app.cli import main  # noqa: E402
from attnstats.app.corpus import CorpusError, read_corpus  # noqa: E402
from attnstats.app.corpus_run import RunMismatchError, ShardFileError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    "Attention weights are positive and every row sums to one.",
    "A transformer layer mixes the tokens of a sequence with attention.",
    "Entropy measures how spread out a row of attention is.",
    "The spectral gap says how fast attention mixes information across tokens.",
    "Linear attention replaces the softmax by a product of feature maps.",
    "Log-normal entries follow when the scores are Gaussian.",
]
# exact under any split: the summary keeps Σx and Σx² as integers (tests/test_summary.py)
EXACT = ["kernel", "layer", "head", "metric", "count", "nan_count", "mean", "var", "min", "max"]


def write_corpus(path: Path) -> Path:
    path.write_text("\n\n".join(DOCS) + "\n")
    return path


# ---- readers ------------------------------------------------------------------------------------


def test_readers_of_every_format_give_the_same_documents(tmp_path):
    assert read_corpus(write_corpus(tmp_path / "c.txt")) == DOCS
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS)) + "\n")
    assert read_corpus(tmp_path / "c.jsonl", text_field="body") == DOCS
    pd.DataFrame({"text": DOCS, "n": range(6)}).to_parquet(tmp_path / "c.parquet")
    assert read_corpus(tmp_path / "c.parquet") == DOCS
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, d in enumerate(DOCS):
        (folder / f"{i:02d}.txt").write_text(d)
    (folder / "notes.bin").write_bytes(b"\x00")  # other files are not documents
    assert read_corpus(folder) == DOCS


def test_a_dataset_saved_with_datasets_is_read_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": DOCS, "n": list(range(6))}).save_to_disk(str(tmp_path / "ds"))
    assert read_corpus(tmp_path / "ds", text_field="body") == DOCS
    with pytest.raises(CorpusError, match=r"text_field: .*ds: no column 'text' \(columns: \['body', 'n'\]\)"):
        read_corpus(tmp_path / "ds")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": DOCS})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(CorpusError, match=r"holds the splits \['train'\]; give the folder of one split"):
        read_corpus(tmp_path / "dd")


def test_reader_errors_name_the_file_and_what_was_expected(tmp_path):
    with pytest.raises(CorpusError, match="corpus: no such file or folder"):
        read_corpus(tmp_path / "missing.txt")
    (tmp_path / "e.txt").write_text("\n\n  \n")
    with pytest.raises(CorpusError, match="holds no text"):
        read_corpus(tmp_path / "e.txt")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"body": "b"}) + "\n")
    with pytest.raises(CorpusError, match=r"c.jsonl, line 2: no field 'text' \(fields: \['body'\]\)"):
        read_corpus(tmp_path / "c.jsonl")
    pd.DataFrame({"body": DOCS}).to_parquet(tmp_path / "c.parquet")
    with pytest.raises(CorpusError, match=r"text_field: .*c.parquet: no column 'text' \(columns: \['body'\]\)"):
        read_corpus(tmp_path / "c.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(CorpusError, match="bad.parquet: not a readable Parquet file"):
        read_corpus(tmp_path / "bad.parquet")
    (tmp_path / "c.csv").write_text("a,b\n")
    with pytest.raises(CorpusError, match=r"unknown format \.csv"):
        read_corpus(tmp_path / "c.csv")


def test_command_reports_a_corpus_error_in_one_line(tmp_path, capsys):
    code = main(["analyze", "--corpus", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("attnstats analyze: error: --corpus: no such file or folder") and "\n" not in err
    assert not (tmp_path / "o").exists()


# ---- shards: resuming and refusing --------------------------------------------------------------


def run(out, **options):
    options = {"shard_size": 2, "batch_size": 2, "max_tokens": 12, "long": "split", "note": lambda m: None, **options}
    return analysis.analyze_model(None, DOCS, out, **options)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    run(out)
    return out


def test_an_interrupted_run_resumes_to_the_same_result(clean, tmp_path, monkeypatch):
    real = analysis._run_shard
    calls = []

    def stop_at_the_second_shard(net, tok, kernels, docs, first_doc, *args):
        calls.append(first_doc)
        if first_doc == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second shard runs
        return real(net, tok, kernels, docs, first_doc, *args)

    monkeypatch.setattr(analysis, "_run_shard", stop_at_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path)
    shards = tmp_path / "shards"
    assert sorted(p.name for p in shards.glob("shard-*")) == ["shard-00000.parquet", "shard-00000.summary"]
    assert not list(shards.glob(".*"))  # no temporary file left
    monkeypatch.setattr(analysis, "_run_shard", real)
    notes = []
    run(tmp_path, note=notes.append)
    assert any("resumed: 1 finished shard(s)" in n for n in notes)
    a, b = pd.read_csv(clean / "summary.csv"), pd.read_csv(tmp_path / "summary.csv")
    assert a[EXACT].equals(b[EXACT])  # the same bits
    pd.testing.assert_frame_equal(pd.read_csv(clean / "stats.csv"), pd.read_csv(tmp_path / "stats.csv"))
    seq_a = pd.concat([pd.read_parquet(p) for p in sorted((clean / "shards").glob("*.parquet"))], ignore_index=True)
    seq_b = pd.concat([pd.read_parquet(p) for p in sorted(shards.glob("*.parquet"))], ignore_index=True)
    pd.testing.assert_frame_equal(seq_a, seq_b)
    assert set(seq_a.doc) == set(range(6)) and seq_a.window.max() >= 1  # documents longer than 12 tokens split


def test_reading_the_shards_back_can_be_bounded(clean):
    from attnstats.app.corpus_run import read_sequences

    every, read, there = read_sequences(clean)
    assert (read, there) == (3, 3) and set(every.doc) == set(range(6))
    some, read, there = read_sequences(clean, max_shards=2)  # shards 0 and 1 of 0, 1, 2 (evenly spaced)
    assert (read, there) == (2, 3) and set(some.doc) == {0, 1, 2, 3}
    pd.testing.assert_frame_equal(some, every[every.doc < 4].reset_index(drop=True))


def test_summary_agrees_with_the_per_sequence_statistics(clean):
    seq = pd.concat([pd.read_parquet(p) for p in sorted((clean / "shards").glob("*.parquet"))], ignore_index=True)
    table = pd.read_csv(clean / "summary.csv").set_index(["kernel", "layer", "head", "metric"])
    g = seq.groupby(["kernel", "layer", "head", "metric"]).value
    want = pd.DataFrame({"count": g.count(), "mean": g.mean(), "var": g.var(ddof=1)})
    got = table.loc[want.index]
    assert (got["count"] == want["count"]).all()
    # pandas sums in float64 (rounding of a few ulp over ~10 values); the summary rounds exact sums once
    pd.testing.assert_series_equal(got["mean"], want["mean"], rtol=1e-12, check_names=False)
    pd.testing.assert_series_equal(got["var"], want["var"], rtol=1e-9, check_names=False)


def test_store_stats_gives_the_softmax_rows_of_store_qk(clean, tmp_path):
    # the statistics computed during the forward (short calls: the dense path of the whole batch) are
    # those of the kept q, k; no kernel alongside, no pooled ln P figure
    run(tmp_path, store="stats", alongside=())
    a = pd.read_csv(clean / "summary.csv")
    a = a[a.kernel == "softmax"].reset_index(drop=True)
    b = pd.read_csv(tmp_path / "summary.csv")
    assert set(b.kernel) == {"softmax"} and not (tmp_path / "lognormal.png").exists()
    pd.testing.assert_frame_equal(a[EXACT[:4]], b[EXACT[:4]])
    assert (a["count"] == b["count"]).all()
    # the same dense float64 arithmetic, batch for batch: equal to rounding
    for c in ("mean", "var", "min", "max"):
        pd.testing.assert_series_equal(a[c], b[c], rtol=1e-9, atol=1e-12)
    with pytest.raises(analysis.AnalysisInputError, match="store: store='stats' .* runs no kernel alongside"):
        run(tmp_path / "x", store="stats")
    with pytest.raises(analysis.AnalysisInputError, match="device: expected a torch device"):
        run(tmp_path / "x", device="gpu7")
    with pytest.raises(analysis.AnalysisInputError, match="dtype: expected a float dtype such as 'bfloat16', got 'int8'"):
        run(tmp_path / "x", dtype="int8")


def test_device_auto_spreads_the_model_and_gives_the_same_statistics(clean, tmp_path):
    # device_map="auto" (accelerate): on a machine without GPUs every layer lands on the CPU, so this
    # checks the loading path and that the statistics are those of the plain run
    pytest.importorskip("accelerate")
    run(tmp_path, device="auto")
    a, b = pd.read_csv(clean / "summary.csv"), pd.read_csv(tmp_path / "summary.csv")
    assert a[EXACT].equals(b[EXACT])
    assert json.loads((tmp_path / "shards" / "run.json").read_text())["device"] == "auto"


def test_a_run_with_other_arguments_or_a_damaged_shard_is_refused(clean, tmp_path):
    out = tmp_path / "o"
    run(out)
    with pytest.raises(RunMismatchError, match=r"holds a run with max_tokens = 12, this one has 16"):
        run(out, max_tokens=16)
    (out / "shards" / "shard-00002.parquet").write_bytes(b"PAR1 cut short")
    with pytest.raises(ShardFileError, match=r"shard-00002.parquet is missing or damaged; delete it"):
        run(out)
    (out / "shards" / "shard-00001.summary").write_bytes(b"garbage")
    with pytest.raises(ShardFileError, match=r"shard-00001.summary is damaged; delete it"):
        run(out)


def test_the_command_refuses_a_resumed_run_with_other_arguments_in_one_line(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.txt")
    base = ["analyze", "--corpus", str(corpus), "--out", str(tmp_path / "o"), "--shard-size", "3", "--alongside"]
    assert main(base + ["--max-tokens", "12"]) == 0
    capsys.readouterr()
    kept = sorted(p.name for p in (tmp_path / "o" / "shards").iterdir())
    assert main(base + ["--max-tokens", "16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnstats analyze: error: --out: ") and "max_tokens = 12, this one has 16" in err
    assert "\n" not in err and sorted(p.name for p in (tmp_path / "o" / "shards").iterdir()) == kept  # nothing lost


# ---- two processes ------------------------------------------------------------------------------


def test_two_gloo_processes_under_torchrun_give_the_one_process_summary(tmp_path):
    # Both runs as subprocesses with one thread each: the forward pass's float rounding depends on the
    # thread count, and the merge is to be compared, not BLAS.
    corpus = write_corpus(tmp_path / "c.txt")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), ATTNSTATS_PROGRESS="0")
    args = ["-m", "attnstats", "analyze", "--corpus", str(corpus), "--shard-size", "2", "--max-tokens", "12",
            "--long", "split", "--out"]
    one = subprocess.run([sys.executable, *args, str(tmp_path / "one")], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args, str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = pd.read_csv(tmp_path / "one" / "summary.csv"), pd.read_csv(tmp_path / "two" / "summary.csv")
    assert a[EXACT].equals(b[EXACT])
    # every shard of the corpus was written (the ranks split them: i % 2)
    assert sorted(p.name for p in (tmp_path / "two" / "shards").glob("*.summary")) == [
        "shard-00000.summary", "shard-00001.summary", "shard-00002.summary"]
