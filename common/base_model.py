"""The embedded default base model: the tiny Llama, pre-trained briefly on the general mixture, cached on disk.

A random model is meaningless to edit, so the default base is trained first. The result depends only on the
seed and the settings below; it is cached under $FEDDEM_HOME/base/<key>/ and later runs reuse it. The cache is
written to a temporary folder and renamed into place, so a crash never leaves a half-written base.
"""

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from feddem.common.atomic import atomic_folder
from feddem.common.data import general_mixture, pack_blocks
from feddem.common.modeling import TINY_LLAMA, build_model, tiny_llama_config
from feddem.common.paths import feddem_home
from feddem.common.tokenizer import build_byte_tokenizer
from feddem.common.training import TrainSettings, train_causal_lm

EMBEDDED_VERSION = 2  # bump when the model, tokenizer, mixture or loop changes what a key produces


@dataclass
class BaseSettings:
    steps: int = 300
    lr: float = 2e-3
    batch_size: int = 16
    seq_len: int = 128
    examples_per_domain: int = 3000
    seed: int = 0
    model: dict | None = None  # overrides of the tiny Llama config (tests use smaller models)

    def key(self) -> str:
        fields = asdict(self) | {"version": EMBEDDED_VERSION, "architecture": dict(TINY_LLAMA, **(self.model or {}))}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def embedded_base_path(settings: BaseSettings, home: Path | None = None) -> Path:
    return (home or feddem_home()) / "base" / f"tiny-llama-{settings.key()}"


def ensure_embedded_base(
    settings: BaseSettings,
    device: torch.device,
    home: Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Path of the cached embedded base model, pre-training and saving it first if it is not cached yet."""
    path = embedded_base_path(settings, home)
    if (path / "config.json").is_file():
        return path
    tokenizer = build_byte_tokenizer()
    model = build_model(tiny_llama_config(**(settings.model or {})), settings.seed)
    blocks = pack_blocks(general_mixture(settings.examples_per_domain, settings.seed), tokenizer, settings.seq_len)
    train = TrainSettings(steps=settings.steps, lr=settings.lr, batch_size=settings.batch_size, seed=settings.seed)
    stats = train_causal_lm(model, blocks, train, device, on_step)
    with atomic_folder(path, complete="config.json") as tmp:  # another process may cache the same key
        model.to("cpu").save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "feddem_base.json").write_text(json.dumps(asdict(settings) | {"pretrain": stats}, indent=2))
    return path
