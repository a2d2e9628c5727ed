"""The cross-domain matrix: the simulation driver's recovery of a multi-round run's last-round start with the run's
own merge rule (fisher, regmean: not the weighted sum), checked on run folders built by hand with a known start,
vectors, statistics and aggregate; and its diagonal taken from the sites' own evaluations (eval.local) where they
are the same quantity, not evaluated again."""

import pytest
import torch

from feddem.common.config import RunConfig
from feddem.common.data import list_shards
from feddem.common.merging.rules import GRAM, merge_plain, rule
from feddem.common.site_context import SiteContext
from feddem.common.vector_io import save_vector
from feddem.server.cross_domain import (
    DIAGONAL_REUSED, federated_matrix, last_round_start, own_loss_differs, simulation_matrix,
)

RUN = 5


def _report(rule_name: str, parameters: dict, weights: dict, sites: list[str], domains: list[str], **more) -> dict:
    return {"flower_run_id": RUN, "sites": [{"site": s, "domain": d} for s, d in zip(sites, domains)],
            "merge": {"rule": rule_name, "parameters": parameters},
            "rounds": [{"round": 1, "weights": weights}, {"round": 2, "weights": weights}]} | more


@pytest.mark.parametrize("rule_name", ["weighted-sum", "fisher", "regmean"])
def test_last_round_start_undoes_the_runs_own_merge(rule_name):
    gen = torch.Generator().manual_seed(0)
    merge_rule = rule(rule_name)
    shapes = {"a.weight": (3, 4), "b.bias": (4,)}
    names, weights = ["site-0", "site-1"], {"site-0": 0.7, "site-1": 0.4}
    vectors = {n: {k: torch.randn(s, generator=gen) for k, s in shapes.items()} for n in names}
    stats = {}
    for n in names:  # very unequal statistics, so that the rule's merge is far from the weighted sum
        scale = 50.0 if n == "site-0" else 0.1
        if rule_name == "fisher":
            stats[n] = {k: torch.rand(s, generator=gen) * scale for k, s in shapes.items()}
        elif rule_name == "regmean":
            x = torch.randn(8, 4, generator=gen) * scale ** 0.5
            stats[n] = {"a.weight": x.T @ x / 8, "fisher/b.bias": torch.rand(4, generator=gen) * scale}
    start = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    last = merge_plain(merge_rule, [vectors[n] for n in names], [stats.get(n) for n in names],
                       [weights[n] for n in names])
    aggregate = {k: start[k] + last[k] for k in shapes}
    report = _report(rule_name, merge_rule.parameters(), weights, names, ["x", "y"])
    got = last_round_start(report, aggregate, vectors, stats)
    for k in shapes:
        torch.testing.assert_close(got[k], start[k], rtol=1e-5, atol=1e-5)
    if rule_name != "weighted-sum":  # the weighted sum's recovery (the old one) is wrong for this rule
        plain = {k: aggregate[k] - sum(weights[n] * vectors[n][k] for n in names) for k in shapes}
        assert max(float((plain[k] - start[k]).abs().max()) for k in shapes) > 0.1
        if rule_name == "regmean":
            assert merge_rule.parts_of("a.weight", (3, 4), {"a.weight": (4, 4)}) == (GRAM, "gram-delta")


def test_last_round_start_names_missing_statistics():
    from feddem.common.errors import FeddemError

    report = _report("fisher", {}, {"site-0": 1.0}, ["site-0"], ["x"])
    with pytest.raises(FeddemError, match="merge-stats.safetensors.*site-0"):
        last_round_start(report, {"w": torch.zeros(2)}, {"site-0": {"w": torch.ones(2)}}, {})


