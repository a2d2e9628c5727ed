"""Weighting strategies: each on hand-made inputs with known answers, then in real (in-process) DEM runs: the search
respects the sites' privacy guard, multi-round DEM, and the weights and metrics land in report.json."""

import json
import math

import numpy as np
import pytest
import torch

from feddem.client.guard import read_record
from feddem.common.weighting.dga import alignment
from feddem.common.site_context import SiteContext
from feddem.common import messages as M
from feddem.common.config import RunConfig, count_candidates
from feddem.common.errors import FeddemError
from feddem.common.weighting import ALIGNMENT, EMBEDDING, WEIGHTINGS, SiteReport, compute_weights
from feddem.common.weighting.chameleon import leverage_scores
from feddem.common.weighting.weights import parse_weights
from feddem.common.weighting.search import coordinate_search
from feddem.server.ablation import POOL, ablate_pool, candidate_weights, parse_candidates
from feddem.server.workflow import run_dem
from tests.fakegrid import RUN_ID, FakeGrid, task_identity

NODES = [9_000_000_011, 9_000_000_022, 9_000_000_033]


def _reports(**extra_by_site) -> list[SiteReport]:
    return [SiteReport(f"site-{i}", f"d{i}", 10 * (i + 1), 100 * (i + 1), 1.0, extra)
            for i, extra in enumerate(extra_by_site.get("extra", [{}, {}, {}]))]


# --- strategies on known inputs ---

def test_registry_lists_every_strategy():
    assert set(WEIGHTINGS) == {"uniform", "size", "chameleon", "dga", "search", "manual"}
    assert WEIGHTINGS["search"].search and WEIGHTINGS["search"].weigh is None


def test_uniform_and_size():
    reports = _reports()
    assert compute_weights("uniform", reports) == pytest.approx([1 / 3] * 3)
    assert compute_weights("size", reports) == pytest.approx([1 / 6, 2 / 6, 3 / 6])


def test_chameleon_favours_the_domain_unlike_the_others():
    a, b = np.array([1.0, 0.0, 0.0, 0.5]), np.array([0.0, 1.0, 0.2, 0.0])
    reports = _reports(extra=[{EMBEDDING: a}, {EMBEDDING: a.copy()}, {EMBEDDING: b}])
    w = compute_weights("chameleon", reports, RunConfig(weighting="chameleon"))
    assert sum(w) == pytest.approx(1.0)
    assert w[0] == pytest.approx(w[1]) and w[2] > w[0]  # the two identical domains tie, the unique one leads
    scores = leverage_scores(np.stack([a, a, b]), 0.1)
    assert scores[2] == pytest.approx(4 * scores[0])  # centred: the unique row is twice as far from the mean
    inverse = compute_weights("chameleon", reports, RunConfig(weighting="chameleon", chameleon_inverse=True))
    assert inverse[2] < inverse[0]  # the pre-training variant favours the common domains
    colder = compute_weights("chameleon", reports, RunConfig(weighting="chameleon", chameleon_tau=1.0))
    assert colder[2] - colder[0] < w[2] - w[0]  # a higher temperature flattens the weights
    with pytest.raises(FeddemError, match="no domain embedding from site-1"):
        compute_weights("chameleon", _reports(extra=[{EMBEDDING: a}, {}, {EMBEDDING: b}]), RunConfig())


def test_dga_leans_toward_the_site_aligned_with_the_target():
    rng = np.random.default_rng(0)
    vectors = [{"w": torch.from_numpy(rng.standard_normal(500).astype(np.float32))} for _ in range(3)]
    target = {"w": vectors[1]["w"].clone()}  # the target direction is site 1's vector
    aligned = [alignment(v, target) for v in vectors]
    assert aligned[1] == pytest.approx(1.0) and abs(aligned[0]) < 0.2
    cfg, state = RunConfig(weighting="dga"), {}
    reports = _reports(extra=[{ALIGNMENT: a} for a in aligned])
    first = compute_weights("dga", reports, cfg, state)
    assert sum(first) == pytest.approx(1.0) and max(first) == first[1]
    second = compute_weights("dga", reports, cfg, state)  # the moving average keeps moving toward site 1
    assert second[1] > first[1]
    assert compute_weights("dga", reports, RunConfig(weighting="dga", dga_eta=0.1), {})[1] < first[1]


