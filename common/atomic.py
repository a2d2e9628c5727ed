"""Atomic writes: a file or a folder appears whole under its name, or not at all, and survives a crash once there.

A file is written to a hidden temporary sibling (`.<name>.<random>.tmp`, so a crash leaves nothing under the real
name), flushed and fsynced, renamed over the name (`os.replace`, one step), and the folder is fsynced so that the
rename itself is on disk. A folder is built the same way under a temporary sibling and renamed into place.
"""

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

TMP_SUFFIX = ".tmp"


def fsync_dir(folder: str | Path) -> None:
    """Make the entries of `folder` (a rename into it) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, text: bool = False, private: bool = True, durable: bool = True) -> Iterator[IO]:
    """An open file (binary, or text with `text`) whose content replaces `path` when the block ends without an
    error; on an error (the block may raise to refuse what it wrote) nothing is left behind and `path` is
    unchanged. The file is readable by its owner alone (0600: vectors, records), or with `private=False` has the
    mode `open` would give it (0666 less the umask). `durable=False` skips the fsyncs (the rename is still atomic,
    but a crash may lose the write): for files that only show progress."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "w" if text else "wb") as fh:
            yield fh
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes, private: bool = True, durable: bool = True) -> None:
    """Write `data` (text or bytes) to `path` atomically (`atomic_file`)."""
    with atomic_file(path, text=isinstance(data, str), private=private, durable=durable) as fh:
        fh.write(data)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


@contextmanager
def atomic_folder(path: str | Path, complete: str | None = None) -> Iterator[Path]:
    """A temporary folder to fill, renamed to `path` as a whole when the block ends without an error (its files
    fsynced first); on an error it is removed. An empty folder at `path` is replaced; a folder with files there is
    an OSError, unless it holds the file `complete`: another process built it first from the same inputs (a cache),
    and theirs is kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    try:
        yield tmp
        _fsync_tree(tmp)
        try:
            os.replace(tmp, path)
        except OSError:  # not empty: another process got there first?
            if complete is None or not (path / complete).is_file():
                raise
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
