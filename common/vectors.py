"""Distribution vectors `d = theta_site - theta_base`: extract (full or LoRA), check, combine, apply, store.

A vector is a mapping from parameter name to a CPU tensor: float32, or a 16-bit float (`vector-dtype`) where a
run stores and sends its vectors in half the bytes (`cast`); arithmetic on vectors is always done in float32. A
full vector covers every trainable parameter; a LoRA vector covers only the adapted weight matrices, each the dense
low-rank update `scale * B @ A` that peft would merge, so vectors of different sites add up exactly like full ones.

Streaming (billion-parameter vectors): a vector need not be in memory. A `LazyVector` produces one tensor at a
time on access (from a safetensors file: `open_vector`, `open_tensors`; or from anything else, e.g. the secure
sum's accumulator); `write_safetensors` writes tensors as they come (the header is planned from their names,
dtypes and shapes) and `save_sharded` splits them into HF-style shards with a `model.safetensors.index.json`;
`merged_tensors` yields `base + scale * vector` tensor by tensor with the same arithmetic as `apply_vector`;
`common.stored_tensors.flat_chunks` reads a vector as consecutive flat float32 chunks in a given name order. A
stream holds at most one tensor (plus one chunk) of the vector at a time.
"""

import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from feddem.common.errors import FeddemError
from feddem.common.memory import release_memory
from feddem.common.stored_tensors import DIGEST_KEY, header_digest, read_header

Vector = Mapping[str, torch.Tensor]  # a dict, or a LazyVector that loads each tensor on access

def parameters_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached float32 CPU copy of the model's parameters by name (tied weights appear once)."""
    return {name: p.detach().to("cpu", torch.float32).clone() for name, p in model.named_parameters()}


def extract_vector(model: torch.nn.Module, base: Mapping[str, torch.Tensor]) -> "LazyVector":
    """Full distribution vector: every parameter of `model` minus the same parameter of the base (a dict, or a
    lazy source such as the base's own files: `common.modeling.base_tensors`). Lazy: each difference is formed
    when it is read (`save_vector` streams it to disk), so read it before the model changes again."""
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name not in base:
            raise FeddemError(f"parameter '{name}' of the fine-tuned model is not in the base model")

    def difference(name: str) -> torch.Tensor:
        return params[name].detach().to("cpu", torch.float32) - base[name].to(torch.float32)

    return LazyVector({name: (torch.float32, tuple(p.shape)) for name, p in params.items()}, difference)


_PEFT_PREFIX = "base_model.model."


def extract_lora_vector(peft_model: torch.nn.Module, adapter: str = "default") -> Vector:
    """LoRA distribution vector: for each adapted layer, its dense update under the base weight's name."""
    vector = {}
    for module_name, module in peft_model.named_modules():
        if hasattr(module, "get_delta_weight") and adapter in getattr(module, "lora_A", {}):
            name = module_name.removeprefix(_PEFT_PREFIX) + ".weight"
            vector[name] = module.get_delta_weight(adapter).detach().to("cpu", torch.float32)
    if not vector:
        raise FeddemError("the LoRA model has no adapted layers: nothing to extract")
    return vector


def cast(vector: Vector, dtype: torch.dtype) -> Vector:
    """The vector in `dtype` (float32, or a 16-bit float: `common.config.VECTOR_DTYPES`), lazily, one tensor at a
    time; the vector itself when it is already in it. A value that `dtype` cannot hold (float16 past 65504) is an
    error naming its parameter."""
    specs = specs_of(vector)
    if all(d == dtype for d, _ in specs.values()):
        return vector

    def load(name: str) -> torch.Tensor:
        t = vector[name]
        out = t.to(dtype)
        if dtype == torch.float16 and not torch.isfinite(out).all() and torch.isfinite(t).all():
            raise FeddemError(f"parameter '{name}' of the vector has values beyond float16's range "
                              f"(largest |value| {float(t.abs().max()):.4g}); use vector-dtype bfloat16 or float32")
        return out

    return LazyVector({name: (dtype, shape) for name, (_, shape) in specs.items()}, load)


