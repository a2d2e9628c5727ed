"""What one site does, independent of Flower: load its shard and the base, fine-tune, keep its vector, evaluate.

The site's vector stays on its own disk (`<work-dir>/runs/<run-id>/vector.safetensors`); only metadata and, when
asked, the weighted vector leave it.
"""

import logging
import time
from collections.abc import Mapping

import torch

from feddem.common.config import RunConfig
from feddem.common.chat_format import CHAT
from feddem.common.data import (
    Shard, SyntheticSizes, TokenBatch, check_not_empty, column_rows, encode_train, heldout_blocks, heldout_indices,
    heldout_texts, load_shard, load_site_data,
)
from feddem.common.errors import FeddemError
from feddem.common.sparsify import sparsify
from feddem.common.evaluation import evaluate_loss, generation_metrics
from feddem.common.progress import ProgressWriter
from feddem.common.modeling import base_tensors, load_model, load_tokenizer, model_checksum
from feddem.common.training import TrainSettings, train_causal_lm
from feddem.client import ledger
from feddem.client.merge_parts import compute_statistics
from feddem.client.guard import data_digest, record_trained, training_seed
from feddem.client.signals import domain_embedding
from feddem.common.weighting.dga import alignment
from feddem.common.site_context import BASE_EVAL_NAME, SiteContext
from feddem.common.vector_io import save_vector
from feddem.common.vectors import LazyVector, Vector, apply_vector, cast, extract_lora_vector, extract_vector, merged

log = logging.getLogger("feddem.site")


def load_verified_base(ref: str, checksum: str):
    """The base model, refused when its checksum differs from the one the server announced."""
    model = load_model(ref)
    actual = model_checksum(model)
    if checksum and actual != checksum:
        raise FeddemError(f"base model '{ref}' at this site has checksum {actual[:12]}..., the run expects {checksum[:12]}...")
    return model


def load_site_shard(cfg: RunConfig, site: SiteContext) -> Shard:
    """The site's data: its own `data-path` when deployed, else its shard of the run's `data` spec."""
    if site.data_path is None:
        shard = load_shard(cfg.data, site.index, SyntheticSizes.of(cfg))
    else:
        try:
            shard = load_site_data(site.data_path, site.index, SyntheticSizes.of(cfg))
        except FeddemError as exc:
            raise FeddemError(f"{site.name}: node config data-path: {exc}") from None
    if site.domain:
        shard.name = site.domain
    check_not_empty(shard, site.name)
    return shard


GEN_MAX_NEW_TOKENS = 32  # tokens generated per held-out prompt for the generation metric


def generation_sample(shard: Shard, cfg: RunConfig, split: str = "test") -> list:
    """The held-out conversations answered for the generation metric: the first `gen-examples` of the split, for
    instruction/chat data only (none for text)."""
    if shard.kind != CHAT or cfg.gen_examples <= 0:
        return []
    return heldout_texts(shard, split)[: cfg.gen_examples]


def _generation(model, tokenizer, conversations: list, cfg: RunConfig, device, prefix: str = "") -> dict:
    if not conversations:
        return {}
    return generation_metrics(model, tokenizer, conversations, device, cfg.seq_len, GEN_MAX_NEW_TOKENS, prefix)


def starting_point(model_ref: str, names: list[str], start_from: Vector | None) -> Mapping[str, torch.Tensor]:
    """The weights training started from, read lazily from the base's files (no second copy of the model in
    memory): the base, plus `start_from` with the arithmetic `apply_vector` used on the model."""
    base = base_tensors(model_ref, names)
    if start_from is None:
        return base

    def load(name: str) -> torch.Tensor:
        return merged(base[name].float(), start_from[name]) if name in start_from else base[name]

    return LazyVector({name: (torch.float32, shape) for name, (_, shape) in base.specs.items()}, load)


def _training_start(model, start_from: Vector | None, cfg: RunConfig):
    """The model training starts from: the base moved to `start_from` (rounds > 1), wrapped for LoRA training when
    the run asks for it (`--lora`)."""
    if start_from is not None:
        apply_vector(model, start_from)
    if not cfg.lora:
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _train_blocks(cfg: RunConfig, shard: Shard, tokenizer, settings: TrainSettings, seed: int) -> TokenBatch:
    """The training sequences the run draws (steps x accumulation x batch size)."""
    needed = cfg.steps * settings.accumulation(cfg.seq_len) * cfg.batch_size  # sequences the run draws
    return encode_train(shard, tokenizer, cfg.seq_len, needed, seed)


