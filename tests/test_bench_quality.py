"""bench/quality.py's own arithmetic: the union of the sites' training batches (data mixing), the kept share per
model and domain, the markdown tables (worst-domain kept share, ratios to data mixing and to FedAvg at the same
rounds; the merge rules' costs), the targets with the merge rules' rows, and the merge rules' rows themselves on a
tiny two-site setup (each site's statistics, the shared merge evaluation)."""

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


def _rule_results():
    """_results() with the merge rules' rows: fisher's search the best one-round merge, regmean's R = 2 run the best
    feddem row."""
    results = _results()
    loss = results["loss"] | {"merge/uniform+fisher": {"a": 2.4, "b": 1.7}, "merge/search+fisher": {"a": 2.3, "b": 1.4},
                              "feddem/2+regmean": {"a": 2.0, "b": 1.0}, "data_mixing": {"a": 2.1, "b": 1.2}}
    mean = {k: sum(v.values()) / len(v) for k, v in loss.items() if not k.startswith("local/")}
    return results | {"loss": loss, "mean_loss": mean, "kept_share": quality.kept_shares(loss, results["local"]),
                      "merge_rules": {"fisher": {"upload_x": 2.0, "stats_seconds_per_site": 1.3,
                                                 "combine_seconds": 0.031, "weights": {}}}}


def test_rule_rows_count_in_the_rounds_and_the_targets():
    results = _rule_results()
    mean = results["mean_loss"]
    assert [quality.rounds_of(k) for k in ("merge/search+fisher", "feddem/2+regmean", "feddem/1+fisher", "base")] \
        == [1, 2, 1, None]
    assert quality.best_one_round_merge(mean) == "merge/search+fisher"
    assert quality.best_one_round_merge(mean | {"feddem/1+regmean": 1.0}) == "feddem/1+regmean"
    targets = quality.targets(results["loss"], mean, [1, 2])
    assert targets["best_one_round_merge"] == "merge/search+fisher" and targets["best_feddem"] == "feddem/2+regmean"
    assert targets["best_one_round_merge_at_or_below_fedavg_2"]  # 1.85 <= 1.95; merge/uniform alone (2.15) is not
    assert targets["feddem_R_at_or_below_fedavg_R"] == {1: True, 2: True}  # R = 2: feddem/2+regmean's 1.5
    assert targets["best_feddem_at_or_below_data_mixing"] and targets["best_feddem_over_data_mixing"] == \
        pytest.approx(1.5 / 1.65)
    without = {k: v for k, v in mean.items() if "+" not in k}  # the weighted sum alone misses both
    targets = quality.targets(results["loss"], without, [1, 2])
    assert not targets["best_one_round_merge_at_or_below_fedavg_2"] and not targets["best_feddem_at_or_below_data_mixing"]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in quality.table(results).splitlines()[2:]}
    assert rows["feddem/2+regmean"][6].strip(" |") == f"{1.5 / 1.95:.3f}"  # against fedavg/2


def test_the_merge_rules_table():
    lines = quality.rules_table(_rule_results()).splitlines()
    assert lines[0] == "| rule | weights | mean | kept worst | upload x | stats s/site | combine s |"
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    # the weighted sum's rows as they exist (merge/search is not in these results), then each rule's
    assert cells == [["weighted-sum", "uniform", "2.1500", "20%", "1.00", "", ""],
                     ["fisher", "uniform", "2.0500", "30%", "2.00", "1.3", "0.031"],
                     ["fisher", "search", "1.8500", "60%", "2.00", "1.3", "0.031"]]


@pytest.fixture(scope="module")
def two_sites(tiny_base):
    """The tiny base, two site vectors on the last layer's down projection only (so the inputs of that layer, hence
    the Gram matrices, depend on a site's data alone), and per site a few random blocks for every split."""
    from feddem.common.modeling import load_model

    base = load_model(str(tiny_base))
    name = [n for n, _ in base.named_parameters() if n.endswith("mlp.down_proj.weight")][-1]
    shape = dict(base.named_parameters())[name].shape
    torch.manual_seed(5)
    vectors = [{name: torch.randn(shape) * 0.05} for _ in range(2)]

    def blocks(seed):
        torch.manual_seed(seed)
        return TokenBatch.from_blocks(torch.randint(3, 250, (2, 16)))
    data = [{"domain": f"d{i}", "train": blocks(10 + i), "validation": blocks(20 + i), "test": blocks(30 + i)}
            for i in range(2)]
    return base, vectors, data


def test_rule_merges_on_two_sites(two_sites):
    from feddem.common.config import RunConfig
    from feddem.common.merging.rules import rule
    from feddem.common.vectors import weighted_sum

    base, vectors, data = two_sites
    cfg = RunConfig(sites=2, search_budget=1)
    cpu = torch.device("cpu")
    weighted = quality.MergeScores(base, data, cpu, lambda w: weighted_sum(vectors, w))
    uniform = [0.5, 0.5]
    # the same train data at both sites: equal Gram matrices, so RegMean is the weighted sum
    same = [d | {"train": data[0]["train"]} for d in data]
    losses, weights, costs = quality.rule_merges(cfg, base, same, vectors, "regmean", cpu)
    assert weights["uniform"] == uniform and len(weights["search"]) == 2
    assert losses["uniform"] == pytest.approx(weighted.losses(uniform), rel=1e-5)
    assert losses["search"] == pytest.approx(quality.MergeScores(base, data, cpu, lambda w: weighted_sum(
        vectors, w)).losses(weights["search"]), rel=1e-5)
    assert costs["upload_x"] == pytest.approx(1 + 384 / 128)  # per site: [in, in] Gram + [out, in] product
    assert costs["examples"] == cfg.merge_examples
    assert costs["stats_seconds_per_site"] > 0 and costs["combine_seconds"] > 0
    # each site's own data: the Gram matrices differ, and so does the merge
    losses, _, _ = quality.rule_merges(cfg, base, data, vectors, "regmean", cpu)
    assert losses["uniform"] != pytest.approx(weighted.losses(uniform), rel=1e-4)
    losses, _, costs = quality.rule_merges(cfg, base, data, vectors, "fisher", cpu)
    assert costs["upload_x"] == 2.0 and losses["uniform"] != pytest.approx(weighted.losses(uniform), rel=1e-4)


def test_merge_scores_evaluate_each_merge_once(two_sites):
    from feddem.common.vectors import weighted_sum

    base, vectors, data = two_sites
    calls = []
    scores = quality.MergeScores(base, data, torch.device("cpu"), lambda w: calls.append(w) or weighted_sum(vectors, w))
    first = scores.losses([0.5, 0.5])
    assert scores.losses([0.5, 0.5 + 1e-12]) is first and len(calls) == 1  # the same merge
    assert scores.validation_score([0.5, 0.5]) == pytest.approx(sum(scores.losses([0.5, 0.5], "validation").values()) / 2)
    assert len(calls) == 2  # the validation split is its own evaluation
    assert quality._losses(quality._merged(base, vectors, [0.5, 0.5]), data, torch.device("cpu")) == first


def test_rule_rounds_need_a_merge_rule(capsys):
    with pytest.raises(SystemExit):
        quality.main(["--out", "/tmp/unused", "--merge-rules", "--rule-rounds", "2"])
    assert "--rule-rounds" in capsys.readouterr().err
