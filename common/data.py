"""Site data: the built-in synthetic domains, files and folders in the formats `SFTTrainer` takes, or a hub dataset.

A data spec (`--data`) is one of:
- `synthetic` (all built-in domains, one per site) or `synthetic:arithmetic,code` (a chosen list);
- a folder with one entry per site, in name order: a file `NAME.{jsonl,json,parquet,txt,csv}` (held-out part split
  off deterministically), a subfolder `NAME/` holding `train.*` and `test.*` (or `validation.*`/`heldout.*`) files,
  or a subfolder saved with `datasets`' `save_to_disk` (a Dataset, split like a file, or a DatasetDict with a
  `train` split and a `test`/`validation`/`heldout` split);
- `hf:ORG/NAME` (one shard), optionally `hf:ORG/NAME:CONFIG` and `@SPLIT`, loaded with `datasets.load_dataset`
  (from the local cache when offline; a clear error when it is not there).

A deployed site's `data-path` takes one entry of these (`load_site_data`). Each shard holds one format
(`common.chat_format`): plain text, prompt/completion (also prompt/response, alpaca) or `messages` conversations.
The held-out part is capped at `eval-examples`; one under `MIN_HELDOUT` examples gets a warning.
"""

from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch

from feddem.common.chat_format import CHAT, TEXT, canonical_rows, encode_conversation
from feddem.common.errors import FeddemError
from feddem.common.synthetic import DOMAINS, make_domain

EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
HELDOUT_NAMES = ("test", "validation", "heldout")
SYNTHETIC = "synthetic"
HUB = "hf:"
MIN_HELDOUT = 20  # a held-out test split smaller than this gets a warning: its figures say little
HELDOUT_SHARE = 0.1  # of a single file (or Dataset) held out, at most eval-examples


@dataclass
class Shard:
    """One site's private data: its domain name, its kind (`text` or `chat`) and the train and held-out examples
    (a `text` column, or a `messages` column of role/content lists), and warnings for the report."""

    name: str
    train: datasets.Dataset
    heldout: datasets.Dataset
    kind: str = TEXT
    warnings: list[str] = field(default_factory=list)

    @property
    def column(self) -> str:
        return "messages" if self.kind == CHAT else "text"


def column_rows(dataset: datasets.Dataset, column: str, batch_size: int = 1024):
    """The values of one column in row order, read `batch_size` rows at a time: a pass over a large shard (its data
    digest) without the whole column in memory at once."""
    for batch in dataset.select_columns([column]).iter(batch_size=batch_size):
        yield from batch[column]


@dataclass
class SyntheticSizes:
    train_examples: int = 2000
    eval_examples: int = 200
    seed: int = 0
    text_column: str = "text"

    @classmethod
    def of(cls, cfg) -> "SyntheticSizes":
        """The sizes a run config (`common.config.RunConfig`) gives its shards."""
        return cls(cfg.train_examples, cfg.eval_examples, cfg.seed, cfg.text_column)


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


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `save_to_disk` (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / n).is_file() for n in ("dataset_dict.json", "state.json"))


def _folder_entries(spec: str) -> list[Path]:
    root = Path(spec).expanduser()
    if not root.exists():
        raise FeddemError(f"data path '{spec}' does not exist (expected 'synthetic', 'hf:ORG/NAME' or a folder of "
                          f"per-site files)")
    if not root.is_dir():
        raise FeddemError(f"data path '{spec}' is a file; give a folder with one file or subfolder per site")
    if _is_saved_dataset(root):
        raise FeddemError(f"data path '{spec}' is one saved dataset (save_to_disk); give a folder holding one such "
                          f"folder per site")
    entries = sorted(
        p for p in root.iterdir() if (p.is_dir() and not p.name.startswith(".")) or p.suffix in EXTENSIONS
    )
    if not entries:
        raise FeddemError(
            f"data folder '{spec}' holds no site data: expected files ending in "
            f"{', '.join(EXTENSIONS)} or one subfolder per site"
        )
    return entries


