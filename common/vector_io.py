"""Vectors on disk as safetensors: streamed writing, and lazy memory-mapped reading, one tensor at a time.

`write_safetensors` writes tensors as they come (the header is planned from their names, dtypes and shapes),
atomically, optionally with the content digest in its header (`common.digests`); `save_vector` / `load_vector`
store a vector that way. `open_vector` and `open_files` read stored tensors lazily through the one memory-mapped
reader (`common.stored_tensors.map_stored`). Hugging Face model folders (shards, index): `common.hf_weights`.
"""

import hashlib
import json
import math
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from feddem.common.atomic import atomic_file
from feddem.common.digests import DIGEST_KEY, hash_tensor, header_digest, vector_digest
from feddem.common.errors import FeddemError
from feddem.common.memory import release_memory
from feddem.common.stored_tensors import DTYPE_NAMES, map_stored, read_header
from feddem.common.vectors import LazyVector, Vector, nbytes_of, specs_of, tensor_bytes

_FROM_ST = {code: getattr(torch, name) for code, name in DTYPE_NAMES.items()}
_ST_DTYPES = {dtype: code for code, dtype in _FROM_ST.items()}
_NP_VIEW = {torch.bfloat16: np.uint16}  # dtypes numpy lacks: mapped as same-size integers, viewed back in torch


def write_safetensors(path: str | Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                      tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None,
                      digest: bool = False) -> None:
    """Write a safetensors file from a stream of (name, tensor) in the order of `specs` (name -> dtype, shape),
    holding one tensor at a time; atomically (`common.atomic`). With `digest`, the header's metadata gets
    `DIGEST_KEY`: the `vector_digest` of the content (the stream must then be in sorted-name order)."""
    path = Path(path)
    names = list(specs)
    if digest and names != sorted(names):
        raise FeddemError("a digest needs the tensors in sorted-name order")
    header, offset = {}, 0
    for name, (dtype, shape) in specs.items():
        size = nbytes_of(dtype, shape)
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    meta = dict(metadata or {})
    placeholder = "0" * 64
    if digest:
        meta[DIGEST_KEY] = placeholder
    if meta:
        header = {"__metadata__": meta} | header
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    hasher = hashlib.sha256() if digest else None
    with atomic_file(path) as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        stream = iter(tensors)
        for expected in names:
            name, t = next(stream, (None, None))
            dtype, shape = specs[expected]
            if name != expected or t.dtype != dtype or tuple(t.shape) != tuple(shape):
                got = "nothing" if name is None else f"'{name}' {t.dtype} {tuple(t.shape)}"
                raise FeddemError(f"writing '{path.name}': expected '{expected}' {dtype} {tuple(shape)}, "
                                  f"got {got}")
            data = tensor_bytes(t)
            fh.write(data)
            if hasher is not None:
                hash_tensor(hasher, name, str(t.dtype), tuple(t.shape), data)
            del t, data
            release_memory()
        if digest:
            at = 8 + raw.index(f'"{DIGEST_KEY}":"{placeholder}"'.encode()) + len(DIGEST_KEY) + 4
            fh.seek(at)
            fh.write(hasher.hexdigest().encode())


def open_vector(path: str | Path) -> LazyVector:
    """A stored safetensors file as a lazy vector: the header is read now, each tensor when it is used."""
    path = Path(path)
    if not path.is_file():
        raise FeddemError(f"vector file '{path}' does not exist")
    return open_files({path: None})


def _map_tensor(file: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...],
                copy_on_write: bool) -> torch.Tensor:
    """A stored tensor as a torch tensor over `map_stored`'s mapping of its bytes (no copy made now)."""
    np_dtype = _NP_VIEW.get(dtype) or torch.empty((), dtype=dtype).numpy().dtype
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    mapped = map_stored(file, offset, np_dtype, count, copy_on_write=copy_on_write)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given NumPy array is not writable": it is only read
        t = torch.from_numpy(mapped)
    t = t.view(dtype) if dtype in _NP_VIEW else t
    return t.reshape(shape)


def open_files(files: dict[Path, list[str] | None]) -> LazyVector:
    """The tensors of safetensors files (each file's listed names, or all of them for None) as one lazy vector."""
    specs, where = {}, {}
    for file, wanted in files.items():
        header, start, _ = read_header(file)
        for name in (wanted if wanted is not None else header):
            entry = header[name]
            if entry["dtype"] not in _FROM_ST:
                raise FeddemError(f"'{file.name}': tensor '{name}' has dtype {entry['dtype']}, which feddem does not read")
            specs[name] = (_FROM_ST[entry["dtype"]], tuple(entry["shape"]))
            where[name] = (file, start + entry["data_offsets"][0])

    def load(name: str) -> torch.Tensor:
        """The tensor mapped from its file copy-on-write (writable; writes stay in memory): its pages are read as
        it is used and the mapping goes away with the tensor."""
        return _map_tensor(*where[name], *specs[name], copy_on_write=True)

    lazy = LazyVector(specs, load)
    # read-only and shared (the page cache's own pages): faster to read than the copy-on-write map `load` gives,
    # but writing to it would crash, so only `common.vectors.merged_tensors` reads it
    lazy._read_only = lambda name: _map_tensor(*where[name], *specs[name], copy_on_write=False)
    return lazy


def save_vector(vector: Vector, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a vector (in memory or lazy) as safetensors atomically, one tensor at a time in sorted-name order,
    with its content digest in the header (`common.digests.stored_digest` reads it back without reading the data)."""
    specs = specs_of(vector)
    names = sorted(specs)
    write_safetensors(path, {n: specs[n] for n in names}, ((n, vector[n]) for n in names), metadata, digest=True)


def load_vector(path: str | Path, verify: bool = False) -> LazyVector:
    """A vector written by `save_vector`, read lazily (one tensor at a time, when used); with `verify`, its content
    is checked against the digest in its header first (streamed)."""
    vector = open_vector(path)
    if verify:
        recorded = header_digest(path)
        if recorded is not None and vector_digest(vector) != recorded:
            raise FeddemError(f"vector file '{path}' is corrupt: its content does not match the digest in its header")
    return vector
