"""Merge rules from sums alone (`common.merging`): known answers on hand-made inputs, and the site statistics."""

import pytest
import torch

from feddem.common.errors import FeddemError
from feddem.common.merging.rules import (
    DENOMINATOR, GRAM, FisherMerge, RegMeanMerge, WeightedSum, merge_plain, rule,
)
from feddem.common.merging.statistics import diagonal_fisher, input_grams, linear_layers


def _close(a: dict, b: dict, atol=1e-5) -> None:
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


def test_fisher_on_disjoint_halves_gives_each_half_its_own_site():
    d0, d1 = {"w": torch.randn(10)}, {"w": torch.randn(10)}
    first = torch.arange(10) < 5
    f0 = {"w": first.float() * torch.rand(10).add(0.5)}  # site 0 learned the first half only
    f1 = {"w": (~first).float() * torch.rand(10).add(0.5)}
    merged = merge_plain(FisherMerge(floor=1e-9), [d0, d1], [f0, f1], [0.5, 0.5])["w"]
    torch.testing.assert_close(merged[first], d0["w"][first], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(merged[~first], d1["w"][~first], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.2, 0.7], [1.0, 1.0]])
def test_fisher_with_equal_fisher_is_the_weighted_sum(weights):
    torch.manual_seed(0)
    vectors = [{"a": torch.randn(3, 4), "b": torch.randn(5)} for _ in range(2)]
    fisher = {"a": torch.rand(3, 4), "b": torch.rand(5)}
    merged = merge_plain(FisherMerge(), vectors, [fisher, fisher], weights)
    expected = merge_plain(WeightedSum(), vectors, [None, None], weights)
    _close(merged, expected)


def test_fisher_floor_decides_where_no_site_learned_anything():
    d0, d1 = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])}
    zero = {"w": torch.zeros(2)}
    merged = merge_plain(FisherMerge(), [d0, d1], [zero, zero], [0.5, 0.5])["w"]
    torch.testing.assert_close(merged, torch.tensor([2.0, 3.0]))  # the floor alone: the weighted average


def test_fisher_scale_of_a_site_does_not_matter():
    """Each site's Fisher is scaled to mean 1: a site whose losses are 1000x larger does not take over."""
    torch.manual_seed(1)
    vectors = [{"w": torch.randn(8)} for _ in range(2)]
    f = [{"w": torch.rand(8)}, {"w": torch.rand(8)}]
    loud = [f[0], {"w": f[1]["w"] * 1000}]
    _close(merge_plain(FisherMerge(), vectors, f, [0.5, 0.5]), merge_plain(FisherMerge(), vectors, loud, [0.5, 0.5]))


def test_fisher_parts_reveal_only_weighted_fisher_and_product():
    parts = FisherMerge().site_parts({"w": torch.ones(4)}, {"w": torch.ones(4)}, 0.25)
    torch.testing.assert_close(parts[DENOMINATOR]["w"], torch.full((4,), 0.25 * (1 + 0.01)))


def test_fisher_refuses_a_vector_without_statistics():
    with pytest.raises(FeddemError, match="no statistics"):
        FisherMerge().site_parts({"w": torch.ones(2), "v": torch.ones(2)}, {"w": torch.ones(2)}, 1.0)


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.3, 0.9]])
def test_regmean_with_identical_grams_is_the_weighted_sum(weights):
    torch.manual_seed(2)
    x = torch.randn(50, 6)
    gram = {"layer.weight": x.T @ x / 50}
    vectors = [{"layer.weight": torch.randn(4, 6), "norm.weight": torch.randn(6)} for _ in range(2)]
    merged = merge_plain(RegMeanMerge(), vectors, [gram, gram], weights)
    _close(merged, merge_plain(WeightedSum(), vectors, [None, None], weights), atol=1e-4)


def test_regmean_reproduces_each_site_on_its_own_inputs():
    """Sites whose inputs live in disjoint subspaces: the merged layer gives each site's outputs on its inputs."""
    torch.manual_seed(3)
    x0 = torch.cat([torch.randn(40, 3), torch.zeros(40, 3)], dim=1)
    x1 = torch.cat([torch.zeros(40, 3), torch.randn(40, 3)], dim=1)
    deltas = [torch.randn(5, 6), torch.randn(5, 6)]
    grams = [{"l.weight": x.T @ x / 40} for x in (x0, x1)]
    merged = merge_plain(RegMeanMerge(alpha=1.0), [{"l.weight": d} for d in deltas], grams, [0.5, 0.5])["l.weight"]
    for x, d in zip((x0, x1), deltas):
        torch.testing.assert_close(x @ merged.T, x @ d.T, atol=1e-3, rtol=1e-3)
    plain = 0.5 * (deltas[0] + deltas[1])
    assert (x0 @ plain.T - x0 @ deltas[0].T).abs().max() > 0.1  # the plain average does not


def test_regmean_alpha_scales_off_diagonal_only():
    gram = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    torch.testing.assert_close(RegMeanMerge(alpha=0.5).regularised(gram), torch.tensor([[2.0, 0.5], [0.5, 3.0]]))
    parts = RegMeanMerge().site_parts({"l.weight": torch.ones(3, 2), "b": torch.ones(3)}, {"l.weight": gram}, 1.0)
    assert set(parts[GRAM]) == {"l.weight"} and set(parts["weighted"]) == {"b"}