def test_coordinate_search_finds_the_minimum_within_budget_and_bounds():
    target = np.array([0.8, 0.1, 0.3])
    calls = []

    def score(w):
        calls.append(list(w))
        return float(((np.array(w) - target) ** 2).sum())

    best, value, history = coordinate_search(3, score, budget=40, step=0.5, low=0.0, high=0.9)
    assert len(calls) == len(history) <= 40
    assert value == min(s for _, s in history) and value < score([1 / 3] * 3)
    assert all(0.0 <= x <= 0.9 for c, _ in history for x in c)
    assert best[0] > best[2] > best[1]
    _, _, short = coordinate_search(3, score, budget=3, step=0.5, low=0.0, high=1.0)
    assert len(short) == 3


def test_coordinate_search_moves_the_weight_scale_first_and_can_exceed_one():
    """A scoring function whose best merge has weights summing to 2: the first candidate after the uniform start is
    every weight scaled up together, and the search ends with a sum above 1 (near 2), inside the bounds."""
    calls = []

    def score(w):
        calls.append(list(w))
        return (sum(w) - 2.0) ** 2 + 0.01 * float(np.var(w))

    best, value, history = coordinate_search(4, score, budget=20, step=0.5, low=0.0, high=1.0)
    assert calls[0] == [0.25] * 4 and calls[1] == pytest.approx([0.375] * 4)  # uniform, then the scale x1.5
    assert sum(best) > 1.5 and abs(sum(best) - 2.0) < 0.3 and value < score([0.25] * 4)
    assert all(0.0 <= x <= 1.0 for c, _ in history for x in c)
    capped, _, _ = coordinate_search(4, score, budget=20, step=0.5, low=0.0, high=0.3)  # weight-max binds
    assert max(capped) <= 0.3 and sum(capped) == pytest.approx(1.2)
    without, _, _ = coordinate_search(4, score, budget=3, step=0.5, low=0.0, high=1.0, scale=False)
    assert without == pytest.approx([0.375, 0.375, 0.25, 0.25])  # one weight at a time: the old search


def test_manual_weights_parse_and_name_their_errors():
    assert parse_weights("site-0=0.5, site-1=0.25") == {"site-0": 0.5, "site-1": 0.25}
    for bad, message in [("site-0", "is not SITE=WEIGHT"), ("site-0=x", "is not a number"),
                         ("a=1,a=2", "given twice"), ("a=nan", "not finite"), (",", "none given")]:
        with pytest.raises(FeddemError, match=message):
            parse_weights(bad)
    cfg = RunConfig(weights="site-0=0.2,site-1=0.3,site-2=0.5")
    assert cfg.strategy_name == "manual"
    assert compute_weights("manual", _reports(), cfg) == [0.2, 0.3, 0.5]
    with pytest.raises(FeddemError, match=r"unknown site\(s\) \['site-9'\], missing site\(s\) \['site-2'\]"):
        compute_weights("manual", _reports(), RunConfig(weights="site-0=0.2,site-1=0.3,site-9=0.5"))


@pytest.mark.parametrize("record, message", [
    ({"weighting": "search"}, "only with --noise > 0"),
    ({"weighting": "search", "noise": 0.01, "aggregation-budget": 4}, "search-budget 8 is more than"),
    ({"weights": "site-0=1", "weighting": "chameleon"}, "cannot be combined"),
    ({"weighting": "manual"}, "needs --weights"),
    ({"rounds": 0}, "rounds must be at least 1"),
    ({"dga-ema": 1.0}, "dga-ema must be in"),
    ({"chameleon-tau": 0.0}, "chameleon-tau must be a positive"),
])
def test_weighting_settings_are_validated(record, message):
    with pytest.raises(FeddemError, match=message):
        RunConfig.from_record(record)
    RunConfig.from_record({"weighting": "search", "aggregation": "plain"})  # a trusted run may search


def test_one_weights_parser_for_simulate_config_and_admin_cli():
    """`feddem simulate --weights`, the run config and `feddem-admin models remerge --weights` read weights alike:
    duplicates, inf and nan are refused everywhere (the admin CLI as bad usage)."""
    from feddem.server.admin_cli import UsageError
    from feddem.server.admin_cli import parse_weights as admin_parse

    assert admin_parse("site-0=0.7, site-1=0.3") == parse_weights("site-0=0.7,site-1=0.3") == {"site-0": 0.7,
                                                                                               "site-1": 0.3}
    for bad, message in [("site-0=1,site-0=1", "site-0 is given twice"), ("site-0=inf", "not finite"),
                         ("site-0=nan", "not finite"), ("site-0=-inf", "not finite"), ("x", "is not SITE=WEIGHT"),
                         ("", "none given")]:
        with pytest.raises(UsageError, match=message):
            admin_parse(bad)
        with pytest.raises(FeddemError, match=message):
            parse_weights(bad)
        with pytest.raises(FeddemError, match=message):
            RunConfig(aggregation="plain", weights=bad or ",").validate()


