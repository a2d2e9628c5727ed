"""A hostile server against the real ClientApp: it drives the sites' real handlers (train, the four secure stages,
the plain upload) through the fake Grid, with real Messages through Flower's serialisation, and tries to learn one
site's vector: by downgrading to a plain upload, by differencing sums across runs (same config, another seed), after
a restart, after the guard's record was lost, past the noise budget, and after old vectors were pruned.

The sites here are deployed sites (node config `data-path`, no `partition-id`), so the guard's deployed defaults
apply: no plain upload ever, and each site's data in one secure sum."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from feddem.client import ledger
from feddem.client.guard import GuardPolicy
from feddem.common.site_context import SiteContext
from feddem.common import messages as M
from feddem.common.config import RunConfig
from feddem.common.errors import FeddemError
from feddem.common.modeling import load_model, model_checksum
from feddem.common.synthetic import make_domain
from feddem.common.vector_io import load_vector
from feddem.common.vectors import parameters_of
from feddem.client import cli as site_cli
from feddem.server.messaging import site_message
from feddem.server.secure_aggregation import secure_sum
from feddem.server.workflow import Stage
from tests.fakegrid import FakeGrid, task_identity

NODES = [9_000_000_101, 9_000_000_202, 9_000_000_303]
DOMAINS = ["arithmetic", "records", "prose"]
WEIGHTS = dict(zip(NODES, [0.2, 0.3, 0.5]))
OTHER = dict(WEIGHTS) | {NODES[0]: 0.6}  # differs in site 0 only: S - S' = (0.2 - 0.6) d_0 if d_0 is the same


@pytest.fixture(autouse=True)
def _task_identity():
    with task_identity():
        yield


def _cfg(base, **kw) -> RunConfig:
    values = dict(sites=3, model=str(base), steps=2, train_examples=24, eval_examples=8, batch_size=4, seq_len=32,
                  base_steps=30, device="cpu", timeout=2.0)
    return RunConfig(**(values | kw))


def _base(base) -> ConfigRecord:
    return ConfigRecord({"model-ref": str(base), "model-checksum": model_checksum(load_model(str(base)))})


class Sites:
    """Three deployed sites under `root` (their own data folders and work dirs), reached through a fake Grid."""

    def __init__(self, root, base, **node_config):
        self.root, self.base, self.node_config = root, base, node_config

    def context(self, i):
        return SiteContext.from_node_config(self.config(i))

    def config(self, i):
        return {"data-path": str(self.root / "data" / DOMAINS[i]), "site-name": f"site-{i}",
                "work-dir": str(self.root / f"site-{i}"), **self.node_config}

    def grid(self, run_id, **node_config):
        """A fresh grid (fresh Contexts: a restarted site) whose sites are in run `run_id`."""
        grid = FakeGrid(self.root, NODES)
        for i, node in enumerate(NODES):
            grid.contexts[node] = replace(grid.contexts[node], run_id=run_id,
                                          node_config=self.config(i) | node_config)
        return grid

    def train(self, run_id, **cfg):
        grid = self.grid(run_id)
        return Stage(grid, _cfg(self.base, **cfg), _base(self.base)).run("train", M.TRAIN,
                                                                         {n: RecordDict() for n in NODES})

    def vector(self, i, run_id):
        return load_vector(self.context(i).vector_path(run_id))

    def secure(self, run_id, weights=WEIGHTS, grid=None, **cfg):
        layout = sorted(self.vector(0, run_id))
        shapes = {n: t.shape for n, t in parameters_of(load_model(str(self.base))).items()}
        return secure_sum(grid or self.grid(run_id), _cfg(self.base, **cfg), _base(self.base), weights, layout,
                          shapes)


def _flat(vector) -> torch.Tensor:
    return torch.cat([vector[n].reshape(-1) for n in sorted(vector)]).double()


def _cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _windows(vector, weight) -> list[bytes]:
    """32-byte windows of d and w * d as float32 bytes: the vector in the clear."""
    out = []
    for t in vector.values():
        if t.numel() >= 64:
            for scaled in (t, t * weight):
                raw = scaled.float().contiguous().numpy().tobytes()
                middle = len(raw) // 2 // 4 * 4
                out.append(raw[middle:middle + 32])
    return out


def _ask_plain(grid, base, node, weight=1.0, **cfg) -> Message:
    """The plain upload message a hostile server sends (the `train.upload` handler)."""
    request = site_message(_cfg(base, **cfg), _base(base), node, M.UPLOAD, M.UploadRequest(weight).to_record())
    [reply] = grid.send_and_receive([request])
    return reply


def _refusal(reply) -> str:
    assert M.FAILURE in reply.content.config_records, "the site did not refuse"
    assert not reply.content.array_records, "a refusal carries no arrays"
    return str(reply.content.config_records[M.FAILURE]["reason"])


@pytest.fixture(scope="module")
def run7(tmp_path_factory, tiny_base):
    """Three deployed sites with their own data, trained in run 7 (a secure run: the default)."""
    root = tmp_path_factory.mktemp("hostile")
    for domain in DOMAINS:
        train, test = make_domain(domain, 24, 8, seed=0)
        folder = root / "data" / domain
        folder.mkdir(parents=True)
        for name, texts in (("train", train), ("test", test)):
            (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    with task_identity():
        Sites(root, tiny_base).train(7)
    return root


@pytest.fixture
def sites(run7, tmp_path, tiny_base):
    shutil.copytree(run7, tmp_path / "sites")
    return Sites(tmp_path / "sites", tiny_base)


# --- (a) the downgrade to a plain upload ---

def test_downgrade_to_plain_upload_after_a_secure_sum_is_refused(sites, tiny_base):
    sites.secure(7)
    grid = sites.grid(7)
    d0 = sites.vector(0, 7)
    for cfg in ({}, {"aggregation": "plain"}):  # the run's declared mode, or a forged plain one
        reason = _refusal(_ask_plain(grid, tiny_base, NODES[0], 1.0, **cfg))
        assert "privacy guard of site-0 refuses" in reason
    leaked = b"".join(grid.seen)
    assert not [w for w in _windows(d0, 1.0) if w in leaked]
    # even a site that allows plain uploads does not send a vector that was in a secure sum
    permissive = sites.grid(7, **{"allow-plain-upload": "true"})
    reason = _refusal(_ask_plain(permissive, tiny_base, NODES[0], 1.0, aggregation="plain"))
    assert "trained under secure aggregation" in reason and "never sent in the clear" in reason
    # nor a new vector of the same data from a plain run: it would approximate the one in the secure sum
    permissive8 = sites.grid(8, **{"allow-plain-upload": "true"})
    Stage(permissive8, _cfg(tiny_base, aggregation="plain"), _base(tiny_base)).run("train", M.TRAIN,
                                                                                   {NODES[0]: RecordDict()})
    assert "its data is already in a secure sum" in _refusal(
        _ask_plain(permissive8, tiny_base, NODES[0], 1.0, aggregation="plain"))


def test_plain_upload_in_a_run_declared_secure_is_refused_before_any_sum(sites, tiny_base):
    """No secure sum yet: the vector is committed to the secure mode the run declared when it was trained."""
    permissive = sites.grid(7, **{"allow-plain-upload": "true"})
    for node in NODES:
        assert "trained under secure aggregation" in _refusal(
            _ask_plain(permissive, tiny_base, node, 0.5, aggregation="plain"))
    assert "the run declares secure aggregation" in _refusal(_ask_plain(permissive, tiny_base, NODES[0], 0.5))
    # and the refusals spent nothing: the secure sum still goes through
    assert sites.secure(7).survivors == NODES


def test_deployed_site_never_sends_in_the_clear_by_default(tmp_path, tiny_base, sites):
    deployed = {"data-path": str(tmp_path), "work-dir": str(tmp_path / "w")}
    plain = _cfg(tiny_base, aggregation="plain")
    assert not GuardPolicy.for_site(plain, deployed).allow_plain
    assert GuardPolicy.for_site(plain, deployed | {"allow-plain-upload": "true"}).allow_plain
    assert GuardPolicy.for_site(plain, {"partition-id": 0}).allow_plain  # a simulated site: what the run declares
    assert not GuardPolicy.for_site(_cfg(tiny_base), {"partition-id": 0}).allow_plain
    assert not GuardPolicy.for_site(plain, {"partition-id": 0, "allow-plain-upload": False}).allow_plain
    # a run that declares plain aggregation is refused at training, before any work
    grid = sites.grid(8)
    replies = Stage(grid, plain, _base(tiny_base)).stream("train", M.TRAIN, {n: RecordDict() for n in NODES})
    with pytest.raises(FeddemError, match="no site succeeded") as err:
        list(replies)
    assert str(err.value).count("does not allow it (allow-plain-upload)") == len(NODES)
    assert not sites.context(0).vector_path(8).exists()


def test_plain_run_at_a_site_that_allows_it_uploads_each_vector_once_within_the_guard(sites, tiny_base):
    allowing = {"allow-plain-upload": "true"}
    grid = sites.grid(8, **allowing)
    # seed 1: run 7's vector (same data, seed 0, trained in a secure run) would be committed to secure aggregation
    Stage(grid, _cfg(tiny_base, aggregation="plain", seed=1), _base(tiny_base)).run("train", M.TRAIN,
                                                                                    {NODES[0]: RecordDict()})
    assert "outside the allowed range" in _refusal(_ask_plain(grid, tiny_base, NODES[0], 1.5, aggregation="plain"))
    reply = _ask_plain(grid, tiny_base, NODES[0], 0.5, aggregation="plain")
    assert M.VECTOR in reply.content.array_records  # allowed: this vector was trained in a declared plain run
    again = _refusal(_ask_plain(grid, tiny_base, NODES[0], 0.25, aggregation="plain"))
    assert "already aggregated once" in again and "sent in the clear" in again


# --- (b) and (c): two runs' sums ---

def _differenced(sites, run_a, run_b) -> str:
    """What a server would recover from the two runs' sums (S_a - S_b) / (w_a - w_b) if both went through, as
    its cosine with site 0's vector of run a, beside the cosine of the first sum alone with it."""
    s_a = sum(WEIGHTS[n] * _flat(sites.vector(i, run_a)) for i, n in enumerate(NODES))
    s_b = sum(OTHER[n] * _flat(sites.vector(i, run_b)) for i, n in enumerate(NODES))
    d0 = _flat(sites.vector(0, run_a))
    recovered = (s_a - s_b) / (WEIGHTS[NODES[0]] - OTHER[NODES[0]])
    return (f"differencing the two sums would give d_0 with cos {_cos(recovered, d0):.4f} (the first sum alone: "
            f"cos {_cos(s_a, d0):.4f})")


