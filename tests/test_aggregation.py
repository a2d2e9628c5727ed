"""The aggregation interface (server/aggregation.py) and the run's manifest (server/manifest.py): plain, trusted and
secure aggregators give the same sum (secure: within the quantization bound it reports), and a run's manifest
names every file in its folder, which is what the recorder puts in the store."""

import shutil

import pytest

from feddem.common import messages as M
from feddem.server.admin.recorder import output_files
from feddem.server.aggregation import HeldAggregator, PlainAggregator, SecureAggregator, configure_aggregator
from feddem.server.manifest import Manifest
from feddem.server.workflow import Stage, run_dem
from tests.fakegrid import RUN_ID, FakeGrid, task_identity
from tests.test_secure_round import (  # noqa: F401 (the autouse fixture)
    NODES, WEIGHTS, _base_record, _cfg, _expected, _flat, _shapes, _task_identity,
)


@pytest.fixture(scope="module")
def trained_plain(tmp_path_factory, tiny_base):
    """Four sites fine-tuned for real (2 steps) in a run that declares plain aggregation (a vector trained under
    secure aggregation is never sent in the clear); their folders and train replies."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, 1
    root = tmp_path_factory.mktemp("trained-plain-sites")
    replies = Stage(FakeGrid(root, NODES), _cfg(tiny_base, aggregation="plain"), _base_record(tiny_base)).run(
        "train", M.TRAIN, {n: M.TrainRequest().to_record() for n in NODES})
    return root, replies


def _aggregate(root, tiny_base, replies, **cfg_kw):
    """One aggregation of WEIGHTS over a fresh copy of the trained sites, through `configure_aggregator`."""
    cfg = _cfg(tiny_base, **cfg_kw)
    grid = FakeGrid(root, NODES)
    stage = Stage(grid, cfg, _base_record(tiny_base))
    sites = {n: {"site": f"site-{i}", "domain": f"domain-{i}"} for i, n in enumerate(NODES)}
    aggregator = configure_aggregator(grid, cfg, stage, replies, sites, NODES, _shapes(tiny_base))
    return aggregator, aggregator.aggregate(WEIGHTS)


def test_plain_trusted_and_secure_aggregators_give_the_same_sum(trained_plain, tiny_base, tmp_path):
    root, replies = trained_plain
    layout = M.TrainReply.from_record(replies[NODES[0]]).layout
    got = {}
    for mode, kw in (("plain", {"aggregation": "plain"}), ("held", {"aggregation": "plain", "keep_pool": True}),
                     ("secure", {"aggregation": "secure"})):
        shutil.copytree(root, tmp_path / mode)  # each aggregation on its own copy (the guards remember uploads)
        got[mode] = _aggregate(tmp_path / mode, tiny_base, replies, **kw)
    kinds = {mode: type(aggregator) for mode, (aggregator, _) in got.items()}
    assert kinds == {"plain": PlainAggregator, "held": HeldAggregator, "secure": SecureAggregator}
    plain, held, secure = (got[m][1] for m in ("plain", "held", "secure"))
    names = {f"site-{i}": w for i, w in enumerate(WEIGHTS.values())}
    for outcome in (plain, held, secure):
        assert sorted(outcome.contributors) == NODES and outcome.weights == pytest.approx(names)
        assert set(outcome.aggregate) == set(layout)
    assert plain.details is None and held.details is None
    assert got["held"][0].vectors is not None and got["plain"][0].vectors is None
    bound = secure.details["error_bound"]
    assert secure.details["survivors"] == sorted(names) and 0 < bound < 1e-5
    exact = _expected(tmp_path / "plain", WEIGHTS, NODES)
    float32_rounding = 1e-6 * exact.abs().max().item()  # the plain sums add float32 vectors
    assert (_flat(plain.aggregate) - exact).abs().max().item() <= float32_rounding
    assert (_flat(held.aggregate) - _flat(plain.aggregate)).abs().max().item() <= float32_rounding
    diff = (_flat(secure.aggregate) - _flat(plain.aggregate)).abs().max().item()
    assert 0 < diff <= bound + float32_rounding, (diff, bound)
    assert got["secure"][0].aggregations == 1


def test_manifest_of_a_folder_names_the_outputs_it_holds_and_kinds_them(tmp_path):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "pool").mkdir()
    for name in ("model/config.json", "pool/site-0.safetensors", "aggregate.safetensors", "report.json",
                 "ablation.png"):
        (out / name).write_bytes(b"x")
    manifest = Manifest.of_folder(out)
    assert {o.path: o.kind for o in manifest.outputs} == {
        "pool/site-0.safetensors": "site-vector", "aggregate.safetensors": "aggregate", "report.json": "report",
        "ablation.png": "", "model/config.json": "model"}
    assert [o.path for o in manifest.recorded("model")] == ["model/config.json"]


@pytest.mark.slow  # an in-process trusted run with pool and ablation (about a minute on 2 busy cores)
def test_a_runs_manifest_names_every_file_in_its_folder_and_the_recorder_reads_it(tiny_base, tmp_path):
    out = tmp_path / "run"
    nodes = NODES[:2]
    grid = FakeGrid(tmp_path / "sites", nodes)
    with task_identity():
        result = run_dem(grid, _cfg(tiny_base, sites=2, aggregation="plain", keep_pool=True, ablate="1",
                                    out_dir=str(out)), RUN_ID)
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    named = sorted(o.path for o in result.manifest.outputs)
    assert named == on_disk
    assert {"report.json", "report.png", "aggregate.safetensors", "ablation.json", "ablation.png",
            "pool/site-0.safetensors", "pool/site-1.safetensors", "model/config.json", "model/README.md"} <= set(named)
    # the recorder's files are the manifest's recorded ones, and a folder read without it gives the same
    recorded = output_files(out, result.report, result.manifest)
    assert sorted(recorded) == sorted(output_files(out, result.report))
    assert "ablation.png" not in {name for name, _, _ in recorded}  # as before: the store keeps its json only
    assert {kind for _, kind, _ in recorded} == {"model", "aggregate", "report", "site-vector"}
