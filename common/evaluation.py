"""Held-out evaluation: mean next-token loss in nats per token, and perplexity."""

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, blocks: torch.Tensor, pad_id: int, device: torch.device,
                  batch_size: int = 32) -> dict:
    """Mean loss over every predicted token of [n, seq_len] blocks (pad positions are not scored)."""
    model.to(device).eval()
    total, count = 0.0, 0
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=batch).logits
        targets = batch[:, 1:].clone()
        targets[targets == pad_id] = -100
        losses = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
            ignore_index=-100, reduction="sum",
        )
        total += losses.item()
        count += int((targets != -100).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
