"""Reading safetensors files with numpy alone (no torch): headers, memory-mapped tensors, float32 arrays, flat chunks.

The secure-aggregation stages of a site only stream its stored vector into the ring; in a deployment each message
starts a fresh `flwr-clientapp` process, so these stages import this module rather than `common.vector_io` (which
needs torch, about 1.5 s more per message and site). `common.vector_io` reads headers and maps tensors through
the same functions: `read_header` is the one header reader, `map_stored` the one memory-mapped reader.
"""

import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from feddem.common.errors import FeddemError
from feddem.common.memory import release_memory

# safetensors dtype code -> the torch dtype's name (`torch.<name>`): the codes feddem reads and writes
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
               "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}

# safetensors float dtype code -> the numpy dtype its bytes are read as (bfloat16 as its 16-bit pattern)
_FLOATS = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def read_header(path: str | Path) -> tuple[dict, int, dict]:
    """A safetensors file's tensor entries, where its data starts, and its `__metadata__`; a clear error when the
    file is not safetensors."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size <= path.stat().st_size - 8:
                raise ValueError(f"header size {size}")
            header = json.loads(fh.read(size))
    except FileNotFoundError:
        raise FeddemError(f"'{path}' does not exist") from None
    except (OSError, ValueError) as exc:
        raise FeddemError(f"'{path}' is not a readable safetensors file ({exc})") from None
    metadata = header.pop("__metadata__", None) or {}
    return header, 8 + size, metadata


def map_stored(path: str | Path, offset: int, dtype, count: int, copy_on_write: bool = False) -> np.ndarray:
    """`count` elements of numpy `dtype` stored at byte `offset` of a file, as a flat memory-mapped array (no copy:
    its pages are read as they are used, and the mapping goes away with the array). Read-only and shared (the page
    cache's own pages, the fastest to read), or with `copy_on_write` writable in memory (writes never reach the
    file). The one way feddem maps a stored tensor."""
    if count == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="c" if copy_on_write else "r", offset=offset, shape=(count,))


def float32_arrays(path: str | Path) -> Mapping[str, np.ndarray]:
    """The float tensors of a safetensors file as flat float32 numpy arrays, one at a time on access (read-only
    mappings of the file for float32; a converted copy of one tensor for float16 and bfloat16)."""
    header, start, _ = read_header(path)
    for name, entry in header.items():
        if entry.get("dtype") not in _FLOATS:
            raise FeddemError(f"'{Path(path).name}': tensor '{name}' has dtype {entry.get('dtype')}, not a float")
    return _Float32Arrays(Path(path), header, start)


class _Float32Arrays(Mapping):
    def __init__(self, path: Path, header: dict, start: int):
        self.path, self.header, self.start = path, header, start

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self.header[name]
        count = math.prod(entry["shape"])
        if count == 0:
            return np.empty(0, dtype=np.float32)
        raw = map_stored(self.path, self.start + entry["data_offsets"][0], _FLOATS[entry["dtype"]], count)
        if entry["dtype"] == "BF16":  # the upper half of a float32's bits
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw if raw.dtype == np.float32 else raw.astype(np.float32)

    def __iter__(self) -> Iterator[str]:
        return iter(self.header)

    def __len__(self) -> int:
        return len(self.header)


def _flat_float32(tensor) -> np.ndarray:
    """A numpy array, or a torch tensor (duck-typed: torch is not imported here), as a flat float32 array."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().float().cpu().numpy()
    return np.asarray(tensor, dtype=np.float32).reshape(-1)


def _element_count(vector: Mapping, name: str) -> int:
    """How many elements `vector[name]` has: from the file header for a stored vector (nothing read or converted)."""
    if isinstance(vector, _Float32Arrays):
        return math.prod(vector.header[name]["shape"])
    tensor = vector[name]
    return int(tensor.numel()) if hasattr(tensor, "numel") else int(np.size(tensor))


def flat_chunks(vector: Mapping, names: list[str], size: int,
                span: tuple[int, int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """The vector (numpy arrays or torch tensors by name) flattened in the order of `names` as consecutive float32
    chunks of `size` elements (the last one shorter): (offset, chunk). Reads one tensor at a time; a chunk may
    span tensors. `span=(lo, hi)`: only flat elements [lo, hi), the first chunk at offset lo; tensors wholly
    outside it are not read."""
    lo, hi = span if span is not None else (0, math.inf)
    buffer = np.empty(size, dtype=np.float32)
    filled, offset, position = 0, lo, 0  # position: flat index of the current tensor's first element
    for name in names:
        if position >= hi:
            break
        if span is not None:
            count = _element_count(vector, name)
            if position + count <= lo:
                position += count
                continue
        flat = _flat_float32(vector[name])
        start, stop = max(lo - position, 0), min(hi - position, flat.size)
        position += flat.size
        while start < stop:
            take = min(size - filled, stop - start)
            buffer[filled:filled + take] = flat[start:start + take]
            filled += take
            start += take
            if filled == size:
                yield offset, buffer.copy()
                offset += size
                filled = 0
        del flat
        release_memory()
    if filled:
        yield offset, buffer[:filled].copy()
