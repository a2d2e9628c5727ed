"""Artefact files of the run store: written atomically (temporary file, fsync, rename, fsync of the folder) with
their size and sha256 computed on the way, and verified on every read. A crash leaves either the old state or the
whole new file, never a partial one; stray temporaries are removed when the store opens (those of runs that are
not being written any more)."""

import hashlib
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from feddem.server.store.errors import DataLoss, InvalidArgument

CHUNK = 1 << 20  # bytes per read and per streamed message
TMP_SUFFIX = ".tmp"
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
NAME = re.compile(rf"^{_PART}(/{_PART}){{0,3}}$")  # e.g. model/model.safetensors, sites/site-0.safetensors


def check_name(name: str) -> str:
    """An artefact name is a relative path of up to four plain parts; anything else (.., /, odd bytes) is refused."""
    if not NAME.match(name) or any(part in (".", "..") or part.endswith(TMP_SUFFIX) for part in name.split("/")):
        raise InvalidArgument(f"bad artefact name {name!r}: use up to 4 parts of letters, digits, '.', '_', '-' "
                              f"separated by '/' (no '..', no leading '.')")
    return name


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ArtefactFiles:
    """The files under `<store>/artefacts/<run>/<name>`."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, run_id: str, name: str) -> Path:
        return self.root / check_name(run_id) / check_name(name)

    def write(self, run_id: str, name: str, chunks: Iterable[bytes], size: int | None = None,
              sha256: str | None = None) -> tuple[int, str]:
        """Write the file from `chunks`; when `size`/`sha256` are given the content must match them. Returns the
        (size, sha256) written. Nothing is left behind when the chunks fail or do not match."""
        path = self.path(run_id, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
        digest, written = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as fh:
                for chunk in chunks:
                    written += len(chunk)
                    if size is not None and written > size:
                        raise InvalidArgument(f"artefact '{name}': more bytes than the announced {size}")
                    digest.update(chunk)
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            if size is not None and written != size:
                raise InvalidArgument(f"artefact '{name}': got {written} bytes, announced {size}")
            if sha256 is not None and digest.hexdigest() != sha256.lower():
                raise InvalidArgument(f"artefact '{name}': sha256 {digest.hexdigest()} differs from the announced "
                                      f"{sha256}")
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
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

    def remove_temporaries(self, keep_runs: set[str] = frozenset()) -> int:
        """Delete temporaries of writes that never finished (a crash between open and rename), except those of
        `keep_runs` (runs still being written, perhaps by another process sharing the store)."""
        stale = [p for p in self.root.rglob(f"*{TMP_SUFFIX}")
                 if p.is_file() and p.relative_to(self.root).parts[0] not in keep_runs]
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)
