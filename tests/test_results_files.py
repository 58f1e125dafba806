"""Results files are written atomically: a failed write keeps the old file, the mode is open()'s."""

from __future__ import annotations

import os
import stat

import pytest

from fedcil.files import atomic_file, write_atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    write_atomic(path, "old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_atomic_files_get_the_mode_open_would_give(tmp_path):
    reference = tmp_path / "plain.txt"
    reference.write_text("x")
    write_atomic(tmp_path / "atomic.txt", "x")
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "atomic.txt") == mode(reference)
