"""The fine-tuning loop, shared by the sites and by the embedded base model's pre-training.

AdamW (fused on CUDA), linear warm-up then cosine decay, gradient clipping, gradient accumulation, and bf16
autocast on CUDA. Batches are drawn from packed token blocks in seeded random order (epoch by epoch).
"""

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import get_cosine_schedule_with_warmup

from common.errors import FeddemError


@dataclass
class TrainSettings:
    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 16  # sequences per micro-batch; one optimizer step sees batch_size * grad_accum
    grad_accum: int = 1
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise FeddemError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FeddemError(f"lr must be a positive number, got {self.lr}")


def _batches(num_blocks: int, batch_size: int, seed: int):
    """Endless seeded stream of block-index batches, each epoch a fresh permutation."""
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(num_blocks, generator=gen), 0
    while True:
        if pos + batch_size > num_blocks:
            if batch_size > num_blocks:
                yield torch.randint(num_blocks, (batch_size,), generator=gen)
                continue
            order, pos = torch.randperm(num_blocks, generator=gen), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def train_causal_lm(
    model: torch.nn.Module,
    blocks: torch.Tensor,
    settings: TrainSettings,
    device: torch.device,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Fine-tune `model` in place on [n, seq_len] token blocks; returns loss and throughput figures."""
    settings.validate()
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=settings.lr, weight_decay=settings.weight_decay, fused=device.type == "cuda"
    )
    warmup = int(settings.warmup_ratio * settings.steps)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, settings.steps)
    batches = _batches(len(blocks), settings.batch_size, settings.seed)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, settings.steps + 1):
        step_loss = 0.0
        for _ in range(settings.grad_accum):
            batch = blocks[next(batches)].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = model(input_ids=batch, labels=batch).loss / settings.grad_accum
            loss.backward()
            step_loss += loss.item()
        if not math.isfinite(step_loss):
            raise FeddemError(f"training diverged at step {step} (loss {step_loss}); lower the learning rate")
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        if on_step is not None:
            on_step(step, step_loss)
    seconds = time.perf_counter() - start
    tokens = settings.steps * settings.grad_accum * settings.batch_size * blocks.shape[1]
    tail = losses[-max(1, len(losses) // 10) :]
    model.eval()
    return {
        "train_loss": sum(tail) / len(tail),
        "train_tokens": tokens,
        "train_seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
    }
