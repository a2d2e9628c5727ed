"""Secure aggregation over Flower messages, in-process: the real ClientApp handlers and the real server module talk
through a small fake Grid that carries each real Message through Flower's protobuf serialisation both ways.
Nothing of the cryptography is stubbed; the vectors come from real (short) fine-tuning of the tiny base."""

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Message, RecordDict
from flwr.common.serde import message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from feddem.client.guard import RECORD_NAME, GuardPolicy
from feddem.common.site_context import SiteContext
from feddem.client.upload import upload_weighted_vector
from feddem.common import messages as M
from feddem.common.config import RunConfig
from feddem.common.errors import FeddemError
from feddem.common.modeling import load_model, model_checksum
from feddem.common.secagg import SecAggClient, SecAggParams, SecAggServer
from feddem.common.secagg.params import round_binding
from feddem.common.vector_io import load_vector
from feddem.common.vectors import parameters_of
from feddem.server.messaging import site_message
from feddem.server.secure_aggregation import secure_sum
from feddem.server.workflow import Stage, run_dem
from tests.fakegrid import RUN_ID, FakeGrid, task_identity
from tests.test_secagg_protocol import add_whole, unmasked

NODES = [9_000_000_011, 9_000_000_022, 9_000_000_033, 9_000_000_044]  # Flower-like ids, mapped to 0..3


@pytest.fixture(autouse=True)
def _task_identity():
    with task_identity():
        yield


def _cfg(base, **kw) -> RunConfig:
    values = dict(sites=4, model=str(base), steps=2, train_examples=24, eval_examples=8, batch_size=4, seq_len=32,
                  base_steps=30, device="cpu", timeout=2.0)
    return RunConfig(**(values | kw))