def _step_logger(cfg: RunConfig, site: SiteContext, shard: Shard, settings: TrainSettings):
    """The training's per-step callback: progress to `feddem simulate`'s console (when it asks) and a log line at
    every quarter of the steps."""
    every = max(1, cfg.steps // 4)
    progress = ProgressWriter(site.name, shard.name, cfg.steps,  # to `feddem simulate`'s console, when it asks
                              settings.accumulation(cfg.seq_len) * cfg.batch_size * cfg.seq_len)

    def on_step(step: int, loss: float) -> None:
        progress.step(step, loss)
        if step % every == 0 or step == cfg.steps:
            log.info("%s (%s): step %d/%d, loss %.4f", site.name, shard.name, step, cfg.steps, loss)

    return on_step


def _save_site_vector(cfg: RunConfig, site: SiteContext, model, model_ref: str, start_from: Vector | None,
                      run_id: int, seed: int, shard: Shard) -> Vector:
    """The trained model's vector (relative to where it started), sparsified as the site does, saved locally."""
    if cfg.lora:
        vector = extract_lora_vector(model)
    else:
        vector = extract_vector(model, starting_point(model_ref, [n for n, _ in model.named_parameters()], start_from))
    # the site's own sparsification (`common.sparsify`), keyed by its secret: what is stored is what any upload sends
    vector = sparsify(vector, cfg.sparsify, ledger.secret(site) + f"|{run_id}|{seed}".encode())
    save_vector(cast(vector, cfg.torch_vector_dtype), site.vector_path(run_id),
                metadata={"site": site.name, "domain": shard.name})
    return vector


def _warnings(shard: Shard, truncated: int, cfg: RunConfig) -> str:
    warnings = list(shard.warnings)
    if truncated:
        warnings.append(f"{shard.name}: {truncated} example(s) longer than seq-len {cfg.seq_len} were truncated")
    return "\n".join(warnings)


def evaluate_base(model, tokenizer, heldout: TokenBatch, prompts: list, cfg: RunConfig, device) -> tuple[dict, dict]:
    """The base model's held-out loss (`evaluate_loss`) and, for chat data, its generation figures under base_*."""
    return evaluate_loss(model, heldout, None, device), _generation(model, tokenizer, prompts, cfg, device, "base_")


def base_evaluation(cfg: RunConfig, site: SiteContext, run_id: int, checksum: str, data: str, model, tokenizer,
                    heldout: TokenBatch, prompts: list, device) -> tuple[dict, dict]:
    """`evaluate_base` once per run: the base does not change between the rounds of a run, so round 1's figures
    are kept beside the run's vector (`BASE_EVAL_NAME`) and a later round of the same run (same base checksum,
    run config, data digest and device) reads them back instead of evaluating the base again."""
    import json
    from dataclasses import fields

    from feddem.common.atomic import write_atomic

    if not checksum:  # no checksum to tie the kept figures to this base
        return evaluate_base(model, tokenizer, heldout, prompts, cfg, device)
    path = site.vector_path(run_id).with_name(BASE_EVAL_NAME)
    key = {"checksum": checksum, "settings": {f.name: getattr(cfg, f.name) for f in fields(cfg)}, "data": data,
           "device": str(device), "data_path": site.data_path, "domain": site.domain}
    try:
        kept = json.loads(path.read_text())
        if kept.get("key") == json.loads(json.dumps(key)):
            log.info("%s: the base's evaluation of this run's round 1 (%s), not evaluated again", site.name, path)
            return kept["loss"], kept["extra"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    loss, extra = evaluate_base(model, tokenizer, heldout, prompts, cfg, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"key": key, "loss": loss, "extra": extra}))
    return loss, extra