def test_one_weight_range_check_for_config_admin_and_guard(tmp_path):
    """The run config, the admin re-merge and a site's guard refuse the same weights: outside [weight-min,
    weight-max], nan or inf; the bounds themselves are in range."""
    from feddem.client.guard import GuardPolicy, GuardRefusal, check_weight
    from feddem.common.weighting.weights import check_range, clamp, in_range, outside_range
    from feddem.server.admin.model_ops import check_weights
    from feddem.server.store.errors import InvalidArgument

    cfg = RunConfig(weight_min=0.1, weight_max=0.6)
    policy, site = GuardPolicy(2, 0.1, 0.6), SiteContext(0, "site-0", tmp_path)
    for w in (0.1, 0.35, 0.6):
        assert in_range(w, 0.1, 0.6)
        check_weight(policy, site, w)
        assert check_weights({"site-0": w}, ["site-0", "site-1"], cfg) == {"site-0": w, "site-1": 0.0}
    for w in (0.0, 0.7, math.nan, math.inf, -math.inf):
        assert not in_range(w, 0.1, 0.6)
        with pytest.raises(GuardRefusal, match="outside the allowed range"):
            check_weight(policy, site, w)
        with pytest.raises(InvalidArgument, match=r"outside \[weight-min, weight-max\] = \[0.1, 0.6\]"):
            check_weights({"site-0": w}, ["site-0", "site-1"], cfg)
    assert outside_range({"a": 0.05, "b": 0.2, "c": math.nan}, 0.1, 0.6).keys() == {"a", "c"}
    assert clamp({"a": 0.05, "b": 0.2, "c": 0.9}, 0.1, 0.6) == {"a": 0.1, "b": 0.2, "c": 0.6}
    with pytest.raises(FeddemError, match=r"weights \{'b': 2.0\} are outside .*: the guards would refuse"):
        check_range({"a": 0.5, "b": 2.0}, 0.0, 1.0, "the guards would refuse")
    with pytest.raises(FeddemError, match=r"weights \{'site-1': 0.7\} are outside \[weight-min, weight-max\]"):
        RunConfig(sites=2, min_peers=1, weight_min=0.1, weight_max=0.6, weights="site-0=0.5,site-1=0.7").validate()


def test_strategies_own_their_parameters_and_the_config_asks_the_chosen_one(monkeypatch):
    """Every option a strategy declares is a run-config field with the declared default and help; a value outside
    the declared range is named; `RunConfig.validate` runs the chosen strategy's own check."""
    from dataclasses import fields, replace

    from feddem.common.weighting import parameter
    from feddem.common.weighting.base import Parameter

    by_key = {f.name.replace("_", "-"): f for f in fields(RunConfig)}
    declared = [p for s in WEIGHTINGS.values() for p in s.parameters()]
    assert {p.name for p in declared} >= {"chameleon-lambda", "chameleon-tau", "chameleon-inverse", "dga-eta",
                                          "dga-ema", "target", "target-examples", "search-budget", "search-step",
                                          "weights"}
    for p in declared:
        assert p.name in by_key and by_key[p.name].default == p.default and by_key[p.name].metadata["help"] == p.help
        assert parameter(p.name) is p
    for key, value, message in [("target-examples", 0, "target-examples must be at least 1, got 0"),
                                ("search-step", -0.5, "search-step must be a positive number, got -0.5"),
                                ("dga-ema", 1.0, r"dga-ema must be in \[0, 1\), got 1.0"),
                                ("chameleon-lambda", 0.0, "chameleon-lambda must be a positive number")]:
        with pytest.raises(FeddemError, match=message):
            RunConfig.from_record({key: value})  # named whichever strategy is chosen
    with pytest.raises(FeddemError, match=r"x must be in \[0, 2\], got 3"):
        Parameter("x", float, 1.0, "", low=0.0, high=2.0).check(3.0)

    def refuse(cfg):
        raise FeddemError(f"size refuses seed {cfg.seed}")

    monkeypatch.setitem(WEIGHTINGS, "size", replace(WEIGHTINGS["size"], check=refuse))
    RunConfig(weighting="uniform", seed=7).validate()  # another strategy's check does not run
    with pytest.raises(FeddemError, match="size refuses seed 7"):
        RunConfig(weighting="size", seed=7).validate()
    assert WEIGHTINGS["search"].aggregations(RunConfig(search_budget=5)) == 5
    assert WEIGHTINGS["dga"].aggregations(RunConfig()) == 1


