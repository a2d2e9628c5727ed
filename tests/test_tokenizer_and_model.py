"""The byte tokenizer and the embedded model: round trips through save_pretrained/from_pretrained."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from feddem.common.errors import FeddemError
from feddem.common.modeling import build_model, count_parameters, load_model, model_checksum, tiny_llama_config
from feddem.common.tokenizer import build_byte_tokenizer

TEXTS = ["12+35=47", "héllo wörld ✓", "{id:1;name:bob}\n\tx = f(y);", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trip_is_byte_exact(text, tmp_path):
    tok = build_byte_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
    assert reloaded.decode(ids) == text


def test_tokenizer_special_tokens_follow_the_bytes():
    tok = build_byte_tokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    assert len(tok) == 259


def test_embedded_model_size_and_determinism():
    a = build_model(tiny_llama_config(), seed=3)
    b = build_model(tiny_llama_config(), seed=3)
    c = build_model(tiny_llama_config(), seed=4)
    assert 1_000_000 <= count_parameters(a) <= 5_000_000
    assert model_checksum(a) == model_checksum(b) != model_checksum(c)


def test_base_model_is_cached_and_reused(tiny_base):
    from feddem.common.base_model import BaseSettings, ensure_embedded_base
    from tests.conftest import TINY_BASE_STEPS

    stamp = (tiny_base / "model.safetensors").stat().st_mtime_ns
    again = ensure_embedded_base(BaseSettings(steps=TINY_BASE_STEPS), torch.device("cpu"), home=tiny_base.parent.parent)
    assert again == tiny_base and (tiny_base / "model.safetensors").stat().st_mtime_ns == stamp
    info = json.loads((tiny_base / "feddem_base.json").read_text())
    assert info["steps"] == TINY_BASE_STEPS and info["pretrain"]["train_loss"] < 5.0
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert model_checksum(model) == model_checksum(load_model(str(tiny_base)))


def test_unknown_model_folder_and_name_are_clear_errors(tmp_path):
    with pytest.raises(FeddemError, match="does not exist or has no config.json"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(FeddemError, match="could not load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")
