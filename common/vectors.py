"""Distribution vectors `d = theta_site - theta_base`: extract (full or LoRA), check, combine, apply, store.

A vector is a dict from parameter name to a float32 CPU tensor. A full vector covers every trainable parameter; a
LoRA vector covers only the adapted weight matrices, each the dense low-rank update `scale * B @ A` that peft
would merge, so vectors of different sites add up exactly like full ones.
"""

import hashlib
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common.errors import FeddemError

Vector = dict[str, torch.Tensor]


def parameters_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached float32 CPU copy of the model's parameters by name (tied weights appear once)."""
    return {name: p.detach().to("cpu", torch.float32).clone() for name, p in model.named_parameters()}


def extract_vector(model: torch.nn.Module, base: dict[str, torch.Tensor]) -> Vector:
    """Full distribution vector: every parameter of `model` minus the same parameter of the base."""
    vector = {}
    for name, p in model.named_parameters():
        if name not in base:
            raise FeddemError(f"parameter '{name}' of the fine-tuned model is not in the base model")
        vector[name] = p.detach().to("cpu", torch.float32) - base[name]
    return vector


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


def check_vector(vector: Vector, reference: dict[str, torch.Tensor], source: str) -> None:
    """Raise a FeddemError naming the problem if `vector` does not fit `reference` (names, shapes, dtype, NaN)."""
    if not vector:
        raise FeddemError(f"{source}: the vector is empty")
    for name, t in vector.items():
        if name not in reference:
            raise FeddemError(f"{source}: unknown parameter '{name}' (not in the base model)")
        if tuple(t.shape) != tuple(reference[name].shape):
            raise FeddemError(
                f"{source}: parameter '{name}' has shape {tuple(t.shape)}, the base model has "
                f"{tuple(reference[name].shape)}"
            )
        if t.dtype != torch.float32:
            raise FeddemError(f"{source}: parameter '{name}' has dtype {t.dtype}, expected float32")
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


@torch.no_grad()
def apply_vector(model: torch.nn.Module, vector: Vector, scale: float = 1.0) -> None:
    """theta += scale * vector, in place; arithmetic in float32, stored back in each parameter's dtype."""
    params = dict(model.named_parameters())
    for name, delta in vector.items():
        if name not in params:
            raise FeddemError(f"cannot apply the vector: the model has no parameter '{name}'")
        p = params[name]
        if tuple(p.shape) != tuple(delta.shape):
            raise FeddemError(f"cannot apply the vector: '{name}' is {tuple(delta.shape)}, model has {tuple(p.shape)}")
        p.copy_((p.float() + scale * delta.to(p.device, torch.float32)).to(p.dtype))


def vector_norm(vector: Vector) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in vector.values()))


def vector_to_record(vector: Vector) -> ArrayRecord:
    """A vector as a Flower ArrayRecord of float32 numpy arrays (Flower chunks it on the wire)."""
    return ArrayRecord({name: Array(t.contiguous().numpy()) for name, t in vector.items()})


def vector_from_record(record: ArrayRecord) -> Vector:
    """The vector carried by an ArrayRecord (inverse of `vector_to_record`)."""
    return {name: torch.from_numpy(np.array(array.numpy(), copy=True)) for name, array in record.items()}


DIGEST_KEY = "feddem-sha256"  # safetensors header metadata: the content digest written by `save_vector`


def vector_digest(vector: Vector) -> str:
    """SHA-256 of a vector's content (names, dtypes, shapes and bytes, in sorted-name order)."""
    digest = hashlib.sha256()
    for name in sorted(vector):
        t = vector[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def save_vector(vector: Vector, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write a vector as safetensors atomically (temporary file, fsync, rename), with its content digest in the
    header (`stored_digest` reads it back without reading the data)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    metadata = dict(metadata or {}) | {DIGEST_KEY: vector_digest(vector)}
    try:
        save_file({k: v.contiguous() for k, v in vector.items()}, tmp, metadata=metadata)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_vector(path: str | Path, verify: bool = False) -> Vector:
    """Read a vector written by `save_vector`; with `verify`, check its content against the digest in its header."""
    if not Path(path).is_file():
        raise FeddemError(f"vector file '{path}' does not exist")
    vector = load_file(str(path))
    if verify:
        recorded = _header_digest(path)
        if recorded is not None and vector_digest(vector) != recorded:
            raise FeddemError(f"vector file '{path}' is corrupt: its content does not match the digest in its header")
    return vector


def _header_digest(path: str | Path) -> str | None:
    with safe_open(str(path), framework="pt") as fh:
        return (fh.metadata() or {}).get(DIGEST_KEY)


def stored_digest(path: str | Path) -> str:
    """The content digest of a stored vector: from its header when `save_vector` wrote it (no data read), else
    computed from the data."""
    return _header_digest(path) or vector_digest(load_vector(path))
