"""The merge rules wired into runs (`--merge`, common/merging/parts.py, client/merge_parts.py): a rule's parts
travel as one vector and their sums give `merge_plain`'s merge; every part fits the secure sum's clip; secure,
plain and trusted (held) aggregation of a rule agree (secure: within what its quantization bound implies); a
hostile server cannot ask a site for a part set other than its declared rule's, nor for a second sum; and one
slow end-to-end `feddem simulate --merge fisher|regmean` with secure aggregation gives merge_plain of the sites'
stored vectors and statistics (within the reported bound)."""

import glob
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from feddem.common import messages as M
from feddem.common.config import RunConfig
from feddem.common.errors import FeddemError
from feddem.common.merging.parts import combine_upload, site_upload, split_name, upload_shapes, upload_size
from feddem.common.merging.rules import (
    DENOMINATOR, GRAM, GRAM_TIMES_DELTA, NUMERATOR, WEIGHTED, FisherMerge, RegMeanMerge, WeightedSum, merge_plain,
    rule,
)
from feddem.common.site_context import SiteContext
from feddem.common.stored_tensors import read_header
from feddem.common.vector_io import load_vector
from feddem.server.secure_aggregation import secure_sum
from feddem.server.aggregation import HeldAggregator, PlainAggregator, SecureAggregator
from feddem.server.workflow import Stage
from tests.conftest import simulate_cli
from tests.fakegrid import RUN_ID, FakeGrid
from tests.test_aggregation import _aggregate
from tests.test_hostile_server import NODES as HOSTILE_NODES
from tests.test_hostile_server import WEIGHTS as HOSTILE_WEIGHTS
from tests.test_hostile_server import Sites, _ask_plain, _base, _refusal
from tests.test_hostile_server import _cfg as hostile_cfg
from tests.test_hostile_server import run7  # noqa: F401 (the fixture: deployed sites' data, trained once)
from tests.test_secure_round import (  # noqa: F401 (the autouse fixture)
    NODES, WEIGHTS, _base_record, _cfg, _shapes, _task_identity,
)

SHAPES = {"a.weight": (3, 4), "b.weight": (2, 3), "norm": (4,)}


def _random_sites(seed: int = 0, count: int = 3):
    g = torch.Generator().manual_seed(seed)
    vectors, fishers, grams = [], [], []
    for _ in range(count):
        vectors.append({n: torch.randn(s, generator=g) * 0.01 for n, s in SHAPES.items()})
        fishers.append({n: torch.rand(s, generator=g) for n, s in SHAPES.items()})
        x = {n: torch.randn(20, s[1], generator=g) for n, s in SHAPES.items() if len(s) == 2}
        grams.append({n: xs.T @ xs / 20 for n, xs in x.items()})
    return vectors, fishers, grams


@pytest.mark.parametrize("name", ["weighted-sum", "fisher", "regmean"])
def test_the_sum_of_weighted_uploads_gives_merge_plain(name):
    vectors, fishers, grams = _random_sites()
    merge_rule, weights = rule(name), [0.2, 0.3, 0.5]
    stats = {"weighted-sum": [None] * 3, "fisher": fishers, "regmean": grams}[name]
    summed = {}
    for vector, site_stats, w in zip(vectors, stats, weights):
        for key, t in site_upload(merge_rule, vector, site_stats).items():  # at weight 1; the sum's w_i * does the rest
            summed[key] = summed.get(key, 0) + w * t
    expected = merge_plain(merge_rule, vectors, stats, weights)
    got = combine_upload(merge_rule, summed, sum(weights))
    assert got.keys() == expected.keys() == SHAPES.keys()
    for n in SHAPES:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-7)
    # the server lays the sum out from the base's shapes alone, and the upload's size follows
    shapes = upload_shapes(merge_rule, sorted(summed), SHAPES)
    assert shapes == {key: tuple(t.shape) for key, t in summed.items()}
    relative = {"weighted-sum": 1.0, "fisher": 2.0, "regmean": (12 + 16 + 6 + 9 + 4) / 22}[name]  # D G and G per matrix
    assert upload_size(merge_rule, sorted(summed), SHAPES) == pytest.approx(relative)


