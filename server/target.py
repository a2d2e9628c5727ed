"""The DGA target direction: minus the gradient of the loss on a few target-task examples the server holds."""

from dataclasses import replace

import torch

from feddem.common.config import RunConfig
from feddem.common.data import SyntheticSizes, TokenBatch, encode_examples, list_shards, load_shard
from feddem.common.errors import FeddemError
from feddem.common.vectors import Vector


def target_batches(cfg: RunConfig, tokenizer) -> list[TokenBatch]:
    """`target-examples` train examples of every shard of the target spec (default: the run's data spec), encoded
    as the sites encode them (text packed, chat rendered with the template and scored on assistant tokens only)."""
    spec = cfg.target or cfg.data
    sizes = SyntheticSizes(cfg.train_examples, cfg.eval_examples, cfg.seed, cfg.text_column)
    batches = []
    for index in range(len(list_shards(spec))):
        shard = load_shard(spec, index, sizes)
        rows = list(range(min(cfg.target_examples, len(shard.train))))
        batches.append(_encode_target(shard, tokenizer, cfg.seq_len, rows))
    return batches


def _encode_target(shard, tokenizer, seq_len: int, rows: list[int]) -> TokenBatch:
    """The rows as a held-out selection: a few text examples may fill less than a block, and encode_examples pads
    the last text block of any split but `train`."""
    return encode_examples(replace(shard, heldout=shard.train), "heldout", tokenizer, seq_len, rows)


def target_direction(model, tokenizer, cfg: RunConfig) -> Vector:
    """-grad of the mean next-token loss over the target examples' scored tokens, at `model`'s parameters
    (float32, CPU)."""
    batches = target_batches(cfg, tokenizer)
    total = sum(b.scored_tokens for b in batches)
    if total == 0:
        raise FeddemError("dga: the target examples hold no scored token")
    model.train()
    model.zero_grad(set_to_none=True)
    for data in batches:
        for start in range(0, len(data), cfg.batch_size):
            batch = data.rows(slice(start, start + cfg.batch_size))
            if batch.scored_tokens == 0:
                continue
            out = model(input_ids=batch.input_ids, attention_mask=batch.model_mask("cpu"), labels=batch.labels)
            (out.loss * (batch.scored_tokens / total)).backward()
    direction = {name: -p.grad.detach().float().clone() for name, p in model.named_parameters()
                 if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.eval()
    if not direction or not all(torch.isfinite(t).all() for t in direction.values()):
        raise FeddemError("dga: the target gradient is empty or not finite")
    return direction
