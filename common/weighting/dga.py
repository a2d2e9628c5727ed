"""DGA (dynamic gradient alignment): lean the merge toward the sites whose update helps a target task. All of DGA
lives here, the server's part and the site's part:

1. the server computes the target direction (`target_direction`: minus the gradient of the loss on a few target
   examples, at the model the round starts from) and sends it with the training request;
2. each site returns the cosine of its vector with it (`alignment`, called by `client.site.fine_tune`); only that
   number leaves the site;
3. the server's weights follow an exponentiated-gradient step from the previous round's weights (uniform in round
   1), w_i <- w_i exp(eta a_i / max|a|), normalised, smoothed by an exponential moving average over rounds
   (`dga-ema`: the share of the previous weights) (`dga_weights`, `eg_update`).

torch and the data loaders are imported inside the functions that need them: the run config's checks import this
module for the strategy's parameters alone.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from feddem.common.errors import FeddemError
from feddem.common.weighting.base import ALIGNMENT, Parameter, SiteReport, WeightingStrategy, normalised

if TYPE_CHECKING:
    from feddem.common.config import RunConfig
    from feddem.common.data import TokenBatch
    from feddem.common.vectors import Vector

ETA = Parameter("dga-eta", float, 2.0, "dga: step size of the exponentiated-gradient update", low=0.0, open_low=True)
EMA = Parameter("dga-ema", float, 0.5, "dga: share of the previous round's weights kept (moving average); round 1 "
                "starts from uniform", low=0.0, high=1.0, open_high=True)
TARGET = Parameter("target", str, "", "dga: data spec of the target task the server holds; empty = the run's data")
TARGET_EXAMPLES = Parameter("target-examples", int, 32, "dga: target examples per target shard for the target "
                            "gradient", low=1)

STATE_KEY = "dga-weights"  # site name -> weight of the previous round


def eg_update(previous: np.ndarray, alignments: np.ndarray, eta: float, ema: float) -> np.ndarray:
    a = np.asarray(alignments, dtype=np.float64)
    if not np.isfinite(a).all():
        raise FeddemError("dga: a site reported a non-finite alignment")
    scale = np.abs(a).max()
    step = previous * np.exp(eta * (a / scale if scale > 0 else a))
    step /= step.sum()
    return ema * previous + (1.0 - ema) * step


def dga_weights(sites: list[SiteReport], cfg, state: dict) -> list[float]:
    missing = [s.site for s in sites if ALIGNMENT not in s.extra]
    if missing:
        raise FeddemError(f"dga: no alignment from {', '.join(missing)}")
    before = state.get(STATE_KEY, {})
    previous = np.asarray(normalised([before.get(s.site, 1.0 / len(sites)) for s in sites]))
    weights = eg_update(previous, np.array([float(s.extra[ALIGNMENT]) for s in sites]), cfg.dga_eta, cfg.dga_ema)
    state[STATE_KEY] = {s.site: float(w) for s, w in zip(sites, weights)}
    return [float(w) for w in weights]


STRATEGY = WeightingStrategy("dga", "exponentiated-gradient weights from each vector's alignment with a target task",
                             dga_weights, frozenset({ALIGNMENT}), params=(ETA, EMA, TARGET, TARGET_EXAMPLES))


# -- the server's part: the target direction -------------------------------------------------------------------------

def target_batches(cfg: RunConfig, tokenizer) -> list[TokenBatch]:
    """`target-examples` train examples of every shard of the target spec (default: the run's data spec), encoded
    as the sites encode them (text packed, chat rendered with the template and scored on assistant tokens only)."""
    from feddem.common.data import SyntheticSizes, list_shards, load_shard

    spec = cfg.target or cfg.data
    sizes = SyntheticSizes.of(cfg)
    batches = []
    for index in range(len(list_shards(spec))):
        shard = load_shard(spec, index, sizes)
        rows = list(range(min(cfg.target_examples, len(shard.train))))
        batches.append(_encode_target(shard, tokenizer, cfg.seq_len, rows))
    return batches


def _encode_target(shard, tokenizer, seq_len: int, rows: list[int]) -> TokenBatch:
    """The rows as a held-out selection: a few text examples may fill less than a block, and encode_examples pads
    the last text block of any split but `train`."""
    from dataclasses import replace

    from feddem.common.data import encode_examples

    return encode_examples(replace(shard, heldout=shard.train), "heldout", tokenizer, seq_len, rows)


def target_direction(model, tokenizer, cfg: RunConfig) -> Vector:
    """-grad of the mean next-token loss over the target examples' scored tokens, at `model`'s parameters
    (float32, CPU)."""
    import torch

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


# -- the site's part: the alignment of its vector --------------------------------------------------------------------

def alignment(vector: Vector, direction: Vector) -> float:
    """Cosine of the site's vector with the target direction, over the parameters both cover."""
    shared = [name for name in vector if name in direction]
    if not shared:
        raise FeddemError("alignment: the target direction covers none of this site's vector parameters")
    dot = vn = dn = 0.0
    for name in shared:
        v, d = vector[name].double().reshape(-1), direction[name].double().reshape(-1)
        if v.shape != d.shape:
            raise FeddemError(f"alignment: target direction '{name}' has {d.numel()} values, the vector {v.numel()}")
        dot += float(v @ d)
        vn += float(v @ v)
        dn += float(d @ d)
    if not (math.isfinite(dot) and vn > 0 and dn > 0):
        return 0.0
    return dot / math.sqrt(vn * dn)
