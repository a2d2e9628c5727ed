"""The fine-tuning loop's options (the same code runs on CUDA, where bf16 autocast and fused AdamW switch on)."""

import copy

import pytest
import torch

from feddem.common.config import RunConfig
from feddem.common.errors import FeddemError
from feddem.common.modeling import build_model, tiny_llama_config
from feddem.common.training import TrainSettings, train_causal_lm

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
CPU = torch.device("cpu")


@pytest.fixture
def model_and_blocks():
    model = build_model(tiny_llama_config(**SMALL), seed=0)
    blocks = torch.randint(3, 259, (12, 16), generator=torch.Generator().manual_seed(0))
    return model, blocks


def _trained(model, blocks, **settings):
    model = copy.deepcopy(model)
    stats = train_causal_lm(model, blocks, TrainSettings(steps=2, lr=1e-3, batch_size=2, **settings), CPU)
    return model, stats


def test_token_budget_sets_the_accumulation(model_and_blocks):
    model, blocks = model_and_blocks
    assert TrainSettings(batch_size=2, tokens_per_step=100).accumulation(16) == 4  # ceil(100 / 32)
    assert TrainSettings(batch_size=2, grad_accum=5, tokens_per_step=100).accumulation(16) == 5  # never fewer
    assert TrainSettings(batch_size=2, grad_accum=3).accumulation(16) == 3
    budget, stats = _trained(model, blocks, tokens_per_step=100)
    assert stats["grad_accum"] == 4 and stats["train_tokens"] == 2 * 4 * 2 * 16
    same, _ = _trained(model, blocks, grad_accum=4)  # the same thing spelled out
    assert all(torch.equal(p, q) for p, q in zip(budget.parameters(), same.parameters()))
    with pytest.raises(FeddemError, match="tokens-per-step"):
        TrainSettings(tokens_per_step=-1).validate()


def test_gradient_checkpointing_gives_the_same_update_and_is_switched_off_after(model_and_blocks):
    model, blocks = model_and_blocks
    plain, plain_stats = _trained(model, blocks)
    checkpointed, stats = _trained(model, blocks, gradient_checkpointing=True)
    assert not checkpointed.is_activation_checkpointing and not checkpointed.training
    assert stats["train_loss"] == pytest.approx(plain_stats["train_loss"], rel=1e-5)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))  # it did train


def test_compiled_forward_trains_like_eager(model_and_blocks):
    model, blocks = model_and_blocks
    plain, _ = _trained(model, blocks)
    compiled, _ = _trained(model, blocks, compile_backend="eager")  # the torch.compile path, without a C compiler
    for (name, p), q in zip(plain.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_lora_with_gradient_checkpointing_trains_only_the_adapters(model_and_blocks):
    from peft import LoraConfig, get_peft_model

    model, blocks = model_and_blocks
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    train_causal_lm(peft_model, blocks, TrainSettings(steps=2, lr=1e-2, batch_size=2, gradient_checkpointing=True),
                    CPU)
    params = dict(peft_model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    assert any(not torch.equal(params[n], p) for n, p in adapters.items())


def test_run_config_options_reach_the_loop():
    cfg = RunConfig.from_record({"tokens-per-step": 4096, "gradient-checkpointing": "true", "compile": True,
                                 "grad-accum": 2, "batch-size": 4, "steps": 7, "lr": 0.01})
    settings = TrainSettings.from_run_config(cfg, seed=3)
    assert (settings.tokens_per_step, settings.gradient_checkpointing, settings.compile_backend) == (4096, True,
                                                                                                     "inductor")
    assert (settings.grad_accum, settings.batch_size, settings.steps, settings.lr, settings.seed) == (2, 4, 7, 0.01, 3)
    assert TrainSettings.from_run_config(RunConfig(), seed=0).compile_backend == ""
    with pytest.raises(FeddemError, match="tokens-per-step"):
        RunConfig.from_record({"tokens-per-step": -5})