def test_rerun_with_the_same_config_trains_a_new_vector_and_its_sum_is_refused(sites, tiny_base):
    sites.secure(7)
    sites.train(8)  # the same config: the spent (data, seed) pairs make each site draw fresh randomness
    d7, d8 = _flat(sites.vector(0, 7)), _flat(sites.vector(0, 8))
    assert not torch.equal(d7, d8)
    print(f"same config, fresh randomness: cos(d_0 run 7, d_0 run 8) = {_cos(d7, d8):.4f}; "
          f"{_differenced(sites, 7, 8)}")
    assert _cos(d7, d8) > 0.5  # close, not equal: what the data budget is for
    with pytest.raises(FeddemError, match=r"stage 'keys'") as err:
        sites.secure(8, OTHER)
    assert str(err.value).count("data-budget is 1") == len(NODES)
    entries = ledger.entries(sites.context(0))
    assert [e["fresh-seed"] for e in entries if e["event"] == "trained"] == [False, True]


def test_identical_vector_in_a_new_run_is_refused_whatever_the_data_budget(sites, tiny_base):
    """A deterministic retrain (here the run-7 file itself, as run 8's) is the same content: refused even by a
    site that lifted its data budget."""
    sites.secure(7)
    for i in range(3):
        target = sites.context(i).vector_path(8)
        target.parent.mkdir(parents=True)
        shutil.copy(sites.context(i).vector_path(7), target)
    with pytest.raises(FeddemError, match=r"stage 'keys'") as err:
        sites.secure(8, OTHER, grid=sites.grid(8, **{"data-budget": 0}))
    assert str(err.value).count("already aggregated once (last: run 7") == len(NODES)


