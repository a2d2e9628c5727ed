"""Artefact files of the run store: written atomically (temporary file, fsync, rename, fsync of the folder) with
their size and sha256 computed on the way, and verified on every read. A crash leaves either the old state or the
whole new file, never a partial one; stray temporaries are removed when the store opens (those of runs that are
not being written any more), and so are the folders of deleted runs that a crash left behind.

Permissions: everything in a store is its owner's alone (folders 0700, files 0600), whoever created it; a store
written by an older feddem is brought to that when it opens (`make_private`)."""

import hashlib
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from feddem.common.atomic import TMP_SUFFIX, atomic_file, fsync_dir
from feddem.server.store.errors import DataLoss, InvalidArgument
from feddem.server.store.validate import quote

CHUNK = 1 << 20  # bytes per read and per streamed message
DELETED = ".deleted-"  # prefix of a deleted run's folder until it is gone
DIR_MODE, FILE_MODE = 0o700, 0o600  # the store's permission policy: owner only
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
NAME = re.compile(rf"^{_PART}(/{_PART}){{0,3}}$")  # e.g. model/model.safetensors, sites/site-0.safetensors
RUN_ID = re.compile(rf"^{_PART}$")


def check_name(name: str) -> str:
    """An artefact name is a relative path of up to four plain parts; anything else (.., /, odd bytes) is refused."""
    if not isinstance(name, str) or not NAME.match(name) or any(
            part in (".", "..") or part.endswith(TMP_SUFFIX) for part in name.split("/")):
        raise InvalidArgument(f"bad artefact name {quote(name)}: use up to 4 parts of letters, digits, '.', '_', "
                              f"'-' separated by '/', each up to 128 characters (no '..', no leading '.')")
    return name


def check_run_id(run_id: str) -> str:
    """A run id is one plain part (letters, digits, '.', '_', '-'; up to 128 characters)."""
    if not isinstance(run_id, str) or not RUN_ID.match(run_id) or run_id.endswith(TMP_SUFFIX):
        raise InvalidArgument(f"bad run id {quote(run_id)}: letters, digits, '.', '_', '-', up to 128 characters")
    return run_id


def private_dir(folder: Path) -> Path:
    """`folder` (and missing parents) created for its owner alone; an existing one is made so."""
    folder.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(folder, DIR_MODE)
    return folder


def make_private(root: Path) -> None:
    """Every folder below `root` (and itself) 0700, every file 0600."""
    os.chmod(root, DIR_MODE)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(folder, name), DIR_MODE)
        for name in files:
            path = os.path.join(folder, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.chmod(path, FILE_MODE)


class ArtefactFiles:
    """The files under `<store>/artefacts/<run>/<name>`."""

    def __init__(self, root: Path):
        self.root = private_dir(root)

    def path(self, run_id: str, name: str) -> Path:
        return self.root / check_run_id(run_id) / check_name(name)

    def write(self, run_id: str, name: str, chunks: Iterable[bytes], size: int | None = None,
              sha256: str | None = None) -> tuple[int, str]:
        """Write the file from `chunks`; when `size`/`sha256` are given the content must match them. Returns the
        (size, sha256) written. Nothing is left behind when the chunks fail or do not match."""
        path = self.path(run_id, name)
        try:
            for folder in reversed(path.relative_to(self.root).parents[:-1]):
                private_dir(self.root / folder)
        except (FileExistsError, NotADirectoryError):
            raise InvalidArgument(f"artefact {quote(name)} of run {run_id}: a part of its path is a file") from None
        digest, written = hashlib.sha256(), 0
        with atomic_file(path) as fh:  # 0600, the store's FILE_MODE
            for chunk in chunks:
                written += len(chunk)
                if size is not None and written > size:
                    raise InvalidArgument(f"artefact '{name}': more bytes than the announced {size}")
                digest.update(chunk)
                fh.write(chunk)
            if size is not None and written != size:
                raise InvalidArgument(f"artefact '{name}': got {written} bytes, announced {size}")
            if sha256 is not None and digest.hexdigest() != sha256.lower():
                raise InvalidArgument(f"artefact '{name}': sha256 {digest.hexdigest()} differs from the announced "
                                      f"{sha256}")
            if path.is_dir():
                raise InvalidArgument(f"artefact {quote(name)} of run {run_id}: a folder of that name holds other "
                                      f"artefacts")
        return written, digest.hexdigest()

    def read(self, run_id: str, name: str, size: int, sha256: str) -> Iterator[bytes]:
        """The file's bytes in chunks; raises DataLoss (after the last chunk at the latest) when it does not match
        its record, so a reader must not use what it got until the iterator is exhausted."""
        path = self.path(run_id, name)
        digest, seen = hashlib.sha256(), 0
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    digest.update(chunk)
                    seen += len(chunk)
                    yield chunk
        except FileNotFoundError:
            raise DataLoss(f"artefact '{name}' of run {run_id} is recorded but its file is missing") from None
        if seen != size or digest.hexdigest() != sha256:
            raise DataLoss(f"artefact '{name}' of run {run_id} does not verify: {seen} bytes with sha256 "
                           f"{digest.hexdigest()[:16]}..., recorded {size} bytes with {sha256[:16]}...")

    def verify(self, run_id: str, name: str, size: int, sha256: str) -> Path:
        """The file's path, after checking its size and sha256 (DataLoss when they differ)."""
        for _ in self.read(run_id, name, size, sha256):
            pass
        return self.path(run_id, name)

    def remove_run(self, run_id: str) -> None:
        """Delete a run's folder: renamed first (one step), then removed; a crash in between leaves a `.deleted-`
        folder that the next `remove_temporaries` removes."""
        folder = self.root / check_run_id(run_id)
        if not folder.exists():
            return
        gone = self.root / f"{DELETED}{run_id}-{uuid.uuid4().hex[:8]}"
        os.replace(folder, gone)
        fsync_dir(self.root)
        shutil.rmtree(gone, ignore_errors=True)

    def remove_temporaries(self, keep_runs: set[str] = frozenset()) -> int:
        """Delete temporaries of writes that never finished (a crash between open and rename), except those of
        `keep_runs` (runs still being written, perhaps by another process sharing the store)."""
        stale = [p for p in self.root.rglob(f"*{TMP_SUFFIX}")
                 if p.is_file() and p.relative_to(self.root).parts[0] not in keep_runs]
        for p in stale:
            p.unlink(missing_ok=True)
        for p in self.root.glob(f"{DELETED}*"):
            shutil.rmtree(p, ignore_errors=True)
        return len(stale)
