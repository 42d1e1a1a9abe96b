"""attnstats.app.progress: tqdm bars behind the ATTNSTATS_PROGRESS switch."""
import io

from attnstats.app.progress import progress, progress_enabled


def test_switch(monkeypatch):
    monkeypatch.delenv("ATTNSTATS_PROGRESS", raising=False)
    assert not progress_enabled(io.StringIO())  # not a terminal
    for value, on in (("1", True), ("yes", True), ("0", False), ("", False), ("off", False)):
        monkeypatch.setenv("ATTNSTATS_PROGRESS", value)
        assert progress_enabled(io.StringIO()) is on


def test_bar_drawn_when_forced(monkeypatch):
    monkeypatch.setenv("ATTNSTATS_PROGRESS", "1")
    stream = io.StringIO()
    assert list(progress(iter("abc"), total=3, desc="fig5a", stream=stream)) == ["a", "b", "c"]
    assert "fig5a" in stream.getvalue() and "3/3" in stream.getvalue()
    stream = io.StringIO()
    with progress(total=4, desc="analyze", stream=stream, unit="sentence") as bar:
        bar.update(1)
        bar.update(3)
    assert "4/4" in stream.getvalue() and "sentence" in stream.getvalue()


def test_silent_items_pass_through(monkeypatch):
    monkeypatch.setenv("ATTNSTATS_PROGRESS", "0")
    stream = io.StringIO()
    assert list(progress(range(5), desc="x", stream=stream)) == [0, 1, 2, 3, 4]
    with progress(total=2, stream=stream) as bar:
        bar.update(2)
    assert stream.getvalue() == ""
