import os
import stat

import pandas as pd
import pytest

from attnstats.app.files import atomic_path, write_csv, write_text


def test_written_whole_with_ordinary_permissions(tmp_path):
    p = write_text(tmp_path / "a" / "x.txt", "hello")
    assert p.read_text() == "hello"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask
    write_csv(pd.DataFrame({"a": [1, 2]}), tmp_path / "t.csv")
    assert pd.read_csv(tmp_path / "t.csv").a.tolist() == [1, 2]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_leaves_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "x.csv"
    target.write_text("old")
    with pytest.raises(error):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise error()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.csv"]
