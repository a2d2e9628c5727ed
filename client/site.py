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
from common.data import Shard, SyntheticSizes, load_shard, pack_blocks
from common.devices import resolve_device
from common.errors import FeddemError
from common.evaluation import evaluate_loss
from common.modeling import load_model, load_tokenizer, model_checksum
from common.paths import feddem_home
from common.training import TrainSettings, train_causal_lm
from common.vectors import Vector, apply_vector, extract_lora_vector, extract_vector, load_vector, parameters_of, save_vector

log = logging.getLogger("feddem.site")


@dataclass
class SiteContext:
    """Who the site is and where it keeps its files."""

    index: int  # which shard of the data spec (partition-id)
    name: str
    work_dir: Path

    @classmethod
    def from_node_config(cls, node_config: dict) -> "SiteContext":
        if "partition-id" not in node_config:
            raise FeddemError("this node has no 'partition-id' in its node config: cannot tell which shard is its own")
        index = int(node_config["partition-id"])
        name = str(node_config.get("site-name") or f"site-{index}")
        work_dir = Path(str(node_config.get("work-dir") or feddem_home() / "sites" / name)).expanduser()
        return cls(index, name, work_dir)

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
    shard = load_shard(cfg.data, site.index, SyntheticSizes(cfg.train_examples, cfg.eval_examples, cfg.seed))
    if len(shard.train) == 0 or len(shard.heldout) == 0:
        raise FeddemError(f"{site.name}: shard '{shard.name}' has {len(shard.train)} train and {len(shard.heldout)} held-out examples")
    return shard


def _heldout_blocks(shard: Shard, tokenizer, cfg: RunConfig) -> torch.Tensor:
    return pack_blocks(shard.heldout["text"], tokenizer, cfg.seq_len, pad_last=True)


def fine_tune(cfg: RunConfig, site: SiteContext, model_ref: str, checksum: str, run_id: int) -> dict:
    """Fine-tune on the site's train split, save the vector locally, return the metadata the server may see."""
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    base = load_verified_base(model_ref, checksum)
    tokenizer = load_tokenizer(model_ref)
    shard = load_site_shard(cfg, site)
    train_blocks = pack_blocks(shard.train["text"], tokenizer, cfg.seq_len)
    heldout = _heldout_blocks(shard, tokenizer, cfg)
    base_eval = evaluate_loss(base, heldout, tokenizer.pad_token_id, device)

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

    settings = TrainSettings(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                             seed=cfg.seed + site.index)
    stats = train_causal_lm(model, train_blocks, settings, device, on_step)
    local_eval = evaluate_loss(model, heldout, tokenizer.pad_token_id, device)
    if cfg.lora:
        vector = extract_lora_vector(model)
    else:
        vector = extract_vector(model, parameters_of(base))
    save_vector(vector, site.vector_path(run_id), metadata={"site": site.name, "domain": shard.name})
    train_tokens = int(train_blocks.numel())
    return {
        "site": site.name,
        "domain": shard.name,
        "examples": len(shard.train),
        "tokens": train_tokens,
        "heldout_examples": len(shard.heldout),
        "train_loss": stats["train_loss"],
        "tokens_per_second": stats["tokens_per_second"],
        "base_loss": base_eval["loss"],
        "local_loss": local_eval["loss"],
        "heldout_tokens": base_eval["tokens"],
        "seconds": time.perf_counter() - start,
    }


def stored_vector(site: SiteContext, run_id: int) -> Vector:
    path = site.vector_path(run_id)
    if not path.is_file():
        raise FeddemError(f"{site.name} holds no vector for run {run_id}: it has not fine-tuned in this run")
    return load_vector(path)


def evaluate_merged(cfg: RunConfig, site: SiteContext, model_ref: str, checksum: str, aggregate: Vector) -> dict:
    """Held-out loss of base + aggregate on the site's own domain."""
    device = resolve_device(cfg.device)
    model = load_verified_base(model_ref, checksum)
    tokenizer = load_tokenizer(model_ref)
    apply_vector(model, aggregate)
    shard = load_site_shard(cfg, site)
    result = evaluate_loss(model, _heldout_blocks(shard, tokenizer, cfg), tokenizer.pad_token_id, device)
    return {"site": site.name, "domain": shard.name, "merged_loss": result["loss"], "heldout_tokens": result["tokens"]}
