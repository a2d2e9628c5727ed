"""Vectors in Flower messages: a vector as an `ArrayRecord` and back (lazily), and a zero-copy view of an `Array`.

Each tensor travels as a numpy array in the vector's dtype; bfloat16, which numpy lacks, travels as its raw
little-endian bytes (`RAW`). Flower chunks a record on the wire.
"""

import io
import math

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from feddem.common.errors import FeddemError
from feddem.common.memory import release_memory
from feddem.common.vectors import LazyVector, Vector, tensor_bytes

RAW = "raw"  # Array serialisation type of a bfloat16 tensor (numpy has no bfloat16): its little-endian bytes

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}


def _to_array(t: torch.Tensor) -> Array:
    if t.dtype == torch.bfloat16:
        return Array(dtype="bfloat16", shape=tuple(t.shape), stype=RAW, data=bytes(tensor_bytes(t)))
    return Array(t.contiguous().numpy())


def _from_array(name: str, array: Array) -> torch.Tensor:
    if array.stype != RAW:
        return torch.from_numpy(array.numpy())
    if array.dtype != "bfloat16":
        raise FeddemError(f"array '{name}': raw serialisation is only used for bfloat16, not {array.dtype!r}")
    shape = tuple(array.shape)
    if len(array.data) != 2 * math.prod(shape):
        raise FeddemError(f"array '{name}': {len(array.data)} bytes do not hold a bfloat16 tensor of shape {shape} "
                          f"(truncated or malformed)")
    return torch.frombuffer(bytearray(array.data), dtype=torch.bfloat16).reshape(shape)


def vector_to_record(vector: Vector) -> ArrayRecord:
    """A vector as a Flower ArrayRecord of numpy arrays in the vector's dtype (bfloat16 as raw bytes: `RAW`);
    Flower chunks it on the wire. A lazy vector is serialised one tensor at a time."""
    arrays = {}
    for name, t in vector.items():
        arrays[name] = _to_array(t)
        del t
        release_memory()
    return ArrayRecord(arrays)


def vector_from_record(record: ArrayRecord) -> Vector:
    """The vector carried by an ArrayRecord (inverse of `vector_to_record`), read lazily: each tensor is decoded
    when it is used, so applying or summing it never holds a second copy of the whole vector."""
    specs = {name: (_TORCH_DTYPES.get(str(array.dtype), torch.float32), tuple(array.shape))
             for name, array in record.items()}
    return LazyVector(specs, lambda name: _from_array(name, record[name]))


def array_view(array: Array) -> np.ndarray:
    """A read-only numpy view of a Flower `Array`'s bytes (no copy, unlike `Array.numpy()`): for reading a large
    record, e.g. a masked upload, without a second copy of it."""
    if array.stype != "numpy.ndarray":
        raise FeddemError(f"an array of serialisation type {array.stype!r} cannot be read (expected numpy.ndarray)")
    stream = io.BytesIO(array.data)  # shares the bytes until written to
    try:
        version = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(stream)
    except ValueError as exc:
        raise FeddemError(f"malformed array: {exc}") from None
    if dtype.hasobject:
        raise FeddemError("an array of Python objects cannot be read")
    flat = np.frombuffer(array.data, dtype=dtype, count=math.prod(shape), offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran else "C")