def _hub_parts(spec: str) -> tuple[str, str | None, str | None]:
    """`hf:ORG/NAME[:CONFIG][@SPLIT]` as (name, config, split)."""
    rest, _, split = spec[len(HUB):].partition("@")
    name, _, config = rest.partition(":")
    if not name:
        raise FeddemError(f"data spec '{spec}': expected hf:ORG/NAME, hf:ORG/NAME:CONFIG or hf:ORG/NAME@SPLIT")
    return name, config or None, split or None


def list_shards(spec: str) -> list[str]:
    """The names of the shards (domains) that a data spec provides, in site order."""
    if _is_synthetic(spec):
        return _synthetic_domains(spec)
    if spec.startswith(HUB):
        return [_hub_parts(spec)[0].rsplit("/", 1)[-1]]
    return [p.stem if p.is_file() else p.name for p in _folder_entries(spec)]


def _canonical(raw: datasets.Dataset, source: str, text_column: str) -> tuple[str, datasets.Dataset]:
    """A loaded table checked and turned into one `text` or `messages` column (`chat_format.canonical_rows`)."""
    kind, values = canonical_rows(raw.to_list(), source, text_column)
    if not values:
        raise FeddemError(f"{source} has no non-empty examples")
    return kind, datasets.Dataset.from_dict({"messages" if kind == CHAT else "text": values})