def test_same_data_with_another_seed_gives_a_close_vector_whose_sum_is_refused(sites, tiny_base):
    sites.secure(7)
    sites.train(8, seed=1)
    d7, d8 = _flat(sites.vector(0, 7)), _flat(sites.vector(0, 8))
    assert not torch.equal(d7, d8)
    print(f"same data, seed 1: cos(d_0 run 7, d_0 run 8) = {_cos(d7, d8):.4f}; {_differenced(sites, 7, 8)}")
    assert _cos(d7, d8) > 0.5
    with pytest.raises(FeddemError, match=r"stage 'keys'") as err:
        sites.secure(8, OTHER)
    assert str(err.value).count("its data is already in 1 secure sum(s) across runs") == len(NODES)
    # a site that knowingly allows two sums of its data takes part
    assert sites.secure(8, OTHER, grid=sites.grid(8, **{"data-budget": 2})).survivors == NODES


# --- (d) a restart, (e) a lost record ---

def test_restarted_site_still_refuses(sites, tiny_base):
    sites.secure(7)
    with pytest.raises(FeddemError, match="already aggregated once"):
        sites.secure(7, OTHER, grid=sites.grid(7))  # fresh Contexts, fresh SiteContexts, empty state


@pytest.mark.parametrize("damage, message", [
    ("delete-record", "guard-record.json is missing but"),
    ("delete-identity", "site.json is missing but"),
    ("delete-both", "already aggregated once"),  # the vector trained here is adopted as spent
    ("truncate", "truncated or rolled back"),
    ("garble", "is unreadable"),
])
def test_lost_or_damaged_record_fails_closed(sites, tiny_base, damage, message):
    sites.secure(7)
    work = sites.context(0).work_dir
    record, identity = work / ledger.RECORD_NAME, work / ledger.IDENTITY_NAME
    if damage in ("delete-record", "delete-both"):
        record.unlink()
    if damage in ("delete-identity", "delete-both"):
        identity.unlink()
    if damage == "truncate":
        entries = json.loads(record.read_text())["entries"]
        record.write_text(json.dumps({"entries": entries[:-1]}))
    if damage == "garble":
        record.write_text("{not json")
    grid = sites.grid(7, **{"data-budget": 0})
    with pytest.raises(FeddemError, match="stage 'keys'") as err:
        sites.secure(7, OTHER, grid=grid)
    assert "privacy guard of site-0 refuses" in str(err.value) and message in str(err.value)


