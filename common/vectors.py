"""Distribution vectors `d = theta_site - theta_base`: extract (full or LoRA), check, combine, apply, merge.

A vector is a mapping from parameter name to a CPU tensor: float32, or a 16-bit float (`vector-dtype`) where a
run stores and sends its vectors in half the bytes (`cast`); arithmetic on vectors is always done in float32. A
full vector covers every trainable parameter; a LoRA vector covers only the adapted weight matrices, each the dense
low-rank update `scale * B @ A` that peft would merge, so vectors of different sites add up exactly like full ones.

Streaming (billion-parameter vectors): a vector need not be in memory. A `LazyVector` produces one tensor at a
time on access (from a safetensors file: `common.vector_io.open_vector`, `common.hf_weights.open_tensors`; from a
Flower record: `common.vector_records`; or from anything else, e.g. the secure sum's accumulator);
`merged_tensors` yields `base + scale * vector` tensor by tensor with the same arithmetic as `apply_vector`;
`common.stored_tensors.flat_chunks` reads a vector as consecutive flat float32 chunks in a given name order. A
stream holds at most one tensor (plus one chunk) of the vector at a time. Storing vectors: `common.vector_io`;
their digests: `common.digests`.
"""

import math
from collections.abc import Iterator, Mapping
from typing import Callable

import torch

from feddem.common.errors import FeddemError
from feddem.common.memory import release_memory

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
    need = max((nbytes_of(dtype, shape) for name, (dtype, shape) in base_specs.items() if name in shapes), default=0)
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


def nbytes_of(dtype: torch.dtype, shape) -> int:
    """How many bytes a tensor of `dtype` and `shape` holds."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def tensor_bytes(t: torch.Tensor):
    """A tensor's bytes (C order, native little-endian) as a buffer: a view where the tensor is contiguous on the CPU."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data