def check_vector(vector: Vector, reference: Mapping, source: str, dtype: torch.dtype = torch.float32) -> None:
    """Raise a FeddemError naming the problem if `vector` does not fit `reference` (names, shapes, dtype `dtype`,
    NaN); `reference` maps each name to a tensor or to its shape."""
    if not vector:
        raise FeddemError(f"{source}: the vector is empty")
    for name, t in vector.items():
        if name not in reference:
            raise FeddemError(f"{source}: unknown parameter '{name}' (not in the base model)")
        expected = tuple(getattr(reference[name], "shape", reference[name]))
        if tuple(t.shape) != expected:
            raise FeddemError(f"{source}: parameter '{name}' has shape {tuple(t.shape)}, the base model has {expected}")
        if t.dtype != dtype:
            raise FeddemError(f"{source}: parameter '{name}' has dtype {t.dtype}, expected {dtype}")
        if not torch.isfinite(t).all():
            raise FeddemError(f"{source}: parameter '{name}' contains NaN or infinite values")


def weighted_sum(vectors: list[Vector], weights: list[float]) -> Vector:
    """sum_i w_i d_i over vectors that may cover different parameter sets (a missing entry counts as zero)."""
    if len(vectors) != len(weights):
        raise FeddemError(f"{len(vectors)} vectors but {len(weights)} weights")
    total: Vector = {}
    for vector, w in zip(vectors, weights):
        add_into(total, vector, w)
    return total


def add_into(total: Vector, vector: Vector, weight: float = 1.0) -> None:
    """total += weight * vector, in place (entries missing from `total` start at zero)."""
    for name, t in vector.items():
        if name in total:
            total[name].add_(t, alpha=weight)
        else:
            total[name] = t.to(torch.float32) * weight
        del t
        release_memory()


_MERGE_BLOCK = 1 << 18  # elements per block where the merge converts dtypes (a multiple of any SIMD width)


def _merge_scratch(p: torch.Tensor, delta: torch.Tensor) -> torch.Tensor | None:
    """The float32 scratch `_merge_into` needs where p or delta is not float32 (None where both are)."""
    if p.dtype == delta.dtype == torch.float32:
        return None
    return torch.empty(2 * _MERGE_BLOCK, dtype=torch.float32, device=p.device)


def _merge_into(p: torch.Tensor, delta: torch.Tensor, scale: float, out: torch.Tensor,
                scratch: torch.Tensor | None) -> None:
    """p + scale * delta in float32, stored into `out` (p's dtype and shape; `out` may be p itself): the one merge
    arithmetic, in place, streaming and at the site. One float32 addition where p and delta are float32, else the
    same float32 additions block by block through `scratch` (`_merge_scratch`), without a float32 copy of the
    whole tensor."""
    p, d, o = p.reshape(-1), delta.to(p.device).reshape(-1), out.view(-1)
    if p.dtype == torch.float32 and d.dtype == torch.float32:
        torch.add(p, d, alpha=scale, out=o)
        return
    a_s, b_s = scratch[:_MERGE_BLOCK], scratch[_MERGE_BLOCK:]
    for i in range(0, p.numel(), _MERGE_BLOCK):
        j = min(p.numel(), i + _MERGE_BLOCK)
        a = p[i:j] if p.dtype == torch.float32 else a_s[:j - i].copy_(p[i:j])
        b = d[i:j] if d.dtype == torch.float32 else b_s[:j - i].copy_(d[i:j])
        if o.dtype == torch.float32:
            torch.add(a, b, alpha=scale, out=o[i:j])
        else:
            o[i:j].copy_(torch.add(a, b, alpha=scale, out=a_s[:j - i]))