def test_parts_fit_the_clip_even_for_outlying_statistics():
    vectors, fishers, grams = _random_sites()
    vector = {n: t.clamp(-1, 1) * 50 for n, t in vectors[0].items()}  # |d| up to 0.5
    vector["big"] = torch.full((100_000,), 0.5)
    fisher = {n: f.clone() for n, f in fishers[0].items()} | {"big": torch.rand(100_000)}
    fisher["a.weight"][0, 0] = 1e9  # one parameter's Fisher far above all others (~1e9 x their mean)
    parts = site_upload(FisherMerge(), vector, fisher)
    biggest_d = max(float(t.abs().max()) for t in vector.values())
    for key, t in parts.items():
        bound = 1.0 if key.startswith(DENOMINATOR) else biggest_d
        assert float(t.abs().max()) <= bound + 1e-6, key
    # the outlier still dominates its own parameter: it has the cap's weight, the others about 1
    den = {split_name(FisherMerge(), k)[1]: t for k, t in parts.items() if k.startswith(DENOMINATOR)}
    assert float(den["a.weight"][0, 0]) == pytest.approx(1.0)
    assert float(den["a.weight"].flatten()[1:].max()) < 0.05
    # a Gram matrix with a huge diagonal is scaled to the cap, so its part stays within the clip
    big = {n: g * 1e4 for n, g in grams[0].items()}
    regmean = RegMeanMerge()
    for key, t in site_upload(regmean, vectors[0], big).items():
        if key.startswith(GRAM + "/"):
            assert float(t.abs().max()) <= 1.0 + 1e-6, key
    # and one of ordinary size is used as it is (the math of RegMean unchanged)
    ordinary = site_upload(regmean, vectors[0], grams[0])
    torch.testing.assert_close(ordinary[f"{GRAM}/a.weight"] * regmean.cap, regmean.regularised(grams[0]["a.weight"]))


def test_an_upload_name_outside_the_rules_parts_is_refused():
    with pytest.raises(FeddemError, match="not <part>/<name>"):
        split_name(FisherMerge(), "gram/a.weight")
    with pytest.raises(FeddemError, match="not <part>/<name>"):
        split_name(RegMeanMerge(), "a.weight")
    with pytest.raises(FeddemError, match="lacks"):
        upload_shapes(FisherMerge(), [f"{NUMERATOR}/missing.weight"], SHAPES)
    assert split_name(WeightedSum(), "a.weight") == ("weighted", "a.weight")


# --- the aggregators, on sites fine-tuned for real through the train handler ---

