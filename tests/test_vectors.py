"""Distribution vectors: extract/apply round trips, the merge formula, LoRA vectors, storage, bad input."""

import copy

import pytest
import torch

from feddem.common.digests import header_digest, stored_digest, vector_digest
from feddem.common.errors import FeddemError
from feddem.common.modeling import build_model, tiny_llama_config
from feddem.common.vector_io import load_vector, save_vector, write_safetensors
from feddem.common.vector_records import vector_from_record, vector_to_record
from feddem.common.vectors import (
    apply_vector, check_vector, extract_lora_vector, extract_vector, parameters_of, specs_of, weighted_sum,
)

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


def _perturbed(model, seed, scale=1e-2):
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return other


@pytest.fixture
def base():
    return build_model(tiny_llama_config(**SMALL), seed=0)


def test_extract_then_apply_round_trips_exactly(base):
    tuned = _perturbed(base, 1)
    vector = extract_vector(tuned, parameters_of(base))
    rebuilt = copy.deepcopy(base)
    apply_vector(rebuilt, vector)
    for (name, p), q in zip(rebuilt.named_parameters(), tuned.parameters()):
        assert torch.equal(p, q) or torch.allclose(p, q, atol=0, rtol=1e-6), name
    assert any(v.abs().max() > 0 for v in vector.values())


def test_merge_equals_the_formula(base):
    base_params = parameters_of(base)
    tuned = [_perturbed(base, s) for s in (1, 2, 3)]
    vectors = [extract_vector(m, base_params) for m in tuned]
    weights = [0.5, 0.3, -0.2]
    merged = copy.deepcopy(base)
    apply_vector(merged, weighted_sum(vectors, weights))
    for name, p in merged.named_parameters():
        expected = base_params[name] + sum(w * (dict(m.named_parameters())[name].detach() - base_params[name])
                                           for w, m in zip(weights, tuned))
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-6)


def test_lora_vector_is_the_dense_update_peft_merges(base):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # B starts at zero: give the adapters a non-trivial value
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    vector = extract_lora_vector(peft_model)
    assert vector and all(name.endswith("proj.weight") for name in vector)
    assert all(torch.linalg.matrix_rank(t) <= 4 for t in vector.values())
    merged_by_peft = copy.deepcopy(peft_model).merge_and_unload()
    rebuilt = copy.deepcopy(base)
    apply_vector(rebuilt, vector)
    for (name, p), q in zip(rebuilt.named_parameters(), merged_by_peft.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_save_load_and_record_round_trip(base, tmp_path):
    vector = extract_vector(_perturbed(base, 5), parameters_of(base))
    save_vector(vector, tmp_path / "v.safetensors", metadata={"site": "a"})
    loaded = load_vector(tmp_path / "v.safetensors")
    assert loaded.keys() == vector.keys() and all(torch.equal(loaded[k], vector[k]) for k in vector)
    via_record = vector_from_record(vector_to_record(vector))
    assert all(torch.equal(via_record[k], vector[k]) for k in vector)
    assert not list(tmp_path.glob("*.tmp"))


def test_stored_digest_is_in_the_header_and_catches_corruption(base, tmp_path):
    vector = extract_vector(_perturbed(base, 6), parameters_of(base))
    path = tmp_path / "v.safetensors"
    save_vector(vector, path)
    assert stored_digest(path) == vector_digest(vector)
    other = {k: v.clone() for k, v in vector.items()}
    next(iter(other.values())).view(-1)[0] += 1e-3
    assert vector_digest(other) != vector_digest(vector)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # flip bits in the last tensor's data
    path.write_bytes(bytes(raw))
    assert stored_digest(path) == vector_digest(vector)  # the header still says what was written...
    with pytest.raises(FeddemError, match="is corrupt"):
        load_vector(path, verify=True)  # ...and a verified read notices the data no longer matches



def test_stored_digest_without_header_is_computed_from_the_file(tmp_path):
    """A file written without a digest (an HF weights file, say) is hashed from its bytes, without torch, to the
    digest of the loaded vector; every dtype feddem reads, scalars and empty tensors too."""
    vector = {"b.bf16": torch.randn(3, 5).to(torch.bfloat16), "a.f32": torch.randn(7), "c.f16": torch.randn(2, 2).half(),
              "d.i64": torch.arange(4), "e.bool": torch.tensor([True, False]), "f.scalar": torch.tensor(2.5),
              "g.empty": torch.zeros(0, 3)}
    path = tmp_path / "plain.safetensors"
    write_safetensors(path, specs_of(vector), vector.items())  # no digest in the header
    assert header_digest(path) is None
    assert stored_digest(path) == vector_digest(load_vector(path)) == vector_digest(vector)
    vector["a.f32"][0] += 1
    write_safetensors(path, specs_of(vector), vector.items())
    assert stored_digest(path) == vector_digest(vector)

def test_bad_vectors_are_named(base):
    ref = parameters_of(base)
    name = next(iter(ref))
    good = {name: torch.zeros_like(ref[name])}
    check_vector(good, ref, "site-x")
    with pytest.raises(FeddemError, match="site-x: unknown parameter 'bogus'"):
        check_vector({"bogus": torch.zeros(2)}, ref, "site-x")
    with pytest.raises(FeddemError, match="has shape"):
        check_vector({name: torch.zeros(3)}, ref, "site-x")
    with pytest.raises(FeddemError, match="dtype torch.float64"):
        check_vector({name: torch.zeros_like(ref[name], dtype=torch.float64)}, ref, "site-x")
    bad = torch.zeros_like(ref[name])
    bad.view(-1)[0] = float("nan")
    with pytest.raises(FeddemError, match="NaN"):
        check_vector({name: bad}, ref, "site-x")
    with pytest.raises(FeddemError, match="does not exist"):
        load_vector("/nonexistent/v.safetensors")
