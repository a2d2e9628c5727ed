"""bench/quality.py's own arithmetic: the union of the sites' training batches (data mixing), the kept share per
model and domain, and the markdown table (worst-domain kept share, ratios to data mixing and to FedAvg at the same
rounds)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import quality  # noqa: E402

from feddem.common.data import TokenBatch  # noqa: E402


def test_concat_pads_to_the_longest_without_scoring_or_attending_the_padding():
    text = TokenBatch.from_blocks(torch.arange(8).view(2, 4))
    chat = TokenBatch(torch.tensor([[7, 8]]), torch.tensor([[-100, 8]]), torch.tensor([[1, 1]]))
    union = quality.concat([text, chat], pad_id=0)
    assert union.input_ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [7, 8, 0, 0]]
    assert union.labels.tolist()[2] == [-100, 8, -100, -100] and union.attention_mask.tolist()[2] == [1, 1, 0, 0]
    assert union.scored_tokens == text.scored_tokens + chat.scored_tokens


def _results():
    loss = {"base": {"a": 3.0, "b": 2.0}, "local/a": {"a": 2.0}, "local/b": {"b": 1.0},
            "merge/uniform": {"a": 2.5, "b": 1.8}, "fedavg/1": {"a": 2.8, "b": 1.9}, "fedavg/2": {"a": 2.4, "b": 1.5},
            "feddem/2": {"a": 2.2, "b": 1.4}, "data_mixing": {"a": 2.0, "b": 1.2}}
    local = {"a": 2.0, "b": 1.0}
    mean = {k: sum(v.values()) / len(v) for k, v in loss.items() if not k.startswith("local/")}
    return {"loss": loss, "local": local, "mean_loss": mean, "kept_share": quality.kept_shares(loss, local)}


def test_kept_shares_and_the_table():
    results = _results()
    kept = results["kept_share"]
    assert kept["merge/uniform"] == pytest.approx({"a": 0.5, "b": 0.2})  # (base - merge) / (base - local)
    assert kept["base"] == {"a": 0.0, "b": 0.0} and "local/a" not in kept
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in quality.table(results).splitlines()[2:]}
    uniform = rows["merge/uniform"]  # model, mean, a, b, kept worst, / mixing, / FedAvg same R
    assert uniform[1] == "2.1500" and uniform[4] == "20%"
    assert uniform[5] == f"{2.15 / 1.6:.3f}" and uniform[6].strip(" |") == f"{2.15 / 2.35:.3f}"  # R = 1: fedavg/1
    assert rows["feddem/2"][6].strip(" |") == f"{1.8 / 1.95:.3f}"  # against fedavg/2
    assert rows["data_mixing"][5] == "1.000" and rows["data_mixing"][6].strip(" |") == ""
    assert rows["local (own domain)"][1] == "1.5000"