@pytest.fixture(scope="module", params=["fisher", "regmean"])
def trained_rule(request, tmp_path_factory, tiny_base):
    """Four sites fine-tuned (2 steps) in a plain run with the merge rule; their folders and train replies."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, 1
    root = tmp_path_factory.mktemp(f"trained-{request.param}")
    cfg = _cfg(tiny_base, aggregation="plain", merge=request.param)
    replies = Stage(FakeGrid(root, NODES), cfg, _base_record(tiny_base)).run(
        "train", M.TRAIN, {n: M.TrainRequest().to_record() for n in NODES})
    return request.param, root, replies


def _stored(root, index, run_id=RUN_ID):
    site = SiteContext(index, f"site-{index}", root / f"site-{index}")
    path = site.vector_path(run_id)
    return load_vector(path), load_vector(path.with_name("merge-stats.safetensors"))


def _merge_plain_of_sites(root, name, weights, nodes):
    stored = [_stored(root, NODES.index(n)) for n in nodes]
    return merge_plain(rule(name), [v for v, _ in stored], [s for _, s in stored], [weights[n] for n in nodes])


def _secure_merge_tolerance(merge_rule, vectors, stats, weights, bound, secure) -> dict:
    """Per tensor, how far the rule's merge of secure sums (`secure`) may be from `merge_plain`'s when each summed
    part element is off by at most `bound` (the secure sum's reported bound, in the parts' scaled units:
    e = `bound / part_scale` in the rule's own). Fisher: per element, the quotient s * num / den. RegMean: for a
    linear layer (its other tensors: Fisher's, or weighted sums), with M = s A B^-1 (plain sums A, B) and M' = s A' B'^-1 (secure ones, off by dA, dB),
    M' - M = (s dA - M' dB) B^-1 exactly, so |M' - M|_ij <= e (s + sum_l |M'_il|) sum_k |B^-1_kj| (dB also
    holds the ridge's change, 1e-6 of e); the tensors outside its Gram parts are weighted sums, off by `bound`."""
    sums: dict = {part: {} for part in merge_rule.parts_names}
    for vector, site_stats, w in zip(vectors, stats, weights):
        for part, tensors in merge_rule.site_parts(dict(vector), dict(site_stats), w).items():
            for n, t in tensors.items():
                sums[part][n] = sums[part].get(n, 0) + t.double()
    s, tolerance = sum(weights), {}
    if sums.get(NUMERATOR):  # fisher, and regmean's tensors that are not linear weights
        e = bound / merge_rule.part_scale(NUMERATOR)
        num, den = sums[NUMERATOR], sums[DENOMINATOR]
        tolerance |= {n: s * (e / (den[n] - e) + num[n].abs() * e / (den[n] * (den[n] - e))) for n in num}
    if isinstance(merge_rule, FisherMerge):
        return tolerance
    e = bound / merge_rule.part_scale(GRAM)
    tolerance |= {n: torch.tensor(bound) for n in sums[WEIGHTED]}
    for n in sums[GRAM_TIMES_DELTA]:
        gram = sums[GRAM][n]
        gram = gram + 1e-6 * float(torch.diagonal(gram).mean()) * torch.eye(gram.shape[0], dtype=gram.dtype)
        column = torch.linalg.inv(gram).abs().sum(dim=0, keepdim=True)  # sum_k |B^-1_kj|
        tolerance[n] = e * (1 + 1e-6) * (s + secure[n].double().abs().sum(dim=1, keepdim=True)) * column
    return tolerance


def regmean_sums(root, weights, nodes) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each linear layer's summed (regularised, weighted) Gram matrix and D G product, in float64."""
    merge_rule, total = RegMeanMerge(), {}
    for n in nodes:
        vector, stats = _stored(root, NODES.index(n))
        parts = merge_rule.site_parts(dict(vector), dict(stats), weights[n])
        for name, g in parts[GRAM].items():
            gram, product = total.get(name, (0, 0))
            total[name] = (gram + g.double(), product + parts[GRAM_TIMES_DELTA][name].double())
    return total


def regmean_conditioning(root, weights, nodes) -> dict[str, float]:
    """The condition number of each linear layer's summed Gram matrix."""
    return {name: float(torch.linalg.cond(g)) for name, (g, _) in regmean_sums(root, weights, nodes).items()}


def test_secure_plain_and_trusted_aggregation_of_a_rule_agree(trained_rule, tiny_base, tmp_path):
    name, root, replies = trained_rule
    layout = M.TrainReply.from_record(replies[NODES[0]]).layout
    assert all("/" in key for key in layout)  # the site reported its rule's parts, not its vector
    got = {}
    for mode, kw in (("plain", {"aggregation": "plain"}), ("held", {"aggregation": "plain", "keep_pool": True}),
                     ("secure", {"aggregation": "secure"})):
        shutil.copytree(root, tmp_path / mode)
        got[mode] = _aggregate(tmp_path / mode, tiny_base, replies, merge=name, **kw)
    assert {m: type(a) for m, (a, _) in got.items()} == {"plain": PlainAggregator, "held": HeldAggregator,
                                                         "secure": SecureAggregator}
    plain, held, secure = (got[m][1] for m in ("plain", "held", "secure"))
    expected = _merge_plain_of_sites(root, name, WEIGHTS, NODES)
    for outcome in (plain, held, secure):
        assert outcome.aggregate.keys() == expected.keys()
        assert sorted(outcome.contributors) == NODES
    scale = max(float(t.abs().max()) for t in expected.values())
    # float32 sums in another order (and the part scales divided out): a few ulp of each sum, which RegMean's solve
    # amplifies by the condition number of the layer's summed Gram matrix (normwise, per layer)
    conditioning = regmean_conditioning(root, WEIGHTS, NODES) if name == "regmean" else {}
    for n, t in expected.items():
        for outcome in (plain, held):
            if n in conditioning:
                error = float((outcome.aggregate[n] - t).norm() / t.norm())
                assert error <= 64 * conditioning[n] * torch.finfo(torch.float32).eps, (n, error, conditioning[n])
            else:
                torch.testing.assert_close(outcome.aggregate[n], t, rtol=1e-4, atol=1e-6 * scale)
    # the trusted run recovers each site's own vector from its parts (cross-domain matrix, pool)
    # (fisher: num / den, exact to float32; regmean: D G G^-1 with the ridge of `combine`, close)
    held_aggregator = got["held"][0]
    own, _ = _stored(root, 1)
    recovered = held_aggregator.vectors[NODES[1]]
    own_conditioning = regmean_conditioning(root, WEIGHTS, [NODES[1]]) if name == "regmean" else {}
    for n, t in own.items():  # the solve with the site's own Gram: its conditioning again
        error = float((recovered[n] - t.float()).norm() / t.float().norm())
        assert error <= max(1e-5, 64 * own_conditioning.get(n, 0) * torch.finfo(torch.float32).eps), (n, error)
    details = secure.details
    assert details["clipped_elements"] == {f"site-{i}": 0 for i in range(4)}  # every part fit the clip
    assert got["secure"][0].aggregations == 1  # all the parts in ONE secure sum
    bound = details["error_bound"]
    assert details["ring_bits"] == 64  # parts scaled down to fit the clip keep their precision on the finer ring
    stored = [_stored(root, i) for i in range(len(NODES))]
    tolerance = _secure_merge_tolerance(rule(name), [v for v, _ in stored], [st for _, st in stored],
                                        [WEIGHTS[n] for n in NODES], bound, secure.aggregate)
    assert set(tolerance) == set(expected)
    for n, t in expected.items():  # plus float32 rounding, which RegMean's solve amplifies by its conditioning
        atol = 64 * conditioning.get(n, 1.0) * torch.finfo(torch.float32).eps * float(t.abs().max())
        assert ((secure.aggregate[n] - t).abs() <= tolerance[n] + 1e-6 * t.abs() + atol).all(), n


# --- a hostile server against the real ClientApp handlers ---

@pytest.fixture
def fisher_sites(run7, tmp_path, tiny_base):  # noqa: F811
    """The three deployed sites of test_hostile_server, trained again in run 8 for the fisher rule (secure)."""
    shutil.copytree(run7, tmp_path / "sites")
    sites = Sites(tmp_path / "sites", tiny_base)
    sites.train(8, merge="fisher")  # within the autouse task identity
    return sites


def test_hostile_server_cannot_pick_a_rules_parts_nor_sum_them_twice(fisher_sites, tiny_base):
    from feddem.client.merge_parts import upload_layout

    sites = fisher_sites

    layout = upload_layout(sites.context(0), 8)
    assert {key.split("/")[0] for key in layout} == {NUMERATOR, DENOMINATOR}
    base_shapes = _shapes(tiny_base)
    shapes = upload_shapes(FisherMerge(), layout, base_shapes)
    # the denominator alone (the sites' Fisher, a statistic of their data), then the bare vector of a weighted sum
    den_only = [k for k in layout if k.startswith(DENOMINATOR)]
    for claim, cfg, said in ((den_only, {"merge": "fisher"}, "is not exactly the fisher upload"),
                             (sorted({k.split("/", 1)[1] for k in layout}), {"merge": "weighted-sum"},
                              "trained for the 'fisher' merge rule")):
        claim_shapes = {k: shapes.get(k, base_shapes.get(k.split("/", 1)[-1])) for k in claim}
        with pytest.raises(FeddemError, match="stage 'keys'") as refused:
            secure_sum(sites.grid(8), hostile_cfg(sites.base, **cfg), _base(sites.base), HOSTILE_WEIGHTS, claim,
                       claim_shapes)
        assert str(refused.value).count(said) == len(HOSTILE_NODES)  # every site refused, before any key left it
    # the whole declared layout: one secure sum, within the budget

    result = secure_sum(sites.grid(8), hostile_cfg(sites.base, merge="fisher"), _base(sites.base), HOSTILE_WEIGHTS,
                        layout, shapes)
    assert sorted(result.survivors) == sorted(HOSTILE_NODES) and set(result.aggregate) == set(layout)
    # a second sum of the same parts with other weights (differencing) is refused by every site
    with pytest.raises(FeddemError, match="already aggregated"):
        secure_sum(sites.grid(8), hostile_cfg(sites.base, merge="fisher"), _base(sites.base),
                   dict(HOSTILE_WEIGHTS) | {HOSTILE_NODES[0]: 0.6}, layout, shapes)
    # and a plain upload of the vector trained for fisher, asked as weighted-sum: refused
    reason = _refusal(_ask_plain(sites.grid(8), sites.base, HOSTILE_NODES[0], aggregation="plain",
                                 merge="weighted-sum"))
    assert "fisher" in reason


# --- end to end ---

@pytest.mark.slow
@pytest.mark.parametrize("merge_rule", [FisherMerge(), RegMeanMerge()], ids=lambda r: r.name)
def test_simulate_with_a_rule_and_secure_aggregation_gives_merge_plain_of_the_sites(tmp_path, tiny_base, merge_rule):
    out = tmp_path / merge_rule.name
    report, _ = simulate_cli(out, "--sites", "3", "--model", str(tiny_base), "--merge", merge_rule.name,
                             "--merge-examples", "8")
    merge = report["merge"]
    assert merge["rule"] == merge_rule.name and merge["parameters"] == merge_rule.parameters()
    details = report["secure_aggregation"]
    assert details["clipped_elements"] == {f"site-{i}": 0 for i in range(3)} and details["dropped"] == {}
    # the sites' stored vectors and statistics (in the run's own home, or in the test's)
    files = sorted(glob.glob(str(tmp_path / "**" / "site-*" / "runs" / "*" / "vector.safetensors"), recursive=True))
    assert len(files) == 3, files
    vectors = [load_vector(f) for f in files]
    stats = [load_vector(Path(f).with_name("merge-stats.safetensors")) for f in files]
    names = [Path(f).parents[2].name for f in files]
    weights = [report["weights"][name] for name in names]
    # each site's upload: its rule's parts, relative to its vector; its statistics on the 8 examples asked for
    for name, vector, site_stats in zip(names, vectors, stats):
        parts = merge_rule.site_parts(dict(vector), dict(site_stats), 1.0)
        size = sum(t.numel() for part in parts.values() for t in part.values())
        assert merge["upload_size_relative"][name] == pytest.approx(size / sum(t.numel() for t in vector.values()),
                                                                    abs=1e-4)
    assert merge["statistics_examples"] == {name: 8 for name in names}
    assert {read_header(Path(f).with_name("merge-stats.safetensors"))[2]["examples"] for f in files} == {"8"}
    expected = merge_plain(merge_rule, vectors, stats, weights)
    aggregate = load_file(out / "aggregate.safetensors")
    assert aggregate.keys() == expected.keys()
    tolerance = _secure_merge_tolerance(merge_rule, vectors, stats, weights, details["error_bound"], aggregate)
    # plus float32 rounding (which RegMean's solve amplifies by its conditioning, as in the test above)
    scale = max(float(t.abs().max()) for t in expected.values())
    atol = 1e-9 if isinstance(merge_rule, FisherMerge) else 1e-4 * scale
    for n, t in expected.items():
        assert ((aggregate[n] - t).abs() <= tolerance[n] + 1e-6 * t.abs() + atol).all(), n
    # the merge learned something (per domain quality is the benchmarks' job: bench/quality.py, bench/merge_rules.py;
    # on this 20-step tiny run regmean's merge can sit a little above the base on one domain)
    domains = ("arithmetic", "records", "prose")
    assert sum(report["eval"]["merged"][d]["loss"] for d in domains) < sum(report["eval"]["base"][d]["loss"]
                                                                            for d in domains)
    assert json.loads(json.dumps(report["merge"])) == merge


def test_a_lora_site_computes_its_statistics_on_its_dense_weights(tmp_path, tiny_base):
    from feddem.client.merge_parts import stats_path, upload_layout, upload_vector

    cfg = _cfg(tiny_base, merge="regmean", lora=True)
    [reply] = Stage(FakeGrid(tmp_path, NODES), cfg, _base_record(tiny_base)).run(
        "train", M.TRAIN, {NODES[0]: M.TrainRequest().to_record()}).values()
    site = SiteContext(0, "site-0", tmp_path / "site-0")
    vector, stats = dict(load_vector(site.vector_path(RUN_ID)).items()), dict(load_vector(stats_path(site, RUN_ID)).items())
    assert set(stats) == set(vector)  # every adapted layer's dense update has its layer's input Gram
    for name, delta in vector.items():
        assert tuple(stats[name].shape) == (delta.shape[1], delta.shape[1]), name
        assert torch.allclose(stats[name], stats[name].T, atol=1e-5) and (torch.diagonal(stats[name]) >= 0).all()
    layout = M.TrainReply.from_record(reply).layout
    assert layout == upload_layout(site, RUN_ID) == sorted(f"{part}/{n}" for n in vector for part in ("gram", "gram-delta"))
    parts = upload_vector(site, RUN_ID)
    expected = site_upload(RegMeanMerge(), vector, stats)
    assert parts.keys() == expected.keys() and all(torch.equal(parts[k], expected[k]) for k in parts)


def _site_statistics_reference(cfg, site: SiteContext, tiny_base, examples: int):
    """What the rule's statistics are on the first `examples` of the site's train blocks, recomputed here from the
    site's stored vector (base + vector: its fine-tuned model) and the train blocks of its first run's seed."""
    from feddem.client.site import _train_blocks, load_site_shard
    from feddem.common.modeling import load_model, load_tokenizer
    from feddem.common.training import TrainSettings
    from feddem.common.vectors import apply_vector

    vector = load_vector(site.vector_path(RUN_ID))
    model = load_model(str(tiny_base))
    apply_vector(model, vector)
    seed = cfg.seed + site.index  # a fresh site's first run (`client.guard.training_seed`)
    rows = _train_blocks(cfg, load_site_shard(cfg, site), load_tokenizer(str(tiny_base)),
                         TrainSettings.from_run_config(cfg, seed=seed), seed)
    return rule(cfg.merge).compute_statistics(model, rows, list(vector), examples, "cpu"), len(rows)


@pytest.mark.parametrize("name, examples", [("fisher", 3), ("regmean", 3), ("regmean", 10_000)])
def test_a_site_computes_its_statistics_on_merge_examples_of_its_train_rows(tmp_path, tiny_base, name, examples):
    from feddem.client.merge_parts import stats_path
    from feddem.common.stored_tensors import read_header

    cfg = _cfg(tiny_base, merge=name, merge_examples=examples)
    [reply] = Stage(FakeGrid(tmp_path, NODES), cfg, _base_record(tiny_base)).run(
        "train", M.TRAIN, {NODES[0]: M.TrainRequest().to_record()}).values()
    site = SiteContext(0, "site-0", tmp_path / "site-0")
    stats = dict(load_vector(stats_path(site, RUN_ID)).items())
    expected, rows = _site_statistics_reference(cfg, site, tiny_base, examples)
    used = min(examples, rows)
    assert 1 < used < examples or examples < rows  # a cap that binds, and one beyond the site's rows
    assert stats.keys() == expected.keys()
    scale = max(float(t.abs().max()) for t in expected.values())
    for n, t in expected.items():  # base + vector is the fine-tuned model to float32 rounding
        torch.testing.assert_close(stats[n], t, rtol=1e-3, atol=1e-6 * scale)
    # one example gives other statistics: the count is the one the site used
    one, _ = _site_statistics_reference(cfg, site, tiny_base, 1)
    assert any(not torch.allclose(stats[n], one[n], rtol=1e-2) for n in one)
    assert read_header(stats_path(site, RUN_ID))[2]["examples"] == str(used)
    assert M.TrainReply.from_record(reply).result["merge_stats_examples"] == used


def test_the_torch_free_rule_names_are_the_rules():
    from feddem.common.merging import RULE_NAMES
    from feddem.common.merging.rules import RULES

    assert tuple(RULES) == RULE_NAMES


def test_the_merge_setting_is_optional_for_an_older_server_and_checked_at_the_site():
    record = M.SiteSettings.from_run_config(_cfg("tiny", merge="fisher", merge_examples=5)).to_record()
    assert (M.SiteSettings.from_record(record).merge, M.SiteSettings.from_record(record).merge_examples) == (
        "fisher", 5)
    del record["merge-examples"]  # a protocol 1.1 server does not send it: the run config's default
    assert M.SiteSettings.from_record(record).merge_examples == RunConfig().merge_examples
    del record["merge"]  # a protocol 1.0 server does not send it: the site assumes the weighted sum
    assert M.SiteSettings.from_record(record).merge == "weighted-sum"
    record["merge-examples"] = 0
    with pytest.raises(FeddemError, match="merge-examples=0: expected at least 1"):
        M.SiteSettings.from_record(record)
    record["merge-examples"] = 1
    record["merge"] = "median"
    with pytest.raises(FeddemError, match="merge='median'"):
        M.SiteSettings.from_record(record)
    with pytest.raises(FeddemError, match="unknown merge rule 'median'"):
        _cfg("tiny", merge="median").validate()