def test_rule_names_and_parameters_are_checked():
    assert isinstance(rule("fisher", floor=0.1), FisherMerge)
    with pytest.raises(FeddemError, match="weighted-sum, fisher, regmean"):
        rule("ties")
    with pytest.raises(FeddemError, match="floor"):
        FisherMerge(floor=0)
    with pytest.raises(FeddemError, match="alpha"):
        RegMeanMerge(alpha=1.5)


@pytest.fixture(scope="module")
def tiny_model_and_data(tiny_base):
    from feddem.common.data import TokenBatch
    from feddem.common.modeling import load_model

    model = load_model(str(tiny_base))
    torch.manual_seed(4)
    ids = torch.randint(3, 200, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # a padded row
    labels = ids.masked_fill(mask == 0, -100)
    return model, TokenBatch(ids, labels, mask)


def test_diagonal_fisher_is_the_mean_squared_per_example_gradient(tiny_model_and_data):
    model, data = tiny_model_and_data
    name = next(n for n, p in model.named_parameters() if p.dim() == 2 and "layers.0" in n)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fisher = diagonal_fisher(model, data, [name], examples=2)
    expected = torch.zeros_like(fisher[name])
    param = dict(model.named_parameters())[name]
    for i in range(2):
        batch = data.rows([i])
        model.zero_grad()
        model(input_ids=batch.input_ids, attention_mask=batch.model_mask("cpu"), labels=batch.labels).loss.backward()
        expected += param.grad.square()
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(fisher[name], expected / 2)
    assert fisher[name].abs().sum() > 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_input_grams_skip_padding_and_are_per_token(tiny_model_and_data):
    from feddem.common.data import TokenBatch

    model, data = tiny_model_and_data
    names = [n for n, _ in model.named_parameters()]
    layers = linear_layers(model, names)
    assert layers and all(tuple(m.weight.shape)[1] == m.in_features for m in layers.values())
    grams = input_grams(model, data, names, batch_size=3)
    # the same rows one at a time, the padded one cut to its real length: the same per-token Gram
    rows = [TokenBatch(data.input_ids[i : i + 1, :n], data.labels[i : i + 1, :n], data.attention_mask[i : i + 1, :n])
            for i, n in ((0, 12), (1, 8), (2, 12))]
    sums = {n: torch.zeros_like(g, dtype=torch.float64) for n, g in grams.items()}
    for r in rows:
        part = input_grams(model, r, names, batch_size=1)
        for n in sums:
            sums[n] += part[n].double() * int(r.attention_mask.sum())
    for n, g in grams.items():
        torch.testing.assert_close(g, (sums[n] / 32).float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(g, g.T)


def test_regmean_merges_the_other_tensors_by_their_fisher():
    """Under regmean the tensors that are not linear weights take the Fisher rule over them alone (rest="fisher"),
    or the weighted sum (rest="weighted", or no Fisher for them); the linear weights are RegMean's either way."""
    from feddem.common.merging.rules import FISHER_KEY

    torch.manual_seed(5)
    x = [torch.randn(30, 4) for _ in range(2)]
    vectors = [{"l.weight": torch.randn(3, 4), "norm.weight": torch.randn(4)} for _ in range(2)]
    first = torch.arange(4) < 2
    fishers = [first.float() + 1e-9, (~first).float() + 1e-9]  # site 0 learned the norm's first half only
    stats = [{"l.weight": xi.T @ xi / 30, FISHER_KEY + "norm.weight": f} for xi, f in zip(x, fishers)]
    merged = merge_plain(RegMeanMerge(), vectors, stats, [0.5, 0.5])
    norm = merged["norm.weight"]
    torch.testing.assert_close(norm[first], vectors[0]["norm.weight"][first], atol=2e-2, rtol=0)  # floor 0.01
    torch.testing.assert_close(norm[~first], vectors[1]["norm.weight"][~first], atol=2e-2, rtol=0)
    only_linear = [{"l.weight": s["l.weight"]} for s in stats]
    torch.testing.assert_close(merged["l.weight"], merge_plain(RegMeanMerge(), vectors, only_linear,
                                                               [0.5, 0.5])["l.weight"])
    weighted = merge_plain(RegMeanMerge(rest="weighted"), vectors, stats, [0.5, 0.5])["norm.weight"]
    torch.testing.assert_close(weighted, 0.5 * (vectors[0]["norm.weight"] + vectors[1]["norm.weight"]))
    with pytest.raises(FeddemError, match="rest"):
        RegMeanMerge(rest="ties")


@pytest.mark.parametrize("name", ["weighted-sum", "fisher", "regmean"])
def test_layout_from_shapes_is_the_uploads_names(name, tiny_model_and_data):
    """The upload's layout, worked out from the files' shapes alone, names exactly the tensors `site_upload` forms;
    for regmean: Grams for the linear weights, Fisher parts for the embedding and the norms."""
    from feddem.common.merging.parts import layout, site_upload

    model, data = tiny_model_and_data
    names = [n for n, _ in model.named_parameters()][:8]
    merge_rule = rule(name)
    stats = merge_rule.compute_statistics(model, data, names, 2, "cpu")
    vector = {n: torch.randn(p.shape) * 1e-3 for n, p in model.named_parameters() if n in names}
    keys = layout(merge_rule, {n: tuple(t.shape) for n, t in vector.items()},
                  {k: tuple(t.shape) for k, t in stats.items()})
    assert keys == sorted(site_upload(merge_rule, vector, stats))
    if name == "regmean":
        parts = {key.split("/", 1)[0] for key in keys}
        assert parts == {"gram", "gram-delta", "fisher-num", "fisher-den"}
        assert f"fisher-num/{names[0]}" in keys  # the embedding: not a linear layer's weight