def test_dga_and_search_have_one_home_each():
    """DGA's server part (target direction), site part (alignment) and weights are one module; the search's
    candidates and scoring loop another; the old server/client modules are gone."""
    import importlib.util

    from feddem.common.weighting import dga, search

    assert {"target_direction", "alignment", "dga_weights", "eg_update"} <= set(vars(dga))
    assert {"coordinate_search", "search_merge"} <= set(vars(search))
    for gone in ("feddem.server.target", "feddem.server.search"):
        assert importlib.util.find_spec(gone) is None
    direction = {"w": torch.tensor([1.0, 0.0])}
    assert dga.alignment({"w": torch.tensor([2.0, 0.0])}, direction) == pytest.approx(1.0)


# --- in real runs (the real ClientApp through a serialising in-process grid) ---

@pytest.fixture(autouse=True)
def _task_identity():
    with task_identity():
        yield


def _cfg(base, out, **kw) -> RunConfig:
    values = dict(sites=3, model=str(base), steps=3, lr=1e-3, train_examples=32, eval_examples=16, batch_size=4,
                  seq_len=32, base_steps=30, device="cpu", timeout=2.0, out_dir=str(out), min_peers=2)
    return RunConfig(**(values | kw))


def _run(tmp_path, base, node_config=None, **kw):
    grid = FakeGrid(tmp_path / "sites", NODES, node_config=node_config)
    result = run_dem(grid, _cfg(base, tmp_path / "run", **kw), RUN_ID)
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved == json.loads(json.dumps(result.report))
    return saved, grid


def test_plain_search_picks_the_best_candidate_and_reports_it(tiny_base, tmp_path):
    report, _ = _run(tmp_path, tiny_base, weighting="search", aggregation="plain", search_budget=5)
    search = report["rounds"][0]["search"]
    scores = [c["validation_loss"] for c in search["candidates"]]
    assert len(scores) == 5 and search["stopped"] == ""
    assert search["best_validation_loss"] == min(scores) <= scores[0]  # never worse than the uniform start
    best = search["candidates"][scores.index(min(scores))]["weights"]
    assert report["weights"] == pytest.approx(best) and report["weighting"] == "search"
    assert report["weight_scale"] == pytest.approx(sum(report["weights"].values()))  # the scale the run used
    assert set(report["eval"]["merged"]) == {"arithmetic", "records", "prose"}


def test_secure_search_spends_one_aggregation_per_candidate_within_the_budget(tiny_base, tmp_path):
    report, _ = _run(tmp_path, tiny_base, weighting="search", noise=1e-4, aggregation_budget=3, search_budget=3)
    search = report["rounds"][0]["search"]
    assert len(search["candidates"]) == 3 and search["aggregations"] == 3 and search["stopped"] == ""
    for i in range(3):
        entries = read_record(SiteContext(i, f"site-{i}", tmp_path / "sites" / f"site-{i}"), RUN_ID)
        assert len(entries) == 3 and all(e["noise"] == 1e-4 for e in entries)
    assert report["secure_aggregation"]["noise"] == 1e-4


def test_secure_search_stops_where_a_site_guard_refuses_and_keeps_the_best_so_far(tiny_base, tmp_path):
    """A site whose own node config allows one aggregation: the second candidate is refused, the search says so
    and merges its first candidate (the uniform weights)."""
    report, _ = _run(tmp_path, tiny_base, node_config={"aggregation-budget": 1}, weighting="search", noise=1e-4,
                     aggregation_budget=4, search_budget=4)
    search = report["rounds"][0]["search"]
    assert len(search["candidates"]) == 1 and "already aggregated once" in search["stopped"]
    assert report["weights"] == pytest.approx({f"site-{i}": 1 / 3 for i in range(3)})
    assert all(math.isfinite(v["loss"]) for v in report["eval"]["merged"].values())


def test_chameleon_run_weights_from_the_sites_embeddings(tiny_base, tmp_path):
    report, grid = _run(tmp_path, tiny_base, weighting="chameleon", aggregation="plain")
    weights = report["weights"]
    assert sum(weights.values()) == pytest.approx(1.0) and len(set(round(w, 6) for w in weights.values())) > 1
    assert report["weighting"] == "chameleon"
    top = max(weights.values())
    capped, _ = _run(tmp_path / "capped", tiny_base, weighting="chameleon", aggregation="plain",
                     weight_max=top - 0.01)  # the strategy's weights are clamped into the configured range
    assert max(capped["weights"].values()) == pytest.approx(top - 0.01)