def _read_file(path: Path) -> datasets.Dataset:
    if path.suffix not in EXTENSIONS:
        raise FeddemError(f"data file '{path}' is not one of {', '.join(EXTENSIONS)}")
    if path.stat().st_size == 0:
        raise FeddemError(f"data file '{path}' is empty")
    try:
        kwargs = _csv_as_strings(path) if path.suffix == ".csv" else {}
        return datasets.load_dataset(EXTENSIONS[path.suffix], data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # datasets raises many types for unreadable files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FeddemError(f"could not read data file '{path}': {first}") from None


def _csv_as_strings(path: Path) -> dict:
    """CSV cells stay strings ("42" is an answer, not the number 42): every header column typed as a string."""
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    return {"features": datasets.Features({name: datasets.Value("string") for name in header})}


def _load_file(path: Path, text_column: str) -> tuple[str, datasets.Dataset]:
    return _canonical(_read_file(path), f"data file '{path}'", text_column)


def _find_split(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for ext in EXTENSIONS:
            if (folder / f"{name}{ext}").is_file():
                return folder / f"{name}{ext}"
    return None


def _split_off(name: str, kind: str, full: datasets.Dataset, source: str, sizes: SyntheticSizes) -> Shard:
    """A shard from one table: HELDOUT_SHARE of it (at most eval-examples) held out, seeded."""
    if len(full) < 2:
        raise FeddemError(f"{source} has {len(full)} example(s): need at least 2 to hold one out")
    held = min(max(1, round(HELDOUT_SHARE * len(full))), sizes.eval_examples)
    parts = full.train_test_split(test_size=held, seed=sizes.seed, shuffle=True)
    return Shard(name, parts["train"], parts["test"], kind)


def _two_splits(name: str, train: tuple[str, datasets.Dataset], heldout: tuple[str, datasets.Dataset],
                source: str) -> Shard:
    if train[0] != heldout[0]:
        raise FeddemError(f"{source} mixes formats: its train split is {train[0]} data, its held-out split "
                          f"{heldout[0]} data")
    return Shard(name, train[1], heldout[1], train[0])


def _load_saved(entry: Path, sizes: SyntheticSizes) -> Shard:
    source = f"saved dataset '{entry}'"
    try:
        saved = datasets.load_from_disk(str(entry))
    except Exception as exc:
        raise FeddemError(f"could not read {source}: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    return _from_loaded(entry.name, saved, source, sizes)


def _from_loaded(name: str, loaded, source: str, sizes: SyntheticSizes) -> Shard:
    """A shard from a Dataset (split off) or a DatasetDict (its train and held-out splits)."""
    if isinstance(loaded, datasets.Dataset):
        kind, full = _canonical(loaded, source, sizes.text_column)
        return _split_off(name, kind, full, source, sizes)
    splits = list(loaded)
    heldout = next((s for s in HELDOUT_NAMES if s in loaded), None)
    if "train" not in loaded:
        raise FeddemError(f"{source} has splits {', '.join(splits)}: need a 'train' split (and optionally one of "
                          f"{', '.join(HELDOUT_NAMES)})")
    train = _canonical(loaded["train"], f"{source}, split 'train'", sizes.text_column)
    if heldout is None:
        return _split_off(name, *train, source, sizes)
    return _two_splits(name, train, _canonical(loaded[heldout], f"{source}, split '{heldout}'", sizes.text_column),
                       source)


def load_hub(spec: str, sizes: SyntheticSizes) -> Shard:
    """A hub dataset `hf:ORG/NAME[:CONFIG][@SPLIT]` through `datasets.load_dataset` (the local cache when offline)."""
    name, config, split = _hub_parts(spec)
    try:
        loaded = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown name, gated: many exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FeddemError(f"could not load hub dataset '{spec}': not in the local cache and not reachable (no "
                          f"network here, or no such dataset/config/split): {first}") from None
    return _from_loaded(name.rsplit("/", 1)[-1], loaded, f"hub dataset '{spec}'", sizes)


def _load_folder_shard(entry: Path, sizes: SyntheticSizes) -> Shard:
    if entry.is_file():
        kind, full = _load_file(entry, sizes.text_column)
        return _split_off(entry.stem, kind, full, f"data file '{entry}'", sizes)
    if _is_saved_dataset(entry):
        return _load_saved(entry, sizes)
    train_file = _find_split(entry, ("train",))
    heldout_file = _find_split(entry, HELDOUT_NAMES)
    if train_file is None or heldout_file is None:
        raise FeddemError(
            f"site folder '{entry}' needs a train file and a held-out file "
            f"(train.* and one of {', '.join(n + '.*' for n in HELDOUT_NAMES)}, * in {', '.join(EXTENSIONS)}), "
            f"or a dataset saved with save_to_disk"
        )
    return _two_splits(entry.name, _load_file(train_file, sizes.text_column),
                       _load_file(heldout_file, sizes.text_column), f"site folder '{entry}'")


def _finish(shard: Shard, sizes: SyntheticSizes) -> Shard:
    """Cap the held-out part at eval-examples (a seeded sample) and warn when its test half is small."""
    if len(shard.heldout) > sizes.eval_examples:
        shard.heldout = shard.heldout.shuffle(seed=sizes.seed).select(range(sizes.eval_examples))
    test = len(shard.heldout) - len(shard.heldout) // 2 if len(shard.heldout) > 1 else len(shard.heldout)
    if test < MIN_HELDOUT:
        shard.warnings.append(f"{shard.name}: the held-out test split has {test} example(s), under {MIN_HELDOUT}: "
                              f"its figures say little (give more held-out data or raise --eval-examples)")
    return shard


def load_shard(spec: str, index: int, sizes: SyntheticSizes) -> Shard:
    """Site number `index`'s shard of a data spec."""
    names = list_shards(spec)
    if not 0 <= index < len(names):
        raise FeddemError(f"site {index} has no data: data spec '{spec}' provides {len(names)} shard(s)")
    if _is_synthetic(spec):
        if sizes.train_examples < 1 or sizes.eval_examples < 1:
            raise FeddemError("synthetic domains need at least 1 train and 1 held-out example")
        train, heldout = make_domain(names[index], sizes.train_examples, sizes.eval_examples, sizes.seed)
        return _finish(Shard(names[index], datasets.Dataset.from_dict({"text": train}),
                             datasets.Dataset.from_dict({"text": heldout})), sizes)
    if spec.startswith(HUB):
        return _finish(load_hub(spec, sizes), sizes)
    return _finish(_load_folder_shard(_folder_entries(spec)[index], sizes), sizes)


def load_run_shard(cfg, index: int) -> Shard:
    """Shard `index` of the run's `data` spec, sized by the run config; refused when its train or held-out part is
    empty (nothing to train or to score)."""
    shard = load_shard(cfg.data, index, SyntheticSizes.of(cfg))
    check_not_empty(shard)
    return shard


def check_not_empty(shard: Shard, owner: str = "") -> None:
    """A shard with no train or no held-out example is refused, naming its owner (a site) when given."""
    if len(shard.train) == 0 or len(shard.heldout) == 0:
        raise FeddemError(f"{owner + ': ' if owner else ''}shard '{shard.name}' has {len(shard.train)} train and "
                          f"{len(shard.heldout)} held-out examples")


def load_site_data(path: str, index: int, sizes: SyntheticSizes) -> Shard:
    """A deployed site's own data (its node config `data-path`), in the same formats as one entry of a data folder:
    a folder with `train.*` and a held-out file, a saved dataset, a folder holding exactly one such entry (a data
    file or a `NAME/` subfolder), a data file itself, or `hf:ORG/NAME`. `synthetic:NAME` generates a built-in
    domain instead, only when a site asks for it (a list `synthetic:a,b` or `synthetic` picks the entry at
    `index`)."""
    if _is_synthetic(path):
        return load_shard(path, index if len(_synthetic_domains(path)) > 1 else 0, sizes)
    if path.startswith(HUB):
        return load_shard(path, 0, sizes)
    root = Path(path).expanduser()
    if not root.exists():
        raise FeddemError(f"'{path}' does not exist at this site (expected a folder holding the site's data, "
                          f"or 'synthetic:NAME' to use a built-in domain)")
    if root.is_file() or _is_saved_dataset(root) or _find_split(root, ("train",)) is not None:
        return _finish(_load_folder_shard(root, sizes), sizes)
    entries = _folder_entries(path)
    if len(entries) != 1:
        raise FeddemError(f"site folder '{path}' holds {len(entries)} entries ({', '.join(p.name for p in entries)}) "
                          f"and no train.* file: give train.* and test.* files, or exactly one data file or subfolder")
    return _finish(_load_folder_shard(entries[0], sizes), sizes)


def general_mixture(train_examples: int, seed: int) -> list[str]:
    """The base model's pre-training text: every built-in domain in its general (part-vocabulary) form."""
    texts = []
    for name in DOMAINS:
        texts += make_domain(name, train_examples, 0, seed=seed, general=True)[0]
    return texts


def _token_stream(texts, tokenizer) -> list[int]:
    ids: list[int] = []
    for row in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(row)
        ids.append(tokenizer.eos_token_id)
    return ids


def pack_blocks(texts: list[str], tokenizer, seq_len: int, pad_last: bool = False) -> torch.Tensor:
    """Tokenize texts, join them with EOS, and cut the stream into [n, seq_len] blocks.

    The remainder is dropped for training (`pad_last=False`) or padded with the pad id for evaluation.
    """
    return _pack(texts, tokenizer, seq_len, pad_last).input_ids


@dataclass
class TokenBatch:
    """Model inputs of equal length: ids, labels (-100: not scored) and the attention mask, each [n, length]."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    truncated: int = 0  # examples cut to seq-len

    def __len__(self) -> int:
        return len(self.input_ids)

    def rows(self, index) -> "TokenBatch":
        """The rows at `index`, cut after the last position any of them uses (padding trimmed)."""
        mask = self.attention_mask[index]
        used = int(mask.sum(dim=1).max()) if len(mask) else 0
        return TokenBatch(self.input_ids[index][:, :used], self.labels[index][:, :used], mask[:, :used])

    def model_mask(self, device) -> torch.Tensor | None:
        """The attention mask for the model, or None when no position is padding (plain causal attention)."""
        return None if bool(self.attention_mask.all()) else self.attention_mask.to(device)

    @property
    def scored_tokens(self) -> int:
        return int((self.labels[:, 1:] != -100).sum())

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor) -> "TokenBatch":
        """Packed text blocks: every token is scored."""
        return cls(blocks, blocks.clone(), torch.ones_like(blocks))


def _pack(texts, tokenizer, seq_len: int, pad_last: bool) -> TokenBatch:
    if seq_len < 2:
        raise FeddemError(f"sequence length must be at least 2, got {seq_len}")
    ids = _token_stream(texts, tokenizer)
    n_full, rest = divmod(len(ids), seq_len)
    real = len(ids)
    if pad_last and rest:
        ids.extend([tokenizer.pad_token_id] * (seq_len - rest))
        n_full += 1
    if n_full == 0:
        raise FeddemError(f"{len(texts)} example(s) give {len(ids)} tokens: fewer than one block of {seq_len}")
    blocks = torch.tensor(ids[: n_full * seq_len], dtype=torch.long).view(n_full, seq_len)
    mask = (torch.arange(n_full * seq_len) < real).long().view(n_full, seq_len)
    return TokenBatch(blocks, blocks.masked_fill(mask == 0, -100), mask)


def _pad(examples, pad_id: int) -> TokenBatch:
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    return TokenBatch(ids, labels, mask, sum(e.truncated for e in examples))


def encode_examples(shard: Shard, split: str, tokenizer, seq_len: int, indices=None) -> TokenBatch:
    """Model inputs for rows `indices` (default: all) of the shard's `train` or `heldout` dataset: text packed into
    full blocks (training) or blocks with the last one padded (held-out), chat examples one per row, rendered with
    the chat template, padded to the longest, labels counting assistant tokens only, cut to `seq_len` (counted in
    `truncated`)."""
    data = getattr(shard, split)
    if indices is not None:
        data = data.select(indices)
    values = list(data[shard.column])
    if shard.kind == TEXT:
        return _pack(values, tokenizer, seq_len, pad_last=split != "train")
    if not values:
        raise FeddemError(f"{shard.name}: no {split} examples")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return _pad([encode_conversation(tokenizer, m, seq_len) for m in values], pad_id)


def encode_train(shard: Shard, tokenizer, seq_len: int, needed_sequences: int, seed: int) -> TokenBatch:
    """The training inputs, tokenising only what `needed_sequences` (steps x batch x accumulation) use: a seeded
    sample of the train rows, in their file order, grown until it fills one pass of the run (the whole shard when
    it is smaller). A pass over the whole shard packs exactly what `pack_blocks` would."""
    n = len(shard.train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    if shard.kind == CHAT:
        chosen = sorted(order[:needed_sequences])
        return encode_examples(shard, "train", tokenizer, seq_len, chosen if len(chosen) < n else None)
    needed_tokens, ids, tokens, chunk = needed_sequences * seq_len, {}, 0, 256
    texts = list(shard.train["text"])
    for start in range(0, n, chunk):
        part = order[start : start + chunk]
        for i, row in zip(part, tokenizer([texts[i] for i in part], add_special_tokens=False)["input_ids"]):
            if tokens >= needed_tokens + seq_len:  # one block more than needed: packing cuts at block edges
                break
            ids[i] = row
            tokens += len(row) + 1
        if tokens >= needed_tokens + seq_len:
            break
    stream = [t for i in sorted(ids) for t in ids[i] + [tokenizer.eos_token_id]]
    n_full = len(stream) // seq_len
    if n_full == 0:
        raise FeddemError(f"{shard.name}: {n} train example(s) give {len(stream)} tokens: fewer than one block of "
                          f"{seq_len}")
    return TokenBatch.from_blocks(torch.tensor(stream[: n_full * seq_len], dtype=torch.long).view(n_full, seq_len))


# The held-out split policy: one held-out part per shard, split in two halves used by the site (its report) and the
# server (the weight search, `feddem ablate` and the admin server's evaluations) alike.
SPLITS = ("validation", "test")


def heldout_indices(shard: Shard, split: str) -> list[int]:
    """The held-out split in two: its first half validates (the weight search), its second half tests (the report).
    A one-example held-out split serves as both."""
    if split not in SPLITS:
        raise FeddemError(f"unknown evaluation split '{split}': choose one of {', '.join(SPLITS)}")
    n = len(shard.heldout)
    if n < 2:
        return list(range(n))
    half = n // 2
    return list(range(half)) if split == "validation" else list(range(half, n))


def heldout_texts(shard: Shard, split: str) -> list:
    """The examples of a held-out split (texts, or `messages` lists for chat data)."""
    return list(shard.heldout.select(heldout_indices(shard, split))[shard.column])


def heldout_blocks(shard: Shard, tokenizer, cfg, split: str = "test") -> TokenBatch:
    """The model inputs of a held-out split at the run config's `seq-len` (`encode_examples`)."""
    return encode_examples(shard, "heldout", tokenizer, cfg.seq_len, heldout_indices(shard, split))