def test_simulation_matrix_of_a_two_round_fisher_run_starts_each_local_model_at_the_true_start(tiny_base, tmp_path):
    """A two-round fisher run's folder by hand: the matrix's local models are start + d_j with the true start."""
    from feddem.common.modeling import load_model, load_tokenizer, model_checksum
    from feddem.server.ablation import pool_merge_loss, test_sets

    cfg = RunConfig(sites=2, model=str(tiny_base), train_examples=8, eval_examples=4, seq_len=32, device="cpu",
                    merge="fisher")
    base = load_model(str(tiny_base))
    params = dict(base.named_parameters())
    tensors = sorted(params)[:4]
    gen = torch.Generator().manual_seed(1)
    names, weights = ["site-0", "site-1"], {"site-0": 0.5, "site-1": 0.5}
    vectors = {n: {k: 0.05 * torch.randn(params[k].shape, generator=gen) for k in tensors} for n in names}
    stats = {n: {k: torch.rand(params[k].shape, generator=gen) * (100.0 if n == "site-0" else 0.01)
                 for k in tensors} for n in names}
    start = {k: 0.05 * torch.randn(params[k].shape, generator=gen) for k in tensors}
    last = merge_plain(rule("fisher"), [vectors[n] for n in names], [stats[n] for n in names], [0.5, 0.5])
    work = {}
    for i, n in enumerate(names):
        site = SiteContext.from_node_config({"partition-id": i, "work-dir": str(tmp_path / n)})
        work[n] = site.work_dir
        save_vector(vectors[n], site.vector_path(RUN))
        save_vector(stats[n], site.stats_path(RUN))
    out = tmp_path / "run"
    out.mkdir()
    save_vector({k: start[k] + last[k] for k in tensors}, out / "aggregate.safetensors")
    domains = list_shards(cfg.data)[:2]
    report = _report("fisher", rule("fisher").parameters(), weights, names, domains,
                     base_model={"ref": str(tiny_base), "checksum": model_checksum(base)})

    # the sites' own evaluations, as markers: a recovered start is not theirs, so the diagonal is evaluated again
    report["eval"] = {"local": {d: {"loss": 100.0 + i} for i, d in enumerate(domains)}}
    cross = simulation_matrix(cfg, report, out, work)
    assert "'fisher' rule" in cross["note"] and cross["diagonal"].startswith("evaluated again: the last round's")
    tests = test_sets(cfg, load_tokenizer(str(tiny_base)), domains)
    pad = load_tokenizer(str(tiny_base)).pad_token_id
    for n in names:
        local = {k: start[k] + vectors[n][k] for k in tensors}
        want = pool_merge_loss(base, {"local": local}, tests, pad, torch.device("cpu"))({"local": 1.0})
        assert cross["loss"][n] == pytest.approx(want, rel=1e-5)
    # the weighted sum's recovery would start elsewhere, and score measurably differently
    wrong = {k: start[k] + last[k] - 0.5 * (vectors["site-0"][k] + vectors["site-1"][k]) + vectors["site-1"][k]
             for k in tensors}
    off = pool_merge_loss(base, {"local": wrong}, tests, pad, torch.device("cpu"))({"local": 1.0})
    assert max(abs(off[d] - cross["loss"]["site-1"][d]) for d in domains) > 1e-3

    # the same folder as a one-round run (start 0): the diagonal is the sites' own evaluation, the rest evaluated
    one = report | {"rounds": report["rounds"][:1]}
    cross = simulation_matrix(cfg, one, out, work)
    assert cross["diagonal"] == DIAGONAL_REUSED and "note" not in cross
    for i, n in enumerate(names):
        want = pool_merge_loss(base, {"local": vectors[n]}, tests, pad, torch.device("cpu"))({"local": 1.0})
        assert cross["loss"][n] == pytest.approx(want | {domains[i]: 100.0 + i}, rel=1e-5)


def test_federated_matrix_asks_no_site_about_its_own_local_model_when_its_own_loss_is_given():
    asked = []

    def evaluate(vector, ask):
        asked.append((float(vector["w"][0]), sorted(ask)))
        return {n: (f"d{n}", float(vector["w"][0]) * 10 + n) for n in ask}

    names = {1: "site-0", 2: "site-1", 3: "site-2"}
    vector_of = lambda node: {"w": torch.ones(1) * node}  # noqa: E731
    full = federated_matrix(names, vector_of, evaluate)
    assert asked == [(1.0, [1, 2, 3]), (2.0, [1, 2, 3]), (3.0, [1, 2, 3])] and "diagonal" not in full
    asked.clear()
    own = {n: (f"d{n}", 11.0 * n) for n in names}  # what each site measured of its own model: the diagonal
    reused = federated_matrix(names, vector_of, evaluate, own=own)
    assert asked == [(1.0, [2, 3]), (2.0, [1, 3]), (3.0, [1, 2])]  # 6 evaluations instead of 9
    assert reused["diagonal"] == DIAGONAL_REUSED
    for node, name in names.items():
        assert reused["loss"][name] == full["loss"][name] | {f"d{node}": 11.0 * node}


@pytest.mark.parametrize("settings, exact, reason", [
    ({}, True, ""),
    ({"sparsify": "dare:0.5"}, True, "sparsified"),
    ({"vector_dtype": "bfloat16"}, True, "bfloat16"),
    ({"lora": True}, True, "LoRA"),
    ({}, False, "recovered"),
])
def test_own_loss_is_the_diagonal_only_where_it_is_the_same_quantity(settings, exact, reason):
    got = own_loss_differs(RunConfig(**settings), exact_start=exact)
    assert (got == "") if not reason else (reason in got and got.startswith("evaluated again"))