# --- (f) the noise budget across runs ---

def test_noise_budget_counts_across_runs(sites, tiny_base):
    noisy = dict(noise=0.01, aggregation_budget=2)
    grid = sites.grid(7, **{"data-budget": 3})
    sites.secure(7, grid=grid, **noisy)
    sites.secure(7, OTHER, grid=grid, **noisy)
    for i in range(3):  # run 8 holds run 7's vectors again (a deterministic retrain)
        target = sites.context(i).vector_path(8)
        target.parent.mkdir(parents=True)
        shutil.copy(sites.context(i).vector_path(7), target)
    with pytest.raises(FeddemError, match="stage 'keys'") as err:
        sites.secure(8, grid=sites.grid(8, **{"data-budget": 0}), **noisy)
    assert str(err.value).count("already aggregated 2 times") == len(NODES) and "budget 2" in str(err.value)
    sites.train(9)  # new vectors on the same data: the data budget (3) leaves one more sum
    grid9 = sites.grid(9, **{"data-budget": 3})
    assert sites.secure(9, grid=grid9, **noisy).survivors == NODES
    with pytest.raises(FeddemError, match="stage 'keys'") as err:
        sites.secure(9, OTHER, grid=grid9, **noisy)
    assert str(err.value).count("data-budget is 3") == len(NODES)


# --- (g) retention ---

def test_prune_keeps_the_records_and_a_pruned_vector_is_never_aggregated_again(sites, tiny_base, capsys):
    sites.secure(7)
    kept_bytes = sites.context(0).vector_path(7).read_bytes()
    sites.train(8)
    before = {i: len(ledger.entries(sites.context(i))) for i in range(3)}
    assert site_cli.main(["prune", "--keep", "1",
                     *[arg for i in range(3) for arg in ("--work-dir", str(sites.root / f"site-{i}"))]]) == 0
    out = capsys.readouterr().out
    assert out.count("deleted 1 vector(s)") == 3, out
    for i in range(3):
        site = sites.context(i)
        assert not site.vector_path(7).exists() and site.vector_path(8).is_file()
        entries = ledger.entries(site)
        assert len(entries) == before[i] + 1 and entries[-1]["event"] == "pruned"
        assert any(e["event"] == "aggregated" and e["run"] == 7 for e in entries)
    # the pruned vector comes back bit for bit (a deterministic retrain): still spent
    target = sites.context(0).vector_path(10)
    target.parent.mkdir(parents=True)
    target.write_bytes(kept_bytes)
    grid = sites.grid(10, **{"data-budget": 0})
    [reply] = grid.send_and_receive([_keys(sites, tiny_base, target)])
    assert "already aggregated once (last: run 7" in _refusal(reply)


def _keys(sites, base, vector_path):
    from feddem.common.secagg import SecAggParams
    from feddem.common.secagg.params import round_binding

    params = SecAggParams.create([0, 1, 2], 10, 1.0)
    weights = [WEIGHTS[n] for n in NODES]
    params = replace(params, session=round_binding(params, weights))
    content = M.KeysRequest(params, 0, weights[0], weights, sorted(load_vector(vector_path))).to_record()
    return site_message(_cfg(base), _base(base), NODES[0], M.SA_KEYS, content)


def test_keep_runs_prunes_after_training(sites, tiny_base):
    grid = sites.grid(8, **{"keep-runs": 1})
    Stage(grid, _cfg(tiny_base), _base(tiny_base)).run("train", M.TRAIN, {n: RecordDict() for n in NODES})
    for i in range(3):
        assert not sites.context(i).vector_path(7).exists() and sites.context(i).vector_path(8).is_file()
        assert ledger.entries(sites.context(i))[-1]["event"] == "pruned"
