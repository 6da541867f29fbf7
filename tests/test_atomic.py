"""atomic.py: a file is replaced whole or not at all, with a plain new file's permissions."""
import os
import stat

import pytest

from runtime.atomic import atomic_path, write_text


def test_a_written_file_gets_the_mode_a_plain_open_would_give(tmp_path):
    write_text(str(tmp_path / "a.txt"), "x")
    with open(tmp_path / "plain.txt", "w") as f:
        f.write("x")
    mode = stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode)  # not mkstemp's owner-only 0600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    write_text(str(path), "old")
    with pytest.raises(RuntimeError):
        with atomic_path(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]