def test_multi_round_dga_starts_each_round_from_the_merge(tiny_base, tmp_path):
    report, grid = _run(tmp_path, tiny_base, weighting="dga", rounds=2, target="synthetic:prose",
                        target_examples=8)
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    first, second = (r["weights"] for r in report["rounds"])
    assert max(first, key=first.get) == "site-2"  # the prose site helps the prose target most
    assert second["site-2"] > first["site-2"]  # and the moving average keeps leaning its way
    # every training request carries the target direction; from round 2 on also the merge to start from
    trains = [records for kind, records in grid.requests if kind == M.TRAIN]
    assert len(trains) == 6 and all(M.TARGET in r for r in trains)
    assert [M.START in r for r in trains] == [False] * 3 + [True] * 3
    # the merge serves the target task (it may cost the other domains: that is what DGA trades)
    assert report["eval"]["merged"]["prose"]["loss"] < report["eval"]["base"]["prose"]["loss"]


@pytest.mark.slow
def test_simulate_with_dga_weights_the_sites_by_their_alignment(tmp_path, tiny_base):
    """`feddem simulate --weighting dga` end to end (Flower's Simulation Engine, secure aggregation): the server's
    target direction reaches the sites, their alignments come back, and the weights lean to the target's site."""
    from tests.conftest import simulate_cli

    report, _ = simulate_cli(tmp_path / "run", "--sites", "3", "--weighting", "dga", "--target", "synthetic:prose",
                             "--target-examples", "8")
    weights = report["weights"]
    assert report["failures"] == {} and sum(weights.values()) == pytest.approx(1.0)
    assert max(weights, key=weights.get) == "site-2" and weights["site-2"] > 1 / 3  # the prose site
    assert report["eval"]["merged"]["prose"]["loss"] < report["eval"]["base"]["prose"]["loss"]


# --- ablations: candidate mixtures ranked by merging ---

def test_candidates_parse_and_count():
    names = ["site-0", "site-1", "site-2"]
    every = parse_candidates("2", names)
    assert every == [("site-0",), ("site-1",), ("site-2",), ("site-0", "site-1"), ("site-0", "site-2"),
                     ("site-1", "site-2")]
    assert count_candidates("2", 3) == len(every) and count_candidates("2", 3, 2) == 3
    assert parse_candidates("site-1, site-0; site-2,site-0", names) == [("site-0", "site-1"), ("site-0", "site-2")]
    assert candidate_weights(("site-0", "site-2"), names) == {"site-0": 0.5, "site-1": 0.0, "site-2": 0.5}
    with pytest.raises(FeddemError, match=r"unknown site\(s\) \['site-7'\]"):
        parse_candidates("site-0,site-7", names)
    with pytest.raises(FeddemError, match="needs at least 3"):
        parse_candidates("site-0,site-1", names, min_size=3)


def test_trusted_run_ranks_mixtures_and_keeps_a_pool_that_feddem_ablate_reads(tiny_base, tmp_path):
    report, _ = _run(tmp_path, tiny_base, aggregation="plain", keep_pool=True, ablate="2")
    run = tmp_path / "run"
    ranking = report["ablation"]
    assert len(ranking) == 6 and [r["mean_loss"] for r in ranking] == sorted(r["mean_loss"] for r in ranking)
    assert json.loads((run / "ablation.json").read_text())["ranking"] == ranking and (run / "ablation.png").is_file()
    assert sorted(p.name for p in (run / POOL).iterdir()) == [f"site-{i}.safetensors" for i in range(3)]
    # offline, from the pool, on the data this machine holds: the same ranking and the same losses
    domains = ["arithmetic", "records", "prose"]
    offline = ablate_pool(run, "2", domains=domains, out=tmp_path / "offline")
    assert [r["candidate"] for r in offline] == [r["candidate"] for r in ranking]
    for mine, theirs in zip(offline, ranking):
        assert mine["mean_loss"] == pytest.approx(theirs["mean_loss"], abs=1e-5)
    assert (tmp_path / "offline" / "ablation.json").is_file()


def test_secure_ablation_is_an_aggregation_per_candidate_within_the_budget(tiny_base, tmp_path):
    with pytest.raises(FeddemError, match="needs 2 aggregations"):
        RunConfig(sites=3, ablate="3").validate()
    report, _ = _run(tmp_path, tiny_base, ablate="3", noise=1e-4, aggregation_budget=2)
    assert [r["candidate"] for r in report["ablation"]] == [["site-0", "site-1", "site-2"]]
    entries = read_record(SiteContext(0, "site-0", tmp_path / "sites" / "site-0"), RUN_ID)
    assert len(entries) == 2  # the merge and the one candidate
    with pytest.raises(FeddemError, match="has no pool"):
        ablate_pool(tmp_path / "run", "2")
