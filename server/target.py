"""The DGA target direction: minus the gradient of the loss on a few target-task examples the server holds."""

import torch

from feddem.common.config import RunConfig
from feddem.common.data import SyntheticSizes, list_shards, load_shard, pack_blocks
from feddem.common.errors import FeddemError
from feddem.common.vectors import Vector


def target_texts(cfg: RunConfig) -> list[str]:
    """`target-examples` train examples of every shard of the target spec (default: the run's data spec)."""
    spec = cfg.target or cfg.data
    sizes = SyntheticSizes(cfg.train_examples, cfg.eval_examples, cfg.seed)
    texts = []
    for index in range(len(list_shards(spec))):
        texts += list(load_shard(spec, index, sizes).train["text"][: cfg.target_examples])
    return texts


def target_direction(model, tokenizer, cfg: RunConfig) -> Vector:
    """-grad of the mean next-token loss over the target examples, at `model`'s parameters (float32, CPU)."""
    blocks = pack_blocks(target_texts(cfg), tokenizer, cfg.seq_len, pad_last=True)
    model.train()
    model.zero_grad(set_to_none=True)
    for batch in blocks.split(cfg.batch_size):
        labels = batch.masked_fill(batch == tokenizer.pad_token_id, -100)
        loss = model(input_ids=batch, labels=labels).loss * (batch.shape[0] / blocks.shape[0])
        loss.backward()
    direction = {name: -p.grad.detach().float().clone() for name, p in model.named_parameters()
                 if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.eval()
    if not direction or not all(torch.isfinite(t).all() for t in direction.values()):
        raise FeddemError("dga: the target gradient is empty or not finite")
    return direction
