"""What one site does, independent of Flower: load its shard and the base, fine-tune, keep its vector, evaluate.

The site's vector stays on its own disk (`<work-dir>/runs/<run-id>/vector.safetensors`); only metadata and, when
asked, the weighted vector leave it.
"""

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import RunConfig
from common.data import Shard, SyntheticSizes, load_shard, load_site_data, pack_blocks
from common.devices import resolve_device
from common.errors import FeddemError
from common.evaluation import evaluate_loss
from common.modeling import load_model, load_tokenizer, model_checksum
from common.paths import feddem_home
from common.training import TrainSettings, train_causal_lm
from client.signals import alignment, domain_embedding
from common.vectors import Vector, apply_vector, extract_lora_vector, extract_vector, load_vector, parameters_of, save_vector

log = logging.getLogger("feddem.site")


@dataclass
class SiteContext:
    """Who the site is, where it keeps its files, and what its own node config says about its data and device.

    Simulated sites get `partition-id` (their shard of the run's `data` spec). A deployed site's SuperNode gets
    `--node-config` with `data-path` (its own data: a folder with `train.*` and `test.*` files, a folder holding one
    data file, or that file; `synthetic:NAME` only when a built-in domain is wanted on purpose), and optionally
    `site-name`, `domain` (the name its data goes by in the report), `device` (overrides the run's), `work-dir`,
    and the privacy guard's stricter `min-peers`/`weight-min`/`weight-max` (`client.guard`).
    """

    index: int  # which shard of the data spec (partition-id); 0 for a deployed site
    name: str
    work_dir: Path
    data_path: str | None = None  # node config `data-path`: the site's own data (deployment)
    device: str | None = None  # node config `device`: this site's device, whatever the run config says
    domain: str | None = None  # node config `domain`: the name of the site's data in the report

    @classmethod
    def from_node_config(cls, node_config: dict) -> "SiteContext":
        data_path = node_config.get("data-path")
        if "partition-id" not in node_config and data_path is None:
            raise FeddemError("this node's node config has no 'data-path' (a deployed site's own data folder, e.g. "
                              "--node-config 'data-path=\"/data/site\"') and no 'partition-id' (a simulated site's "
                              "shard of the run's data): cannot tell which data is its own")
        index = int(node_config.get("partition-id", 0))
        default_name = f"site-{index}" if "partition-id" in node_config else f"site-{Path(str(data_path)).name}"
        name = str(node_config.get("site-name") or default_name)
        work_dir = Path(str(node_config.get("work-dir") or feddem_home() / "sites" / name)).expanduser()
        optional = {k: str(node_config[k]) for k in ("device", "domain") if node_config.get(k)}
        return cls(index, name, work_dir, None if data_path is None else str(data_path), **optional)

    def resolve_device(self, cfg: RunConfig):
        """The torch device: the site's own `device` when its node config sets one, else the run's."""
        return resolve_device(self.device or cfg.device)

    def vector_path(self, run_id: int) -> Path:
        return self.work_dir / "runs" / str(run_id) / "vector.safetensors"


def load_verified_base(ref: str, checksum: str):
    """The base model, refused when its checksum differs from the one the server announced."""
    model = load_model(ref)
    actual = model_checksum(model)
    if checksum and actual != checksum:
        raise FeddemError(f"base model '{ref}' at this site has checksum {actual[:12]}..., the run expects {checksum[:12]}...")
    return model


def load_site_shard(cfg: RunConfig, site: SiteContext) -> Shard:
    """The site's data: its own `data-path` when deployed, else its shard of the run's `data` spec."""
    sizes = SyntheticSizes(cfg.train_examples, cfg.eval_examples, cfg.seed)
    if site.data_path is None:
        shard = load_shard(cfg.data, site.index, sizes)
    else:
        try:
            shard = load_site_data(site.data_path, site.index, sizes)
        except FeddemError as exc:
            raise FeddemError(f"{site.name}: node config data-path: {exc}") from None
    if site.domain:
        shard.name = site.domain
    if len(shard.train) == 0 or len(shard.heldout) == 0:
        raise FeddemError(f"{site.name}: shard '{shard.name}' has {len(shard.train)} train and {len(shard.heldout)} held-out examples")
    return shard


SPLITS = ("validation", "test")


