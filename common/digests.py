"""Content digests of vectors: SHA-256 over names, dtypes, shapes and bytes, in sorted-name order.

`save_vector` (`common.vector_io`) writes a vector's digest into its safetensors header (`DIGEST_KEY`), so the
guard, the ledger and retention read it back with `stored_digest` without reading the data or importing torch;
a file stored without one is hashed from its mapped bytes, with numpy alone, to the same value `vector_digest`
gives for the loaded vector.
"""

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from feddem.common.errors import FeddemError
from feddem.common.stored_tensors import DTYPE_NAMES, map_stored, read_header

DIGEST_KEY = "feddem-sha256"  # safetensors header metadata: the content digest written by `save_vector`


def hash_tensor(hasher, name: str, dtype: str, shape: tuple[int, ...], data) -> None:
    """One tensor's part of a vector's content digest: `dtype` as torch names it (`torch.float32`), its bytes."""
    hasher.update(f"{name}|{dtype}|{tuple(shape)}|".encode())
    hasher.update(data)


def vector_digest(vector: Mapping) -> str:
    """SHA-256 of a vector's content (names, dtypes, shapes and bytes, in sorted-name order)."""
    from feddem.common.vectors import tensor_bytes  # torch: only for hashing torch tensors

    digest = hashlib.sha256()
    for name in sorted(vector):
        t = vector[name]
        hash_tensor(digest, name, str(t.dtype), tuple(t.shape), tensor_bytes(t))
    return digest.hexdigest()


def header_digest(path: str | Path) -> str | None:
    """The content digest `save_vector` wrote into a stored vector's header (None when it has none)."""
    return read_header(path)[2].get(DIGEST_KEY)


def stored_digest(path: str | Path) -> str:
    """The content digest of a stored vector: from its header when `save_vector` wrote it (no data read), else
    computed from the file's bytes (the value `vector_digest` gives for the loaded vector); no torch either way."""
    header, start, metadata = read_header(path)
    recorded = metadata.get(DIGEST_KEY)
    if recorded is not None:
        return recorded
    for name, entry in header.items():
        if entry.get("dtype") not in DTYPE_NAMES:
            raise FeddemError(f"'{Path(path).name}': tensor '{name}' has dtype {entry.get('dtype')}, which feddem "
                              f"does not read")
    digest = hashlib.sha256()
    for name in sorted(header):
        entry = header[name]
        first, last = entry["data_offsets"]
        data = map_stored(path, start + first, np.uint8, last - first)
        hash_tensor(digest, name, f"torch.{DTYPE_NAMES[entry['dtype']]}", tuple(entry["shape"]), data)
        del data
    return digest.hexdigest()
