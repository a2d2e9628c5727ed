"""Resolving the run's base model on the server: the cached embedded default, or the user's reference (a folder, a
hub name, a GGUF file or a preset; the last two are converted once here, and each site converts its own copy the
same way: `common.model_sources`)."""

import logging

import torch

from feddem.common.base_model import BaseSettings, ensure_embedded_base
from feddem.common.config import RunConfig
from feddem.common.devices import resolve_device

log = logging.getLogger("feddem.server")


def resolve_base_ref(cfg: RunConfig) -> str:
    """The model reference the sites load: `cfg.model`, or the embedded base (pre-trained and cached if needed)."""
    if cfg.model:
        from feddem.common.model_sources import resolve_model_ref

        resolved = resolve_model_ref(cfg.model)  # fetch/convert once, before any site needs it
        if resolved != cfg.model:
            log.info("base model %s: %s", cfg.model, resolved)
        return cfg.model
    settings = BaseSettings(steps=cfg.base_steps, seed=cfg.seed)
    every = max(1, settings.steps // 5)

    def on_step(step: int, loss: float) -> None:
        if step % every == 0:
            log.info("embedded base pre-training: step %d/%d, loss %.4f", step, settings.steps, loss)

    device = resolve_device(cfg.device)
    with torch.random.fork_rng(devices=[]):
        return str(ensure_embedded_base(settings, device, on_step=on_step))
