"""The fine-tuning loop, shared by the sites and by the embedded base model's pre-training.

AdamW (fused on CUDA), linear warm-up then cosine decay, gradient clipping, gradient accumulation (a fixed number
of micro-batches, or as many as a token budget per optimizer step needs), bf16 autocast on CUDA, optional gradient
checkpointing and `torch.compile`. Batches are drawn from packed token blocks (`common.data.pack_blocks`: texts
concatenated and cut into full sequences, no padding) or from padded chat examples (`common.data.TokenBatch`, labels
-100 on the prompt tokens, each batch trimmed to its longest row) in seeded random order (epoch by epoch); the models load with
PyTorch SDPA attention (`common.modeling`). Everything the loop allocates is released before it returns, and
`release_device_memory` empties the CUDA cache, so virtual sites that take turns on one GPU start from free memory.
"""

import gc
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import get_cosine_schedule_with_warmup

from feddem.common.data import TokenBatch
from feddem.common.errors import FeddemError


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
    tokens_per_step: int = 0  # > 0: raise grad_accum until one optimizer step sees at least this many tokens
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory, ~30% slower)
    compile_backend: str = ""  # "" = eager; else torch.compile's backend (e.g. "inductor")

    @classmethod
    def from_run_config(cls, cfg, seed: int) -> "TrainSettings":
        """The site's settings from the run config (`common.config.RunConfig`)."""
        return cls(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, seed=seed,
                   tokens_per_step=cfg.tokens_per_step, gradient_checkpointing=cfg.gradient_checkpointing,
                   compile_backend="inductor" if cfg.compile else "")

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise FeddemError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FeddemError(f"lr must be a positive number, got {self.lr}")
        if self.tokens_per_step < 0:
            raise FeddemError(f"tokens-per-step must be 0 (off) or positive, got {self.tokens_per_step}")

    def accumulation(self, seq_len: int) -> int:
        """Micro-batches per optimizer step: grad_accum, or more when the token budget needs them."""
        if self.tokens_per_step <= 0:
            return self.grad_accum
        return max(self.grad_accum, math.ceil(self.tokens_per_step / (self.batch_size * seq_len)))


def release_device_memory(device: torch.device | str | None = None) -> None:
    """Free what Python no longer references, and hand cached CUDA blocks back (between virtual sites)."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()


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


def _accumulate(forward, data: TokenBatch, batches, accum: int, device: torch.device,
                use_bf16: bool) -> tuple[float, int]:
    """One optimizer step's gradients: `accum` micro-batches, forward and backward; returns the step's loss and the
    tokens it trained on."""
    step_loss = torch.zeros((), device=device)
    tokens = 0
    for _ in range(accum):
        batch = data.rows(next(batches))
        tokens += int(batch.attention_mask.sum())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = forward(input_ids=batch.input_ids.to(device, non_blocking=True),
                           attention_mask=batch.model_mask(device),
                           labels=batch.labels.to(device, non_blocking=True)).loss / accum
        loss.backward()
        step_loss += loss.detach()  # no host sync per micro-batch
    return float(step_loss), tokens


def train_causal_lm(
    model: torch.nn.Module,
    blocks: torch.Tensor | TokenBatch,
    settings: TrainSettings,
    device: torch.device,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Fine-tune `model` in place on [n, seq_len] token blocks or a `TokenBatch`; returns loss and throughput."""
    settings.validate()
    data = blocks if isinstance(blocks, TokenBatch) else TokenBatch.from_blocks(blocks)
    accum = settings.accumulation(data.input_ids.shape[1])
    model.to(device).train()
    if settings.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    forward = torch.compile(model, backend=settings.compile_backend) if settings.compile_backend else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=settings.lr, weight_decay=settings.weight_decay, fused=device.type == "cuda"
    )
    warmup = int(settings.warmup_ratio * settings.steps)
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup, settings.steps)
    batches = _batches(len(data), settings.batch_size, settings.seed)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    try:
        for step in range(1, settings.steps + 1):
            step_loss, step_tokens = _accumulate(forward, data, batches, accum, device, use_bf16)
            tokens += step_tokens
            if not math.isfinite(step_loss):
                raise FeddemError(f"training diverged at step {step} (loss {step_loss}); lower the learning rate")
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            if on_step is not None:
                on_step(step, step_loss)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer, schedule, forward
        if settings.gradient_checkpointing:
            model.activation_checkpointing_disable()
        release_device_memory(device)
    tail = losses[-max(1, len(losses) // 10) :]
    model.eval()
    return {
        "train_loss": sum(tail) / len(tail),
        "train_tokens": tokens,
        "train_seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        "grad_accum": accum,
    }