def heldout_texts(shard: Shard, split: str) -> list[str]:
    """The held-out split in two: its first half validates (the weight search), its second half tests (the report).
    A one-example held-out split serves as both."""
    if split not in SPLITS:
        raise FeddemError(f"unknown evaluation split '{split}': choose one of {', '.join(SPLITS)}")
    texts = list(shard.heldout["text"])
    if len(texts) < 2:
        return texts
    half = len(texts) // 2
    return texts[:half] if split == "validation" else texts[half:]


def heldout_blocks(shard: Shard, tokenizer, cfg: RunConfig, split: str = "test") -> torch.Tensor:
    return pack_blocks(heldout_texts(shard, split), tokenizer, cfg.seq_len, pad_last=True)


def fine_tune(cfg: RunConfig, site: SiteContext, model_ref: str, checksum: str, run_id: int,
              start_from: Vector | None = None, target: Vector | None = None, embed: bool = False) -> dict:
    """Fine-tune on the site's train split, save the vector locally, return the metadata the server may see.

    `start_from`: the merged model of the previous round as a vector on the base (rounds > 1); the site's vector is
    then relative to that start. `target`: the server's target direction (DGA): the result gets `alignment`.
    `embed`: the result gets `embedding`, the base model's domain embedding (Chameleon)."""
    start = time.perf_counter()
    device = site.resolve_device(cfg)
    base = load_verified_base(model_ref, checksum)
    tokenizer = load_tokenizer(model_ref)
    shard = load_site_shard(cfg, site)
    train_blocks = pack_blocks(shard.train["text"], tokenizer, cfg.seq_len)
    heldout = heldout_blocks(shard, tokenizer, cfg)
    base_eval = evaluate_loss(base, heldout, tokenizer.pad_token_id, device)
    extra = {}
    if embed:
        extra["embedding"] = domain_embedding(base, train_blocks, tokenizer.pad_token_id, device)
    if start_from is not None:
        apply_vector(base, start_from)

    model = copy.deepcopy(base)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)

    every = max(1, cfg.steps // 4)

    def on_step(step: int, loss: float) -> None:
        if step % every == 0 or step == cfg.steps:
            log.info("%s (%s): step %d/%d, loss %.4f", site.name, shard.name, step, cfg.steps, loss)

    settings = TrainSettings.from_run_config(cfg, seed=cfg.seed + site.index)
    stats = train_causal_lm(model, train_blocks, settings, device, on_step)
    local_eval = evaluate_loss(model, heldout, tokenizer.pad_token_id, device)
    if cfg.lora:
        vector = extract_lora_vector(model)
    else:
        vector = extract_vector(model, parameters_of(base))
    save_vector(vector, site.vector_path(run_id), metadata={"site": site.name, "domain": shard.name})
    if target is not None:
        extra["alignment"] = alignment(vector, target)
    train_tokens = int(train_blocks.numel())
    return extra | {
        "site": site.name,
        "domain": shard.name,
        "examples": len(shard.train),
        "tokens": train_tokens,
        "heldout_examples": len(heldout_texts(shard, "test")),
        "train_loss": stats["train_loss"],
        "tokens_per_second": stats["tokens_per_second"],
        "base_loss": base_eval["loss"],
        "local_loss": local_eval["loss"],
        "heldout_tokens": base_eval["tokens"],
        "seconds": time.perf_counter() - start,
    }


def vector_file(site: SiteContext, run_id: int) -> Path:
    """The path of the site's stored vector of this run; an error when it has none."""
    path = site.vector_path(run_id)
    if not path.is_file():
        raise FeddemError(f"{site.name} holds no vector for run {run_id}: it has not fine-tuned in this run")
    return path


def stored_vector(site: SiteContext, run_id: int) -> Vector:
    return load_vector(vector_file(site, run_id))


def evaluate_merged(cfg: RunConfig, site: SiteContext, model_ref: str, checksum: str, aggregate: Vector,
                    split: str = "test") -> dict:
    """Loss of base + aggregate on the site's own domain, on the validation or the test half of its held-out data."""
    device = site.resolve_device(cfg)
    model = load_verified_base(model_ref, checksum)
    tokenizer = load_tokenizer(model_ref)
    apply_vector(model, aggregate)
    shard = load_site_shard(cfg, site)
    result = evaluate_loss(model, heldout_blocks(shard, tokenizer, cfg, split), tokenizer.pad_token_id, device)
    return {"site": site.name, "domain": shard.name, "merged_loss": result["loss"], "heldout_tokens": result["tokens"]}