def merged(p: torch.Tensor, delta: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """p + scale * delta as a new tensor in p's dtype (`_merge_into`'s arithmetic)."""
    out = torch.empty_like(p)
    _merge_into(p, delta, scale, out, _merge_scratch(p, delta))
    return out


@torch.no_grad()
def apply_vector(model: torch.nn.Module, vector: Vector, scale: float = 1.0) -> None:
    """theta += scale * vector, in place; arithmetic in float32, stored back in each parameter's dtype. A lazy
    vector is read one tensor at a time."""
    params = dict(model.named_parameters())
    for name in vector:
        if name not in params:
            raise FeddemError(f"cannot apply the vector: the model has no parameter '{name}'")
    scratch = None
    for name, delta in vector.items():
        p = params[name]
        if tuple(p.shape) != tuple(delta.shape):
            raise FeddemError(f"cannot apply the vector: '{name}' is {tuple(delta.shape)}, model has {tuple(p.shape)}")
        scratch = scratch if scratch is not None else _merge_scratch(p, delta)
        _merge_into(p, delta, scale, p, scratch)
        del delta
        release_memory()


def merged_tensors(base: Mapping[str, torch.Tensor], vector: Vector, scale: float = 1.0
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Streaming merge: (name, base + scale * vector) for every tensor of `base`, in its order and dtype, one at a
    time (a tensor the vector lacks is passed through); the same arithmetic as `apply_vector`. A merged tensor is
    valid until the next one is asked for: the sums are formed in one reused buffer (fresh memory for every
    tensor costs more in page faults than the sum itself), so consume each one (write it, copy it) in turn.
    Tensors stored in files (`open_tensors`, `open_vector`) are read through read-only shared mappings, which read
    faster than the copy-on-write ones their `[name]` gives; the buffer is sized once, for the largest merged
    tensor, where the base's specs are known."""
    unknown = [name for name in vector if name not in base]
    if unknown:
        raise FeddemError(f"cannot merge the vector: the base model has no parameter(s) {unknown[:5]}")
    shapes = shapes_of(vector)
    read_base = getattr(base, "_read_only", base.__getitem__)
    read_delta = getattr(vector, "_read_only", vector.__getitem__)
    base_specs = base.specs if isinstance(base, LazyVector) else specs_of(base) if isinstance(base, dict) else {}
    need = max((_nbytes(dtype, shape) for name, (dtype, shape) in base_specs.items() if name in shapes), default=0)
    buffer, scratch = torch.empty(need, dtype=torch.uint8), None
    for name in base:
        if name not in shapes:
            yield name, base[name]
            continue
        p = read_base(name)
        if tuple(p.shape) != shapes[name]:
            raise FeddemError(f"cannot merge the vector: '{name}' is {shapes[name]}, the base has {tuple(p.shape)}")
        nbytes = p.numel() * p.element_size()
        if buffer.numel() < nbytes:
            buffer = None  # the old one goes before the new one comes
            buffer = torch.empty(nbytes, dtype=torch.uint8)
        out = buffer[:nbytes].view(p.dtype).view(p.shape)
        delta = read_delta(name)
        scratch = scratch if scratch is not None else _merge_scratch(p, delta)
        _merge_into(p, delta, scale, out, scratch)
        del p, delta  # unmapped before the next tensor is mapped
        yield name, out


def vector_norm(vector: Vector) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in vector.values()))


RAW = "raw"  # Array serialisation type of a bfloat16 tensor (numpy has no bfloat16): its little-endian bytes


def _to_array(t: torch.Tensor) -> Array:
    if t.dtype == torch.bfloat16:
        return Array(dtype="bfloat16", shape=tuple(t.shape), stype=RAW, data=bytes(_tensor_bytes(t)))
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


