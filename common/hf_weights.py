"""The weights of a Hugging Face model folder: read lazily (one file or shards), written streamed and sharded.

A folder holds `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards listed in
`model.safetensors.index.json` (what `save_pretrained` writes). The export writes merged models this way.
"""

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from feddem.common.atomic import write_atomic
from feddem.common.vector_io import open_files, write_safetensors
from feddem.common.vectors import LazyVector, nbytes_of

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
        return open_files(files)
    if (folder / WEIGHTS).is_file():
        return open_files({folder / WEIGHTS: None})
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
        nbytes = nbytes_of(dtype, shape)
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
        index = {"metadata": {"total_size": sum(nbytes_of(*specs[name]) for name in specs)},
                 "weight_map": {name: file for file, names in zip(files, shards) for name in names}}
        write_atomic(folder / INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n",
                     private=False)
    return files
