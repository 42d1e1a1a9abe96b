"""attnstats analyze --model DIR with folders it must refuse: one line on stderr, exit code 2, no code
from the folder run, no output folder left behind."""
import json
import os
import subprocess
import sys

import pytest

from attnstats.app.cli import main
from attnstats.app.models import default_model_path

EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


def run(*args):
    """The command in a child process with stdin closed, as a script or a CI job runs it."""
    env = {"HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "ATTNSTATS_PROGRESS": "0", "OMP_NUM_THREADS": "1",
           "PATH": "/usr/bin:/bin", **{k: v for k, v in os.environ.items() if k in ("HOME", "PYTHONPATH")}}
    return subprocess.run([sys.executable, "-m", "attnstats", *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=env, timeout=120)


def one_line_error(r, *words):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("attnstats analyze: error: --model: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def folder(tmp_path, name, config, files=("vocab.txt",)):
    """A model folder: ``config`` as config.json, ``files`` linked from the packaged MiniLM."""
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    for f in files:
        (d / f).symlink_to(default_model_path() / f)
    return d


def test_remote_code_is_never_run(tmp_path):
    # the folder's model_type exists only in its own evil.py, which auto_map points to; transformers
    # would ask whether to run it (and run it on "y")
    marker = tmp_path / "marker"
    d = folder(tmp_path, "remote", {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                                       "AutoModel": "evil.EvilModel"}})
    (d / "evil.py").write_text(EVIL.format(marker=str(marker)))
    out = tmp_path / "new" / "out"
    r = run("analyze", "--model", str(d), "--sentences", "a cat", "--out", str(out))
    one_line_error(r, "needs its own Python code", "never runs code")
    assert not marker.exists()
    assert not (tmp_path / "new").exists()  # the output folder the failed run created is gone


def test_remote_tokenizer_code_is_never_run(tmp_path, capsys):
    # a known architecture whose tokenizer class lives in the folder's own code (in-process: pytest's
    # stdin cannot be read either)
    marker = tmp_path / "marker"
    config = json.loads((default_model_path() / "config.json").read_text())
    d = folder(tmp_path, "remote_tok", config, files=("vocab.txt", "model.safetensors"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    (d / "evil.py").write_text(EVIL.format(marker=str(marker)))
    assert main(["analyze", "--model", str(d), "--sentences", "a cat", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnstats analyze: error: --model: ") and "\n" not in err
    assert "needs its own Python code for its tokenizer" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_every_transformers_load_passes_trust_remote_code_false(monkeypatch):
    import transformers

    from attnstats.app.models import load_model

    calls = []

    def spy(cls):
        real = cls.from_pretrained

        def from_pretrained(*args, **kwargs):
            calls.append((cls.__name__, kwargs.get("trust_remote_code", "not given")))
            return real(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)

    spy(transformers.AutoTokenizer)
    spy(transformers.AutoModel)
    load_model()
    assert calls == [("AutoTokenizer", False), ("AutoModel", False)]


def test_unknown_model_type(tmp_path):
    d = folder(tmp_path, "unknown", {"model_type": "frobnicator", "hidden_size": 8})
    assert main(["analyze", "--model", str(d), "--sentences", "a cat", "--out", str(tmp_path / "o" / "p")]) == 2
    assert not (tmp_path / "o").exists()


def test_unknown_model_type_message(tmp_path, capsys):
    d = folder(tmp_path, "unknown", {"model_type": "frobnicator"})
    main(["analyze", "--model", str(d), "--sentences", "a cat", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnstats analyze: error: --model: ") and "model_type 'frobnicator'" in err
    assert "\n" not in err


def test_folder_without_tokenizer(tmp_path, capsys):
    config = json.loads((default_model_path() / "config.json").read_text())
    d = folder(tmp_path, "no_tokenizer", config, files=("model.safetensors",))
    assert main(["analyze", "--model", str(d), "--sentences", "a cat", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnstats analyze: error: --model: ") and "holds no tokenizer" in err and "\n" not in err


def test_tokenizer_that_knows_no_word(tmp_path, capsys):
    # a vocabulary of special tokens only: every word would become [UNK]
    config = json.loads((default_model_path() / "config.json").read_text())
    d = folder(tmp_path, "unk_only", config, files=("model.safetensors",))
    (d / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    code = main(["analyze", "--model", str(d), "--sentences", "The cat sat on the mat.", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "turns every word into its unknown token '[UNK]'" in err and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]"])
def test_unreadable_config(tmp_path, capsys, bad):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(bad)
    assert main(["analyze", "--model", str(d), "--sentences", "a", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "config.json" in err and "\n" not in err