class LazyVector(Mapping):
    """A read-only vector whose tensors are produced on access by `load(name)`, one at a time; `specs` gives each
    name's (dtype, shape) without loading it. Iteration follows the order of `specs`."""

    def __init__(self, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], load: Callable[[str], torch.Tensor]):
        self.specs, self._load = dict(specs), load

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.specs:
            raise KeyError(name)
        return self._load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __contains__(self, name) -> bool:
        return name in self.specs

    def scaled(self, weight: float) -> "LazyVector":
        """weight * this vector, still lazy (float32)."""
        return LazyVector({n: (torch.float32, shape) for n, (_, shape) in self.specs.items()},
                          lambda name: self._load(name).float() * weight)


def scaled(vector: Vector, weight: float) -> "LazyVector":
    """weight * vector as a lazy vector: each tensor is scaled when it is read."""
    source = vector if isinstance(vector, LazyVector) else LazyVector(specs_of(vector), vector.__getitem__)
    return source.scaled(weight)


def specs_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """name -> (dtype, shape), without loading a lazy vector's data."""
    if isinstance(tensors, LazyVector):
        return dict(tensors.specs)
    return {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}


def shapes_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: shape for name, (_, shape) in specs_of(tensors).items()}


def numel_of(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(math.prod(shape) for shape in shapes_of(tensors).values())


# --- safetensors, streamed -------------------------------------------------------------------------------------

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_FROM_ST = {code: dtype for dtype, code in _ST_DTYPES.items()}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}