def fine_tune(cfg: RunConfig, site: SiteContext, model_ref: str, checksum: str, run_id: int,
              start_from: Vector | None = None, target: Vector | None = None, embed: bool = False) -> dict:
    """Fine-tune on the site's train split, save the vector locally, return the metadata the server may see.

    `start_from`: the merged model of the previous round as a vector on the base (rounds > 1); the site's vector is
    then relative to that start. `target`: the server's target direction (DGA): the result gets `alignment`.
    `embed`: the result gets `embedding`, the base model's domain embedding (Chameleon).

    Besides the losses the result holds `data_format` (`text` or `chat`), `truncated_examples` (train and test
    examples cut to seq-len, never dropped), `warnings` (one string, one warning per line, empty when none: a small
    held-out split, truncation), `setup_seconds` (base, tokenizer, data), `train_seconds`, `eval_seconds` (the
    base's and the local model's held-out loss and generation) and `seconds` (all of it), for chat data the
    generation metric of the base and the local model (`base_gen_exact_match`, `base_gen_rouge_l`, `base_samples`,
    and the same with `local_`; `common.evaluation.generation_metrics`), and `merge_stats_seconds` and
    `merge_stats_examples` (the train examples they used, at most `merge-examples`) when the run's merge rule needs
    statistics (`client.merge_parts`: computed after training, stored beside the vector)."""
    start = time.perf_counter()
    device = site.resolve_device(cfg)
    model = load_verified_base(model_ref, checksum)
    tokenizer = load_tokenizer(model_ref)
    shard = load_site_shard(cfg, site)
    # the guard's randomness: a spent (data, seed) pair trains with fresh randomness, never the same vector again
    # every train row may be drawn (the sample depends on the seed, the seed on this digest): all are digested,
    # streamed (`column_rows`), never the whole column in memory
    data = data_digest(column_rows(shard.train, shard.column))
    seed, seed_base, fresh = training_seed(site, cfg, run_id, data)
    settings = TrainSettings.from_run_config(cfg, seed=seed)
    settings.validate()
    train_data = _train_blocks(cfg, shard, tokenizer, settings, seed)
    heldout = heldout_blocks(shard, tokenizer, cfg)
    prompts = generation_sample(shard, cfg)
    setup_seconds = time.perf_counter() - start
    base_eval, extra = base_evaluation(cfg, site, run_id, checksum, data, model, tokenizer, heldout, prompts, device)
    base_eval_seconds = time.perf_counter() - start - setup_seconds
    if embed:
        extra["embedding"] = domain_embedding(model, train_data, tokenizer.pad_token_id, device)
    model = _training_start(model, start_from, cfg)
    # in place: no copy of the base is kept
    stats = train_causal_lm(model, train_data, settings, device, _step_logger(cfg, site, shard, settings))
    eval_start = time.perf_counter()
    local_eval = evaluate_loss(model, heldout, None, device)
    extra |= _generation(model, tokenizer, prompts, cfg, device, "local_")
    eval_seconds = base_eval_seconds + time.perf_counter() - eval_start
    vector = _save_site_vector(cfg, site, model, model_ref, start_from, run_id, seed, shard)
    # the run's merge rule's statistics (fisher, regmean), on the train data, stored beside the vector
    extra |= compute_statistics(cfg, site, model, train_data, list(vector), run_id, device)
    record_trained(site, run_id, cfg, data, seed_base, fresh)  # the guard's record: digest, data, declared mode
    if target is not None:
        extra["alignment"] = alignment(vector, target)
    truncated = train_data.truncated + heldout.truncated
    return extra | {
        "site": site.name,
        "domain": shard.name,
        "data_format": shard.kind,
        "examples": len(shard.train),
        "tokens": int(train_data.attention_mask.sum()),
        "heldout_examples": len(heldout_indices(shard, "test")),
        "truncated_examples": truncated,
        "warnings": _warnings(shard, truncated, cfg),
        "train_loss": stats["train_loss"],
        "tokens_per_second": stats["tokens_per_second"],
        "base_loss": base_eval["loss"],
        "local_loss": local_eval["loss"],
        "heldout_tokens": base_eval["tokens"],
        "setup_seconds": setup_seconds,
        "train_seconds": stats["train_seconds"],
        "eval_seconds": eval_seconds,
        "seconds": time.perf_counter() - start,
    }


def evaluate_merged(cfg: RunConfig, site: SiteContext, model_ref: str, checksum: str, aggregate: Vector,
                    split: str = "test") -> dict:
    """Loss of base + aggregate on the site's own domain, on the validation or the test half of its held-out data;
    on the test half of chat data also `gen_exact_match`, `gen_rouge_l` (numbers) and `samples` (a JSON list of
    {prompt, reference, answer})."""
    device = site.resolve_device(cfg)
    model = load_verified_base(model_ref, checksum)
    tokenizer = load_tokenizer(model_ref)
    apply_vector(model, aggregate)
    shard = load_site_shard(cfg, site)
    result = evaluate_loss(model, heldout_blocks(shard, tokenizer, cfg, split), None, device)
    generation = _generation(model, tokenizer, generation_sample(shard, cfg, split), cfg, device) if split == "test" else {}
    return generation | {"site": site.name, "domain": shard.name, "merged_loss": result["loss"],
                         "heldout_tokens": result["tokens"]}
