"""common/atomic.py: a file or folder appears whole or not at all; a refused write leaves the old state."""

import os
import stat

import pytest

from feddem.common.atomic import atomic_file, atomic_folder, write_atomic


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_file_is_replaced_whole_and_a_failed_write_leaves_the_old_one(tmp_path):
    path = tmp_path / "sub" / "record.json"
    write_atomic(path, "old")
    assert path.read_text() == "old" and _mode(path) == 0o600
    with pytest.raises(ValueError):
        with atomic_file(path, text=True) as fh:
            fh.write("half of the new")
            raise ValueError("refused")
    assert path.read_text() == "old"
    assert os.listdir(path.parent) == ["record.json"]  # no temporary left
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"


def test_a_public_file_gets_the_mode_open_gives(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a", "x", private=False)
        write_atomic(tmp_path / "b", "x", private=False, durable=False)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a") == _mode(tmp_path / "b") == 0o640


def test_a_folder_appears_whole_replacing_an_empty_one(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not (out / "a.txt").exists()  # nothing under the name before the block ends
    assert (out / "a.txt").read_text() == "a"
    with pytest.raises(OSError):  # a folder with files is not replaced
        with atomic_folder(out) as tmp:
            (tmp / "b.txt").write_text("b")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["a.txt"]


def test_a_cache_folder_built_first_by_another_process_is_kept(tmp_path):
    cache = tmp_path / "cache"
    with atomic_folder(cache, complete="config.json") as tmp:
        (tmp / "config.json").write_text("mine")
        cache.mkdir()  # another process finishes first
        (cache / "config.json").write_text("theirs")
    assert (cache / "config.json").read_text() == "theirs" and sorted(os.listdir(tmp_path)) == ["cache"]
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "never", complete="config.json") as tmp:
            (tmp / "config.json").write_text("x")
            raise RuntimeError("conversion failed")
    assert sorted(os.listdir(tmp_path)) == ["cache"]
