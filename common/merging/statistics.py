"""A site's own statistics for the merge rules of `common.merging.rules`, computed on its own train data.

- `diagonal_fisher`: the empirical diagonal Fisher of the tensors a vector names, the mean over `examples` single
  examples of the squared gradient of that example's loss (per-example gradients, so it is the Fisher estimate
  of Matena and Raffel, not the square of a batch gradient).
- `input_grams`: for each linear layer whose weight the vector names, the Gram matrix X^T X of the layer's inputs
  over every attended token, divided by the number of tokens (a per-token second moment, so sites with more data
  do not outweigh the others by size: the weights do that).

Both take a dense model (for a LoRA site: the base with the adapters merged in, so the statistics are those of
the dense weights the vector changes) and a `common.data.TokenBatch`. They leave the model's parameters and its
`requires_grad` flags as they found them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from feddem.common.data import TokenBatch
from feddem.common.errors import FeddemError


def _named(model: torch.nn.Module, names: Iterable[str]) -> dict[str, torch.nn.Parameter]:
    params = dict(model.named_parameters())
    wanted = list(names)
    missing = [n for n in wanted if n not in params]
    if missing:
        raise FeddemError(f"the model has no parameter '{missing[0]}' ({len(missing)} of the vector's names missing)")
    return {n: params[n] for n in wanted}


def _rows(data: TokenBatch, examples: int) -> list[int]:
    if len(data) == 0:
        raise FeddemError("no examples to compute the merge statistics on")
    return list(range(min(examples, len(data))))


def diagonal_fisher(model: torch.nn.Module, data: TokenBatch, names: Iterable[str], examples: int = 16,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Mean over the first `examples` rows of `data` of each named parameter's squared per-example gradient."""
    params = _named(model, names)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in params.items()}
    rows = _rows(data, examples)
    was_training = model.training
    model.eval()
    try:
        for i in rows:
            batch = data.rows([i])
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=batch.input_ids.to(device), attention_mask=batch.model_mask(device),
                         labels=batch.labels.to(device)).loss
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach().to("cpu", torch.float32).square()
    finally:
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    return {n: f / len(rows) for n, f in fisher.items()}


def linear_layers(model: torch.nn.Module, names: Iterable[str]) -> dict[str, torch.nn.Linear]:
    """The model's `nn.Linear` modules whose weight is one of `names`, by that weight's name."""
    wanted = set(names)
    return {f"{module_name}.weight": module for module_name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and f"{module_name}.weight" in wanted}


@torch.no_grad()
def input_grams(model: torch.nn.Module, data: TokenBatch, names: Iterable[str], examples: int = 64,
                batch_size: int = 8, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Per-token input Gram matrix [in, in] of every linear layer whose weight is named (padding excluded)."""
    layers = linear_layers(model, names)
    grams = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in layers.items()}
    tokens = 0
    keep: list[torch.Tensor] = []  # the current batch's attended positions, [batch, length] bool

    def hook(name):
        def capture(module, inputs, output):
            x = inputs[0].detach().to("cpu", torch.float64)[keep[0]]  # [attended tokens, in]
            grams[name] += x.T @ x
        return capture

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        rows = _rows(data, examples)
        for start in range(0, len(rows), batch_size):
            batch = data.rows(rows[start : start + batch_size])
            keep[:] = [batch.attention_mask.bool()]
            tokens += int(batch.attention_mask.sum())
            model(input_ids=batch.input_ids.to(device), attention_mask=batch.model_mask(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: (g / max(tokens, 1)).to(torch.float32) for n, g in grams.items()}