def _base_record(base) -> ConfigRecord:
    return ConfigRecord({"model-ref": str(base), "model-checksum": model_checksum(load_model(str(base)))})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base):
    """Four sites fine-tuned for real (2 steps) through the train handler; their folders and train replies."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, 1
    root = tmp_path_factory.mktemp("trained-sites")
    cfg = _cfg(tiny_base)
    replies = Stage(FakeGrid(root, NODES), cfg, _base_record(tiny_base)).run("train", M.TRAIN,
                                                                             {n: RecordDict() for n in NODES})
    return root, {n: list(c.config_records[M.LAYOUT]["names"]) for n, c in replies.items()}


@pytest.fixture
def sites(trained, tmp_path):
    """A fresh copy of the trained sites (the guard marks vectors as spent on their disks)."""
    root, layouts = trained
    shutil.copytree(root, tmp_path / "sites")
    return tmp_path / "sites", layouts[NODES[0]]


def _vector(root, index):
    return load_vector(SiteContext(index, f"site-{index}", root / f"site-{index}").vector_path(RUN_ID))


def _expected(root, weights, nodes, clip=np.inf):
    """sum of the clipped float32 w_i * d_i in float64: what the secure sum must equal within its bound."""
    total = None
    for node in nodes:
        vector = _vector(root, NODES.index(node))
        flat = torch.cat([(vector[n] * weights[node]).reshape(-1) for n in sorted(vector)]).double().clamp(-clip, clip)
        total = flat if total is None else total + flat
    return total


def _flat(vector):
    return torch.cat([vector[n].reshape(-1) for n in sorted(vector)]).double()


def _shapes(base):
    return {name: t.shape for name, t in parameters_of(load_model(str(base))).items()}


WEIGHTS = dict(zip(NODES, [0.1, 0.2, 0.3, 0.4]))


def _secure(grid, base, layout, weights=WEIGHTS, **cfg):
    return secure_sum(grid, _cfg(base, **cfg), _base_record(base), weights, layout, _shapes(base))


def test_secure_sum_equals_plain_sum(sites, tiny_base):
    root, layout = sites
    grid = FakeGrid(root, NODES)
    result = _secure(grid, tiny_base, layout)
    assert result.survivors == NODES and result.dropped == {} and result.threshold == 3
    assert set(result.aggregate) == set(layout)
    diff = (_flat(result.aggregate) - _expected(root, WEIGHTS, NODES)).abs().max().item()
    assert diff <= result.error_bound < 1e-5, (diff, result.error_bound)
    assert result.clipped == dict.fromkeys(NODES, 0)
    # the site's round state lived in context.state between the four stages
    assert M.SA_UNMASK in grid.sent and "secagg" in grid.contexts[NODES[0]].state.config_records


def test_masked_upload_is_ring_uint32_no_larger_than_float32(sites, tiny_base):
    root, layout = sites
    grid = FakeGrid(root, NODES)
    uploads = []
    grid.faults = {(n, M.SA_MASKED): (lambda reply: uploads.append(
        {k: a.numpy() for k, a in reply.content.array_records[M.MASKED].items()})) for n in NODES}
    _secure(grid, tiny_base, layout)
    length = _flat(_vector(root, 0)).numel()
    for chunks in uploads:
        assert all(a.dtype == np.uint32 for a in chunks.values())
        assert sum(a.nbytes for a in chunks.values()) == 4 * (length + 16) <= 1.05 * 4 * length


@pytest.mark.parametrize("dtype, bits", [("bfloat16", 16), ("float16", 32)])
def test_16_bit_vector_dtype_takes_a_16_bit_ring_where_its_precision_holds(sites, tiny_base, dtype, bits):
    """bfloat16 runs: a 16-bit ring for 4 sites (half the float32 upload), with the sum within clip * 2^-8; float16
    asks for clip * 2^-11, which a 16-bit ring cannot give 4 sites: 32 bits."""
    root, layout = sites
    grid = FakeGrid(root, NODES)
    uploads = []
    grid.faults = {(n, M.SA_MASKED): (lambda reply: uploads.append(
        [a.numpy() for a in reply.content.array_records[M.MASKED].values()])) for n in NODES}
    clip = 0.02
    result = _secure(grid, tiny_base, layout, vector_dtype=dtype, clip=clip)
    assert result.bits == bits and len(uploads) == len(NODES)
    length = _flat(_vector(root, 0)).numel()
    for chunks in uploads:
        assert all(a.dtype == np.dtype(f"uint{bits}") for a in chunks)
        assert sum(a.nbytes for a in chunks) == bits // 8 * (length + 16)
    diff = (_flat(result.aggregate) - _expected(root, WEIGHTS, NODES, clip)).abs().max().item()
    assert diff <= result.error_bound <= len(NODES) * clip * 2.0**-8


def _record_uploads(grid, uploads):
    """Keep (node, {ring offset: masked chunk}) of every masked-upload reply."""
    def keep(node):
        return lambda reply: uploads.append((node, {int(k): a.numpy() for k, a in
                                                    reply.content.array_records[M.MASKED].items()}))
    grid.faults = {(n, M.SA_MASKED): [keep(n)] * 8 for n in NODES}


def test_upload_in_parts_gives_the_same_sum_with_each_reply_a_part_of_the_vector(sites, tiny_base):
    """upload-parts K: K masked-upload messages per site, each covering its own span of the ring once (the check
    block with the last), none larger than ~1/K of the vector; the sum is the one-message sum."""
    root, layout = sites
    grid = FakeGrid(root, NODES)
    uploads = []
    _record_uploads(grid, uploads)
    length = _flat(_vector(root, 0)).numel()
    parts = 3
    result = _secure(grid, tiny_base, layout, upload_parts=parts)
    assert grid.sent.count(M.SA_MASKED) == parts * len(NODES)
    assert result.survivors == NODES
    diff = (_flat(result.aggregate) - _expected(root, WEIGHTS, NODES)).abs().max().item()
    assert diff <= result.error_bound < 1e-5
    for node in NODES:
        mine = [chunks for n, chunks in uploads if n == node]
        assert len(mine) == parts
        covered = sorted((o, o + len(a)) for chunks in mine for o, a in chunks.items())
        assert covered[0][0] == 0 and covered[-1][1] == length + 16
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # no gap, no element twice
        biggest = max(sum(a.size for a in chunks.values()) for chunks in mine)
        assert biggest <= length // parts + 1 + 16


def test_upload_spans_are_consecutive_and_never_empty():
    from feddem.server.secure_aggregation import upload_spans

    assert upload_spans(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert upload_spans(10, 1) == [(0, 10)]
    assert upload_spans(3, 8) == [(0, 1), (1, 2), (2, 3)]


def test_dropout_before_the_first_part_is_tolerated_after_it_fails_the_round(sites, tiny_base, trained):
    """A site lost at its first part is an ordinary dropout; one lost after a part of its masked vector went into
    the sum fails the round, naming the site and why, with nothing merged."""
    root, layout = sites
    grid = FakeGrid(root, NODES, {(NODES[1], M.SA_MASKED): ["error"]})
    result = _secure(grid, tiny_base, layout, upload_parts=3)
    in_sum = [n for n in NODES if n != NODES[1]]
    assert result.survivors == in_sum and "masked, part 1 of 3" in result.dropped[NODES[1]]
    assert (_flat(result.aggregate) - _expected(root, WEIGHTS, in_sum)).abs().max() <= result.error_bound

    root2 = root.parent / "again"
    shutil.copytree(trained[0], root2)  # a fresh round on the same vectors: sites whose records never saw the first
    grid = FakeGrid(root2, NODES, {(NODES[2], M.SA_MASKED): [None, "silent"]})
    with pytest.raises(FeddemError, match=rf"stage 'masked, part 2 of 3'.*node-{NODES[2]} dropped after uploading "
                                          rf"part of its masked vector.*Nothing was merged"):
        _secure(grid, tiny_base, layout, upload_parts=3, timeout=0.5)


def test_a_later_part_never_masks_an_element_twice_nor_takes_shares_again(sites, tiny_base):
    """The site's side of parts: a span it already uploaded is refused (a one-time mask used twice would reveal
    the difference of two inputs), and so are shares sent again after the first part."""
    from feddem.client.secure_upload import sa_masked

    root, layout = sites
    grid = FakeGrid(root, NODES)
    _secure(grid, tiny_base, layout, upload_parts=2)
    # replay the second part's request at node 0 with the state it had after the first part
    site = SiteContext(0, "site-0", root / "site-0")
    state = grid.contexts[NODES[0]].state
    cfg = _cfg(tiny_base)
    rec = state.config_records["secagg"]
    client = SecAggClient.from_state(bytes(rec["client"]))
    length = client.params.vector_length
    client._stage = "masking"
    rec["client"] = client.to_state()
    request = RecordDict({M.SA: ConfigRecord({"session": client.params.session, "span": [length // 2, length]})})
    with pytest.raises(Exception, match="already masked"):
        sa_masked(site, cfg, {}, RUN_ID, request, state)
    request = RecordDict({M.SA: ConfigRecord({"session": client.params.session, "span": [0, length + 1]})})
    with pytest.raises(FeddemError, match="malformed upload span"):
        sa_masked(site, cfg, {}, RUN_ID, request, state)
    request = RecordDict({M.SA: ConfigRecord({"session": client.params.session, "span": [0, 4], "from": [1],
                                              "ct": [b"x"]})})
    with pytest.raises(FeddemError, match="shares sent again"):
        sa_masked(site, cfg, {}, RUN_ID, request, state)


@pytest.mark.parametrize("stage", [M.SA_KEYS, M.SA_SHARE, M.SA_MASKED, M.SA_UNMASK])
def test_dropout_above_threshold_gives_the_exact_sum_of_the_survivors(sites, tiny_base, stage):
    root, layout = sites
    lost = NODES[1]
    result = _secure(FakeGrid(root, NODES, {(lost, stage): "error"}), tiny_base, layout)
    in_sum = NODES if stage == M.SA_UNMASK else [n for n in NODES if n != lost]  # its masked input arrived
    assert result.survivors == in_sum
    assert (lost in result.dropped) == (stage != M.SA_UNMASK)
    diff = (_flat(result.aggregate) - _expected(root, WEIGHTS, in_sum)).abs().max().item()
    assert diff <= result.error_bound


def test_silent_site_times_out_and_is_dropped(sites, tiny_base):
    root, layout = sites
    result = _secure(FakeGrid(root, NODES, {(NODES[2], M.SA_MASKED): "silent"}), tiny_base, layout, timeout=0.5)
    assert NODES[2] not in result.survivors and "no reply within" in result.dropped[NODES[2]]
    survivors = [n for n in NODES if n != NODES[2]]
    assert (_flat(result.aggregate) - _expected(root, WEIGHTS, survivors)).abs().max() <= result.error_bound


@pytest.mark.parametrize("stage, name", [(M.SA_SHARE, "share"), (M.SA_MASKED, "masked")])
def test_dropout_below_threshold_fails_loudly(sites, tiny_base, stage, name):
    root, layout = sites
    faults = {(NODES[0], stage): "error", (NODES[3], stage): "error"}
    with pytest.raises(FeddemError, match=rf"stage '{name}'.*2 of 4 sites left, threshold 3.*Nothing was merged"):
        _secure(FakeGrid(root, NODES, faults), tiny_base, layout)


def _flip(where):
    """A fault that changes one element of a masked upload on its way: in a data chunk or in the check block."""
    def tamper(reply):
        record = reply.content.array_records[M.MASKED]
        name = sorted(record)[0 if where == "data" else -1]
        data = record[name].numpy().copy()
        data[len(data) // 2] += np.uint32(1 << 20)
        record[name] = Array(data)
    return tamper


@pytest.mark.parametrize("where", ["data", "check block"])
def test_tampered_masked_vector_is_detected_and_left_out_of_the_sum(sites, tiny_base, where):
    """The changed upload fails its tag before any of it is added: the site is dropped with the reason and the
    sum is exact for the others (never a silently wrong model)."""
    root, layout = sites
    result = _secure(FakeGrid(root, NODES, {(NODES[2], M.SA_MASKED): _flip(where)}), tiny_base, layout)
    assert NODES[2] not in result.survivors and "fails its upload tag" in result.dropped[NODES[2]]
    survivors = [n for n in NODES if n != NODES[2]]
    assert (_flat(result.aggregate) - _expected(root, WEIGHTS, survivors)).abs().max() <= result.error_bound


def test_tampered_masked_vectors_below_the_threshold_fail_the_round(sites, tiny_base):
    root, layout = sites
    faults = {(NODES[0], M.SA_MASKED): _flip("data"), (NODES[3], M.SA_MASKED): _flip("check block")}
    with pytest.raises(FeddemError, match=r"2 of 4 sites left.*fails its upload tag.*Nothing was merged"):
        _secure(FakeGrid(root, NODES, faults), tiny_base, layout)


def test_clipping_at_the_site_is_counted_and_the_sum_is_of_clipped_inputs(sites, tiny_base):
    root, layout = sites
    clip = 0.5 * min((_flat(_vector(root, i)) * WEIGHTS[n]).abs().max().item() for i, n in enumerate(NODES))
    result = _secure(FakeGrid(root, NODES), tiny_base, layout, clip=clip)
    assert all(count > 0 for count in result.clipped.values()), result.clipped
    diff = (_flat(result.aggregate) - _expected(root, WEIGHTS, NODES, clip)).abs().max().item()
    assert diff <= result.error_bound


# --- the privacy guard: the server is the adversary, so these messages are crafted as a server could ---

def _keys_message(base, params, client_id, weight, layout, weights=None, bind=True, **cfg):
    """A crafted first-stage message; `weights` (everyone's, default: `weight` for all) are bound into the
    session as an honest server does, unless `bind` is False."""
    weights = [weight] * len(params.client_ids) if weights is None else weights
    if bind:
        params = replace(params, session=round_binding(params, weights))
    content = M.KeysRequest(params, client_id, weight, weights, layout).to_record()
    return site_message(_cfg(base, **cfg), _base_record(base), NODES[0], M.SA_KEYS, content)


def _ask(grid, msg):
    [reply] = grid.send_and_receive([msg])
    return reply


def _refusal(reply) -> str:
    assert M.FAILURE in reply.content.config_records, "the site did not refuse"
    return str(reply.content.config_records[M.FAILURE]["reason"])


def test_guard_refuses_too_few_peers(sites, tiny_base, caplog):
    root, layout = sites
    params = SecAggParams.create([0, 1], 10, 1.0)  # the server claims a 2-site aggregation
    reply = _ask(FakeGrid(root, NODES), _keys_message(tiny_base, params, 0, 0.5, layout, min_peers=2))
    assert "privacy guard of site-0 refuses" in _refusal(reply) and "min-peers is 2" in _refusal(reply)
    assert "privacy guard of site-0 refuses" in caplog.text  # logged at the site


def test_guard_takes_the_stricter_of_node_and_run_config(sites, tiny_base):
    root, layout = sites
    params = SecAggParams.create([0, 1, 2, 3], 10, 1.0)
    grid = FakeGrid(root, NODES, node_config={"min-peers": 5})  # the site's own policy
    assert "min-peers is 5" in _refusal(_ask(grid, _keys_message(tiny_base, params, 0, 0.25, layout)))


@pytest.mark.parametrize("weight", [1.5, -0.1, float("nan")])
def test_guard_refuses_a_weight_outside_the_range(sites, tiny_base, weight):
    root, layout = sites
    params = SecAggParams.create([0, 1, 2, 3], 10, 1.0)
    reason = _refusal(_ask(FakeGrid(root, NODES), _keys_message(tiny_base, params, 0, weight, layout)))
    assert "outside the allowed range [0.0, 1.0]" in reason


def test_guard_refuses_a_second_aggregation_even_after_a_restart(sites, tiny_base):
    root, layout = sites
    _secure(FakeGrid(root, NODES), tiny_base, layout)
    record = root / "site-0" / RECORD_NAME
    assert record.is_file()  # persisted in the site-wide record
    params = SecAggParams.create([0, 1, 2, 3], 10, 1.0)
    fresh = FakeGrid(root, NODES)  # a restarted site: empty context.state
    assert "already aggregated once" in _refusal(_ask(fresh, _keys_message(tiny_base, params, 0, 0.25, layout)))


def test_guard_refuses_a_sum_where_the_other_weights_are_zero(sites, tiny_base):
    """Zero weights for everyone else would make the 'sum' this site's vector alone: refused."""
    root, layout = sites
    params = SecAggParams.create([0, 1, 2, 3], 10, 1.0)
    grid = FakeGrid(root, NODES)
    reason = _refusal(_ask(grid, _keys_message(tiny_base, params, 0, 1.0, layout, weights=[1.0, 0.0, 0.0, 0.5])))
    assert "only 1 other site(s) have a nonzero weight" in reason and "min-peers is 2" in reason
    with pytest.raises(FeddemError, match="nonzero weight"):  # the same through the server's round
        _secure(FakeGrid(root, NODES), tiny_base, layout, weights=dict(zip(NODES, [0.5, 0.0, 0.0, 0.0])))


def test_site_refuses_a_round_whose_session_does_not_bind_the_weights(sites, tiny_base):
    root, layout = sites
    params = SecAggParams.create([0, 1, 2, 3], 10, 1.0)
    unbound = _keys_message(tiny_base, params, 0, 0.25, layout, bind=False)
    assert "does not bind its parameters and weights" in _refusal(_ask(FakeGrid(root, NODES), unbound))
    lying = _keys_message(tiny_base, params, 0, 0.25, layout, weights=[0.9, 0.25, 0.25, 0.25])
    assert "does not bind" in _refusal(_ask(FakeGrid(root, NODES), lying))  # its own entry differs


def test_a_server_telling_sites_different_weights_makes_the_round_fail(sites, tiny_base):
    """Site 0 is shown a consistent round throughout, but not the one the others see (other weights, re-bound
    session): the pairwise shares then fail authentication, and nothing is summed."""
    root, layout = sites
    grid = FakeGrid(root, NODES)
    told = [0.7, 0.1, 0.1, 0.1]
    sessions = {}

    def deliver(msg, original=grid._deliver):
        if msg.metadata.dst_node_id == NODES[0]:
            rec = msg.content.config_records
            if msg.metadata.message_type == M.SA_KEYS:
                params = SecAggParams.from_dict(dict(rec[M.SA_PARAMS]))
                lie = replace(params, session=round_binding(params, told))
                sessions[params.session] = lie.session
                rec[M.SA_PARAMS] = ConfigRecord(lie.to_dict())
                rec[M.SA_ROUND]["weights"], rec[M.SA_ROUND]["weight"] = told, told[0]
            elif M.SA in rec:
                rec[M.SA]["session"] = sessions[bytes(rec[M.SA]["session"])]
        return original(msg)

    grid._deliver = deliver
    with pytest.raises(FeddemError, match="secure aggregation failed") as err:
        _secure(grid, tiny_base, layout, weights=dict(zip(NODES, [0.25] * 4)))
    assert "failed authentication" in str(err.value)
    assert M.EVALUATE not in grid.sent


def test_differencing_attempt_is_refused(sites, tiny_base):
    """Two sums whose weights differ in one site would reveal that site's vector: the second is refused."""
    root, layout = sites
    grid = FakeGrid(root, NODES)
    _secure(grid, tiny_base, layout)
    second = dict(WEIGHTS) | {NODES[0]: 0.9}
    with pytest.raises(FeddemError, match=r"stage 'keys'") as err:
        _secure(grid, tiny_base, layout, weights=second)
    assert str(err.value).count("already aggregated once") == len(NODES)


def test_declared_noise_and_budget_allow_that_many_noisy_aggregations(sites, tiny_base):
    """With distributed noise and a budget of 2, a second sum of the same vectors is allowed, a third is refused,
    and each sum carries Gaussian noise of the declared standard deviation (split among the sites)."""
    root, layout = sites
    grid = FakeGrid(root, NODES)
    noisy = dict(noise=0.01, aggregation_budget=2)
    first = _secure(grid, tiny_base, layout, **noisy)
    second = _secure(grid, tiny_base, layout, weights=dict(WEIGHTS) | {NODES[0]: 0.2}, **noisy)
    exact = _expected(root, WEIGHTS, NODES)
    residual = _flat(first.aggregate) - exact
    assert residual.std().item() == pytest.approx(0.01, rel=0.05)  # ~1M samples: the std is tight
    assert abs(residual.mean().item()) < 1e-4
    # the two sums differ by 0.1 * d_0 plus the noise of both: the noise hides d_0 (its scale is ~1e-3)
    d0 = _flat(_vector(root, 0))
    leak = (_flat(second.aggregate) - _flat(first.aggregate)) / 0.1 - d0
    assert leak.std().item() > 10 * d0.std().item()
    with pytest.raises(FeddemError, match=r"stage 'keys'") as err:
        _secure(grid, tiny_base, layout, **noisy)
    assert str(err.value).count("already aggregated 2 times") == len(NODES)
    assert "budget 2" in str(err.value)


def test_site_can_lower_the_budget_in_its_node_config(sites, tiny_base):
    root, layout = sites
    grid = FakeGrid(root, NODES, node_config={"aggregation-budget": 1})
    _secure(grid, tiny_base, layout, noise=0.01, aggregation_budget=3)
    with pytest.raises(FeddemError, match=r"stage 'keys'") as err:
        _secure(grid, tiny_base, layout, noise=0.01, aggregation_budget=3)
    assert str(err.value).count("already aggregated once") == len(NODES) and "budget 1" in str(err.value)


def test_budget_without_noise_is_refused_by_the_site(sites, tiny_base):
    """A server that skips its own config check and asks for a noiseless budget: the site rejects the config, and
    its guard's budget stays 1 without noise whatever the config says."""
    root, layout = sites
    cfg = _cfg(tiny_base)
    object.__setattr__(cfg, "aggregation_budget", 5)  # a crafted config that validate() rejects
    with pytest.raises(FeddemError, match="needs distributed noise"):
        secure_sum(FakeGrid(root, NODES), cfg, _base_record(tiny_base), WEIGHTS, layout, _shapes(tiny_base))
    assert GuardPolicy.for_site(cfg, {}).budget == 1
    assert GuardPolicy.for_site(_cfg(tiny_base, noise=0.1, aggregation_budget=5), {}).budget == 5
    assert GuardPolicy.for_site(_cfg(tiny_base, noise=0.1, aggregation_budget=5), {"noise": 0.5}).noise == 0.5


def test_client_state_survives_serialisation_between_stages():
    params = SecAggParams.create([3, 5, 8], 100, 1.0)
    server = SecAggServer(params)
    xs = {i: np.random.default_rng(i).uniform(-0.5, 0.5, 100).astype(np.float32) for i in params.client_ids}
    blobs = {}
    for i in params.client_ids:
        client = SecAggClient(SecAggParams.from_dict(params.to_dict()), i)
        keys = client.advertise_keys()
        blobs[i] = (client.to_state(), keys)
    broadcast = server.collect_public_keys({i: k for i, (_, k) in blobs.items()})
    shares = {}
    for i in params.client_ids:
        client = SecAggClient.from_state(blobs[i][0])
        shares[i] = client.share_keys(broadcast)
        blobs[i] = client.to_state()
    routed = server.route_shares(shares)
    for i in params.client_ids:
        client = SecAggClient.from_state(blobs[i])
        add_whole(server, i, client.masked_input(routed[i], xs[i]))
        blobs[i] = client.to_state()
    request = server.unmask_request()
    result = unmasked(server, {i: SecAggClient.from_state(blobs[i]).unmask(*request) for i in blobs})
    assert np.abs(result.total - sum(x.astype(np.float64) for x in xs.values())).max() <= result.error_bound
    with pytest.raises(FeddemError, match="damaged"):
        SecAggClient.from_state(b"{not json")


# --- the whole workflow over the fake Grid ---

def _plain_windows(root, weights_by_index, n):
    """32-byte windows of each site's d_i and w_i * d_i as float32 bytes: a site's vector in the clear."""
    windows = []
    for i in range(n):
        vector = _vector(root, i)
        for name, t in vector.items():
            if t.numel() >= 64:
                for scaled in (t, t * weights_by_index[i]):
                    raw = scaled.contiguous().numpy().tobytes()
                    middle = len(raw) // 2 // 4 * 4
                    windows.append((i, name, raw[middle:middle + 32]))
    assert windows
    return windows


def test_secure_run_folder_and_messages_hold_no_site_vector_in_the_clear(tiny_base, tmp_path):
    nodes = NODES[:3]
    out = tmp_path / "run"
    grid = FakeGrid(tmp_path / "sites", nodes)
    result = run_dem(grid, _cfg(tiny_base, sites=3, out_dir=str(out)), RUN_ID)
    report = result.report
    assert report["aggregation"] == "secure" and report["failures"] == {}
    details = report["secure_aggregation"]
    assert details["threshold"] == 2 and details["dropped"] == {} and 0 < details["error_bound"] < 1e-5
    assert (out / "model" / "config.json").is_file()
    # the run's manifest names every file it wrote, and no site vector (a secure run has no pool)
    assert sorted(o.path for o in result.manifest.outputs) == sorted(
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert not result.manifest.recorded("site-vector")
    windows = _plain_windows(tmp_path / "sites", {i: 1 / 3 for i in range(3)}, 3)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        leaked = [(i, name) for i, name, w in windows if w in data]
        assert not leaked, f"{path} holds a site's vector in the clear: {leaked[:3]}"
    received = b"".join(grid.seen)
    assert not [(i, name) for i, name, w in windows if w in received]

    # a server asking for the plain upload after the secure sum (the downgrade) gets refusals, not vectors
    with pytest.raises(FeddemError, match="no site succeeded"):
        Stage(grid, _cfg(tiny_base, sites=3), _base_record(tiny_base)).run(
            "upload", M.UPLOAD, {n: RecordDict({M.WEIGHT: ConfigRecord({"weight": 1 / 3})}) for n in nodes})
    assert not [(i, name) for i, name, w in windows if w in b"".join(grid.seen[-3:])]
    # the same check finds the vectors in what a plain upload sends: it would see a leak
    plain = [message_to_proto(Message(RecordDict({M.VECTOR: upload_weighted_vector(_vector(tmp_path / "sites", i),
                                                                                     1 / 3)}),
                                      dst_node_id=nodes[i], message_type=M.UPLOAD)).SerializeToString()
             for i in range(3)]
    assert any(w in b"".join(plain) for _, _, w in windows)


def test_failed_secure_round_writes_no_model_and_no_report(tiny_base, tmp_path):
    nodes = NODES[:2]
    out = tmp_path / "run"
    grid = FakeGrid(tmp_path / "sites", nodes, {(nodes[1], M.SA_MASKED): "error"})
    with pytest.raises(FeddemError, match=r"stage 'masked'.*1 of 2 sites left, threshold 2"):
        run_dem(grid, _cfg(tiny_base, sites=2, min_peers=1, out_dir=str(out)), RUN_ID)
    assert not (out / "model").exists()
    assert not (out / "report.json").exists() and not (out / "aggregate.safetensors").exists()
    assert M.EVALUATE not in grid.sent  # nothing was merged or evaluated


def test_secure_run_with_a_dropout_reports_effective_weights(tiny_base, tmp_path):
    out = tmp_path / "run"
    nodes = NODES[:3]
    grid = FakeGrid(tmp_path / "sites", nodes, {(nodes[2], M.SA_SHARE): "error"})
    report = run_dem(grid, _cfg(tiny_base, sites=3, min_peers=1, out_dir=str(out)), RUN_ID).report
    details = report["secure_aggregation"]
    assert list(details["dropped"]) == ["site-2"] and "share" in details["dropped"]["site-2"]
    assert report["weights"] == pytest.approx({f"site-{i}": 1 / 3 for i in range(2)})
    assert details["effective_weight_sum"] == pytest.approx(2 / 3) and "not renormalised" in details["note"]
    # a failure names the site (learnt from its earlier replies), not its Flower node id
    assert "site-2" in report["failures"] and not any(k.startswith("node-") for k in report["failures"])
    assert set(report["eval"]["merged"]) == {"arithmetic", "records"}


def test_a_site_that_fails_before_any_reply_is_named_by_its_own_failure(tiny_base, tmp_path):
    """The first message a site answers is a refusal (a base whose checksum differs): the report names the site."""
    nodes = NODES[:2]
    grid = FakeGrid(tmp_path / "sites", nodes)
    wrong_base = ConfigRecord({"model-ref": str(tiny_base), "model-checksum": "0" * 64})
    stage = Stage(grid, _cfg(tiny_base, sites=2, min_peers=1), wrong_base)
    with pytest.raises(FeddemError, match="no site succeeded"):
        stage.run("local fine-tuning", M.TRAIN, {n: RecordDict() for n in nodes})
    assert sorted(stage.failures) == ["site-0", "site-1"]
    assert all("checksum" in why for why in stage.failures.values()), stage.failures


@pytest.mark.parametrize("record, message", [
    ({"aggregation": "magic"}, "unknown aggregation 'magic'"),
    ({"clip": 0.0}, "clip must be a positive"),
    ({"min-peers": 0}, "min-peers must be at least 1"),
    ({"weight-min": 0.5, "weight-max": 0.2}, "is larger than weight-max"),
    ({"secagg-threshold": 1}, "secagg-threshold must be 0"),
    ({"secagg-threshold": 5}, "secagg-threshold must be 0"),
    ({"sites": 2, "min-peers": 2}, "needs at least 3 sites"),
    ({"aggregation-budget": 2}, "needs distributed noise"),
    ({"noise": -1.0}, "noise must be a finite number"),
    ({"aggregation-budget": 0, "noise": 0.1}, "aggregation-budget must be at least 1"),
])
def test_secure_settings_are_validated(record, message):
    with pytest.raises(FeddemError, match=message):
        RunConfig.from_record(record)
    RunConfig.from_record({"sites": 2, "min-peers": 2, "aggregation": "plain"})  # plain has no guard


def test_threshold_default():
    cfg = RunConfig()
    assert [cfg.threshold_for(n) for n in (2, 3, 4, 5, 9)] == [2, 2, 3, 4, 6]
    assert RunConfig(secagg_threshold=3).threshold_for(4) == 3
