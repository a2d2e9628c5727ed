"""Site data: the built-in synthetic domains or a folder of per-site files, loaded with `datasets`.

A data spec is one of:
- `synthetic` (all built-in domains, one per site) or `synthetic:arithmetic,code` (a chosen list);
- a folder with one entry per site, in name order: a file `NAME.{jsonl,json,parquet,txt}` (held-out part split off
  deterministically), or a subfolder `NAME/` holding `train.*` and `test.*` (or `validation.*`/`heldout.*`) files.
  json/jsonl/parquet files need a `text` column; txt files give one example per line.
"""

from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from feddem.common.errors import FeddemError
from feddem.common.synthetic import DOMAINS, make_domain

EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
HELDOUT_NAMES = ("test", "validation", "heldout")
SYNTHETIC = "synthetic"


@dataclass
class Shard:
    """One site's private data: its domain name and the train and held-out texts."""

    name: str
    train: datasets.Dataset
    heldout: datasets.Dataset


@dataclass
class SyntheticSizes:
    train_examples: int = 2000
    eval_examples: int = 200
    seed: int = 0


def _synthetic_domains(spec: str) -> list[str]:
    if spec == SYNTHETIC:
        return list(DOMAINS)
    names = [n.strip() for n in spec[len(SYNTHETIC) + 1 :].split(",") if n.strip()]
    unknown = [n for n in names if n not in DOMAINS]
    if unknown or not names:
        raise FeddemError(
            f"data spec '{spec}': unknown synthetic domain(s) {unknown or '(none given)'}; "
            f"built-in domains: {', '.join(DOMAINS)}"
        )
    return names


def _is_synthetic(spec: str) -> bool:
    return spec == SYNTHETIC or spec.startswith(SYNTHETIC + ":")


def _folder_entries(spec: str) -> list[Path]:
    root = Path(spec).expanduser()
    if not root.exists():
        raise FeddemError(f"data path '{spec}' does not exist (expected 'synthetic' or a folder of per-site files)")
    if not root.is_dir():
        raise FeddemError(f"data path '{spec}' is a file; give a folder with one file or subfolder per site")
    entries = sorted(
        p for p in root.iterdir() if (p.is_dir() and not p.name.startswith(".")) or p.suffix in EXTENSIONS
    )
    if not entries:
        raise FeddemError(
            f"data folder '{spec}' holds no site data: expected files ending in "
            f"{', '.join(EXTENSIONS)} or one subfolder per site"
        )
    return entries


def list_shards(spec: str) -> list[str]:
    """The names of the shards (domains) that a data spec provides, in site order."""
    if _is_synthetic(spec):
        return _synthetic_domains(spec)
    return [p.stem if p.is_file() else p.name for p in _folder_entries(spec)]