def _nbytes(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _tensor_bytes(t: torch.Tensor):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


def _hash_tensor(hasher, name: str, t: torch.Tensor, data) -> None:
    """One tensor's part of a vector's content digest (`vector_digest`, and the one `save_vector` writes)."""
    hasher.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    hasher.update(data)


def write_safetensors(path: str | Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                      tensors: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None,
                      digest: bool = False) -> None:
    """Write a safetensors file from a stream of (name, tensor) in the order of `specs` (name -> dtype, shape),
    holding one tensor at a time; atomically (temporary file, fsync, rename). With `digest`, the header's
    metadata gets `DIGEST_KEY`: the `vector_digest` of the content (the stream must then be in sorted-name order)."""
    path = Path(path)
    names = list(specs)
    if digest and names != sorted(names):
        raise FeddemError("a digest needs the tensors in sorted-name order")
    header, offset = {}, 0
    for name, (dtype, shape) in specs.items():
        size = _nbytes(dtype, shape)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    hasher = hashlib.sha256() if digest else None
    try:
        with os.fdopen(fd, "wb") as fh:
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
                data = _tensor_bytes(t)
                fh.write(data)
                if hasher is not None:
                    _hash_tensor(hasher, name, t, data)
                del t, data
                release_memory()
            if digest:
                at = 8 + raw.index(f'"{DIGEST_KEY}":"{placeholder}"'.encode()) + len(DIGEST_KEY) + 4
                fh.seek(at)
                fh.write(hasher.hexdigest().encode())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def open_vector(path: str | Path) -> LazyVector:
    """A stored safetensors file as a lazy vector: the header is read now, each tensor when it is used."""
    path = Path(path)
    if not path.is_file():
        raise FeddemError(f"vector file '{path}' does not exist")
    return _open_files({path: None})


def _header(file: Path) -> tuple[dict, int]:
    """A safetensors file's header (without metadata) and where its data starts."""
    header, start, _ = read_header(file)
    return header, start


_NP_VIEW = {torch.bfloat16: np.uint16}  # dtypes numpy lacks: mapped as same-size integers, viewed back in torch


def _open_files(files: dict[Path, list[str] | None]) -> LazyVector:
    specs, where = {}, {}
    for file, wanted in files.items():
        header, start = _header(file)
        for name in (wanted if wanted is not None else header):
            entry = header[name]
            if entry["dtype"] not in _FROM_ST:
                raise FeddemError(f"'{file.name}': tensor '{name}' has dtype {entry['dtype']}, which feddem does not read")
            specs[name] = (_FROM_ST[entry["dtype"]], tuple(entry["shape"]))
            where[name] = (file, start + entry["data_offsets"][0])

    def load(name: str) -> torch.Tensor:
        """The tensor mapped from its file (copy-on-write, no copy made now): its pages are read as it is used and
        the mapping goes away with the tensor."""
        dtype, shape = specs[name]
        file, offset = where[name]
        if math.prod(shape) == 0:
            return torch.empty(shape, dtype=dtype)
        np_dtype = _NP_VIEW.get(dtype) or torch.empty((), dtype=dtype).numpy().dtype
        mapped = np.memmap(file, dtype=np_dtype, mode="c", offset=offset, shape=shape or (1,))
        t = torch.from_numpy(mapped)
        t = t.view(dtype) if dtype in _NP_VIEW else t
        return t.reshape(shape)

    lazy = LazyVector(specs, load)
    lazy._read_only = lambda name: _map_read_only(*where[name], *specs[name])  # for merged_tensors only
    return lazy


def _map_read_only(file: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A stored tensor mapped read-only and shared (the page cache's own pages, no copy-on-write): it reads faster
    than the copy-on-write map `load` gives, but writing to it would crash, so it is only read inside this module
    (by `merged_tensors`). The mapping goes away with the tensor."""
    import mmap
    import warnings

    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(file, "rb") as fh:
        region = mmap.mmap(fh.fileno(), offset - start + _nbytes(dtype, shape), access=mmap.ACCESS_READ,
                           offset=start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given buffer is not writable": it is only read
        return torch.frombuffer(region, dtype=dtype, count=count, offset=offset - start).view(shape)


INDEX = "model.safetensors.index.json"
WEIGHTS = "model.safetensors"


def open_tensors(folder: str | Path) -> LazyVector | None:
    """The weights of a Hugging Face model folder (`model.safetensors`, or shards listed in
    `model.safetensors.index.json`) as a lazy vector in the files' own dtypes; None when it has no safetensors."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        files: dict[Path, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(folder / file, []).append(name)
        return _open_files(files)
    if (folder / WEIGHTS).is_file():
        return _open_files({folder / WEIGHTS: None})
    return None


def save_sharded(folder: str | Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 tensors: Iterable[tuple[str, torch.Tensor]], max_shard_size: int) -> list[str]:
    """Write a stream of tensors as Hugging Face weights: one `model.safetensors`, or, past `max_shard_size`
    bytes, `model-0000i-of-0000n.safetensors` shards and `model.safetensors.index.json` (what `save_pretrained`
    writes). A tensor larger than a shard gets a shard of its own. Returns the files written."""
    folder = Path(folder)
    shards: list[list[str]] = [[]]
    size = 0
    for name, (dtype, shape) in specs.items():
        nbytes = _nbytes(dtype, shape)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    files = [WEIGHTS] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for stale in [folder / INDEX, folder / WEIGHTS, *folder.glob("model-*-of-*.safetensors")]:
        if stale.name not in files and stale.exists():
            stale.unlink()
    stream = iter(tensors)
    for file, names in zip(files, shards):
        write_safetensors(folder / file, {name: specs[name] for name in names}, stream, metadata={"format": "pt"})
    if n > 1:
        index = {"metadata": {"total_size": sum(_nbytes(*specs[name]) for name in specs)},
                 "weight_map": {name: file for file, names in zip(files, shards) for name in names}}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def vector_digest(vector: Vector) -> str:
    """SHA-256 of a vector's content (names, dtypes, shapes and bytes, in sorted-name order)."""
    digest = hashlib.sha256()
    for name in sorted(vector):
        t = vector[name]
        _hash_tensor(digest, name, t, _tensor_bytes(t))
    return digest.hexdigest()


def save_vector(vector: Vector, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a vector (in memory or lazy) as safetensors atomically, one tensor at a time in sorted-name order,
    with its content digest in the header (`common.stored_tensors.stored_digest` reads it back without reading the data)."""
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
