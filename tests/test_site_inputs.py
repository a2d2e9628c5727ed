"""What a site derives from its data besides training: the data digest (streamed over every train row) and the
Chameleon domain embedding (its real tokens are those the attention mask marks, an EOS included where the tokenizer
pads with EOS)."""

import datasets
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from feddem.client.guard import data_digest
from feddem.client.signals import domain_embedding
from feddem.common.data import TokenBatch, column_rows

EOS = 2  # the tiny model's EOS, which is also its pad id here (as in SmolLM2)


@pytest.mark.parametrize("column, values", [
    ("text", [f"example number {i}" for i in range(11)]),
    ("messages", [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
                  for i in range(11)]),
])
def test_data_digest_streams_every_row_and_equals_the_digest_of_the_whole_column(column, values):
    dataset = datasets.Dataset.from_dict({column: values})
    rows = column_rows(dataset, column, batch_size=4)
    assert not isinstance(rows, list)  # a generator: the column is read 4 rows at a time
    assert list(column_rows(dataset, column, batch_size=4)) == list(dataset[column])
    assert data_digest(column_rows(dataset, column, batch_size=4)) == data_digest(dataset[column])
    changed = datasets.Dataset.from_dict({column: values[:-1] + [values[0]]})  # the last row differs
    assert data_digest(column_rows(changed, column, batch_size=4)) != data_digest(dataset[column])


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, eos_token_id=EOS, pad_token_id=EOS)
    return LlamaForCausalLM(config).eval()


def test_domain_embedding_counts_a_real_eos_when_the_pad_id_is_eos():
    model = _model()
    ids = torch.tensor([[5, 6, 7, EOS, EOS, EOS], [8, 9, EOS, 10, 11, EOS]])  # row 0: 3 tokens, EOS, 2 pads
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    batch = TokenBatch(ids, ids.masked_fill(mask == 0, -100), mask)
    got = domain_embedding(model, batch, EOS, torch.device("cpu"))
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    middle = hidden[len(hidden) // 2]
    expected = (middle * mask.unsqueeze(-1)).sum(dim=(0, 1)) / mask.sum()  # 10 real tokens, three of them EOS
    assert torch.allclose(torch.from_numpy(got), expected, atol=1e-5)
    by_pad_id = domain_embedding(model, ids, EOS, torch.device("cpu"))  # plain blocks: pad id masks every EOS
    assert not torch.allclose(torch.from_numpy(by_pad_id), expected, atol=1e-4)
    with torch.no_grad():
        unmasked = model(input_ids=ids, output_hidden_states=True).hidden_states
    without_eos = ids != EOS
    assert torch.allclose(torch.from_numpy(by_pad_id), (unmasked[len(unmasked) // 2] * without_eos.unsqueeze(-1)
                                                        ).sum(dim=(0, 1)) / without_eos.sum(), atol=1e-5)


def test_a_sites_phase_timings_count_both_evaluations_and_add_up(tmp_path, tiny_base, monkeypatch):
    import time

    from feddem.client import site as site_module
    from feddem.common.site_context import SiteContext
    from feddem.common.config import RunConfig

    evaluate = site_module.evaluate_loss

    def slow_evaluate(*args, **kwargs):  # each held-out evaluation takes at least 0.3 s
        time.sleep(0.3)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(site_module, "evaluate_loss", slow_evaluate)
    cfg = RunConfig(data="synthetic:arithmetic", steps=1, batch_size=2, seq_len=32, train_examples=20,
                    eval_examples=4)
    site = SiteContext.from_node_config({"partition-id": 0, "work-dir": str(tmp_path / "site")})
    result = site_module.fine_tune(cfg, site, str(tiny_base), "", run_id=1)
    assert result["eval_seconds"] >= 0.6  # the base's evaluation before training and the local model's after
    phases = result["setup_seconds"] + result["train_seconds"] + result["eval_seconds"]
    assert phases <= result["seconds"] + 1e-6