def _load_file(path: Path) -> datasets.Dataset:
    if path.stat().st_size == 0:
        raise FeddemError(f"data file '{path}' is empty")
    try:
        ds = datasets.load_dataset(EXTENSIONS[path.suffix], data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        raise FeddemError(f"could not read data file '{path}': {str(exc).splitlines()[0]}") from None
    if "text" not in ds.column_names:
        raise FeddemError(f"data file '{path}' has no 'text' column (columns: {', '.join(ds.column_names)})")
    ds = ds.select_columns(["text"]).filter(lambda row: bool(row["text"] and row["text"].strip()))
    if len(ds) == 0:
        raise FeddemError(f"data file '{path}' has no non-empty examples")
    return ds


def _find_split(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for ext in EXTENSIONS:
            if (folder / f"{name}{ext}").is_file():
                return folder / f"{name}{ext}"
    return None


def _load_folder_shard(entry: Path, seed: int) -> Shard:
    if entry.is_file():
        full = _load_file(entry)
        if len(full) < 2:
            raise FeddemError(f"data file '{entry}' has {len(full)} example(s): need at least 2 to hold one out")
        parts = full.train_test_split(test_size=max(1, round(0.1 * len(full))), seed=seed, shuffle=True)
        return Shard(entry.stem, parts["train"], parts["test"])
    train_file = _find_split(entry, ("train",))
    heldout_file = _find_split(entry, HELDOUT_NAMES)
    if train_file is None or heldout_file is None:
        raise FeddemError(
            f"site folder '{entry}' needs a train file and a held-out file "
            f"(train.* and one of {', '.join(n + '.*' for n in HELDOUT_NAMES)}, * in {', '.join(EXTENSIONS)})"
        )
    return Shard(entry.name, _load_file(train_file), _load_file(heldout_file))


def load_shard(spec: str, index: int, sizes: SyntheticSizes) -> Shard:
    """Site number `index`'s shard of a data spec."""
    names = list_shards(spec)
    if not 0 <= index < len(names):
        raise FeddemError(f"site {index} has no data: data spec '{spec}' provides {len(names)} shard(s)")
    if _is_synthetic(spec):
        if sizes.train_examples < 1 or sizes.eval_examples < 1:
            raise FeddemError("synthetic domains need at least 1 train and 1 held-out example")
        train, heldout = make_domain(names[index], sizes.train_examples, sizes.eval_examples, sizes.seed)
        return Shard(names[index], datasets.Dataset.from_dict({"text": train}),
                     datasets.Dataset.from_dict({"text": heldout}))
    return _load_folder_shard(_folder_entries(spec)[index], sizes.seed)


def load_site_data(path: str, index: int, sizes: SyntheticSizes) -> Shard:
    """A deployed site's own data (its node config `data-path`), in the same formats as one entry of a data folder:
    a folder with `train.*` and a held-out file, a folder holding exactly one such entry (a data file or a
    `NAME/` subfolder), or a data file itself. `synthetic:NAME` generates a built-in domain instead, only when a
    site asks for it (a list `synthetic:a,b` or `synthetic` picks the entry at `index`)."""
    if _is_synthetic(path):
        return load_shard(path, index if len(_synthetic_domains(path)) > 1 else 0, sizes)
    root = Path(path).expanduser()
    if not root.exists():
        raise FeddemError(f"'{path}' does not exist at this site (expected a folder holding the site's data, "
                          f"or 'synthetic:NAME' to use a built-in domain)")
    if root.is_file():
        if root.suffix not in EXTENSIONS:
            raise FeddemError(f"data file '{path}' is not one of {', '.join(EXTENSIONS)}")
        return _load_folder_shard(root, sizes.seed)
    if _find_split(root, ("train",)) is not None:
        return _load_folder_shard(root, sizes.seed)
    entries = _folder_entries(path)
    if len(entries) != 1:
        raise FeddemError(f"site folder '{path}' holds {len(entries)} entries ({', '.join(p.name for p in entries)}) "
                          f"and no train.* file: give train.* and test.* files, or exactly one data file or subfolder")
    return _load_folder_shard(entries[0], sizes.seed)


def general_mixture(train_examples: int, seed: int) -> list[str]:
    """The base model's pre-training text: every built-in domain in its general (part-vocabulary) form."""
    texts = []
    for name in DOMAINS:
        texts += make_domain(name, train_examples, 0, seed=seed, general=True)[0]
    return texts


def pack_blocks(texts: list[str], tokenizer, seq_len: int, pad_last: bool = False) -> torch.Tensor:
    """Tokenize texts, join them with EOS, and cut the stream into [n, seq_len] blocks.

    The remainder is dropped for training (`pad_last=False`) or padded with the pad id for evaluation.
    """
    if seq_len < 2:
        raise FeddemError(f"sequence length must be at least 2, got {seq_len}")
    ids: list[int] = []
    for row in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(row)
        ids.append(tokenizer.eos_token_id)
    n_full, rest = divmod(len(ids), seq_len)
    if pad_last and rest:
        ids.extend([tokenizer.pad_token_id] * (seq_len - rest))
        n_full += 1
    if n_full == 0:
        raise FeddemError(f"{len(texts)} example(s) give {len(ids)} tokens: fewer than one block of {seq_len}")
    return torch.tensor(ids[: n_full * seq_len], dtype=torch.long).view(n_full, seq_len)
