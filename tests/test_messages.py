"""The messages between server and sites (`common.messages`): each class round-trips through Flower's wire format,
a missing or mistyped field is named, and version skew is handled as the protocol says: the real ClientApp
handlers complete a round with a newer server (higher minor, settings and fields they do not know), refuse another
major naming both versions, and name a required setting the server left out."""

import logging

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto

from feddem.common import messages as M
from feddem.common.config import RunConfig
from feddem.common.errors import FeddemError
from feddem.common.modeling import load_model, model_checksum
from feddem.common.secagg import SecAggParams
from feddem.common.vector_io import load_vector
from feddem.common.vector_records import vector_from_record, vector_to_record
from feddem.common.vectors import parameters_of
from feddem.server.messaging import failure_reason, site_message
from feddem.server.secure_aggregation import secure_sum
from feddem.server.workflow import Stage, evaluate_records
from tests.fakegrid import RUN_ID, FakeGrid, task_identity

NODES = [9_000_000_501, 9_000_000_502, 9_000_000_503]
WEIGHTS = dict(zip(NODES, [0.2, 0.3, 0.5]))


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    monkeypatch.setattr(M, "_told", set())  # each test sees its own "logged once"
    with task_identity():
        yield


def _wire(content: RecordDict) -> RecordDict:
    """`content` as the other side receives it (Flower's protobuf serialisation)."""
    return message_from_proto(message_to_proto(Message(content, dst_node_id=1, message_type=M.TRAIN))).content


def _vector(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(3, 4, generator=g), "b.bias": torch.randn(5, generator=g)}


def _same_vector(record, expected) -> bool:
    got = vector_from_record(record)
    return sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


SETTINGS = M.SiteSettings.from_run_config(RunConfig(steps=7, lr=1e-3, lora=True, noise=0.5, aggregation_budget=2,
                                                    aggregation="plain", sparsify="dare:0.5", merge="fisher",
                                                    merge_examples=5))
PARAMS = SecAggParams.create([0, 1, 2], 40, 1.0)

ROUND_TRIPS = [
    SETTINGS,
    M.BaseModelRef("/models/base", "abc123"),
    M.UploadRequest(0.25),
    M.EvaluateRequest(vector_to_record(_vector(1)), "validation"),
    M.EvaluateReply({"site": "site-0", "domain": "prose", "merged_loss": 1.5, "heldout_tokens": 96, "samples": "[]"}),
    M.Failure("privacy guard of site-0 refuses: reasons", "site-0"),
    M.Failure("no name known"),
    M.KeysRequest(PARAMS, 1, 0.3, [0.2, 0.3, 0.5], ["a.weight", "b.bias"]),
    M.KeysReply(b"k" * 32, b"s" * 32),
    M.ShareRequest(b"session", [0, 1, 2], [b"c0", b"c1", b"c2"], [b"s0", b"s1", b"s2"]),
    M.ShareReply([0, 2], [b"ct0", b"ct2"]),
    M.MaskedRequest(b"session", (0, 40), [0, 2], [b"ct0", b"ct2"]),
    M.MaskedRequest(b"session", (20, 40)),  # a later part: no shares
    M.MaskedRequest(b"session"),  # no span: the whole vector
    M.UnmaskRequest(b"session", [0, 1], [2]),
    M.UnmaskReply([0, 1], [b"sh0", b"sh1"]),
]


@pytest.mark.parametrize("message", ROUND_TRIPS, ids=lambda m: type(m).__name__)
def test_each_message_round_trips_through_the_wire(message):
    record = message.to_record()
    if isinstance(record, ConfigRecord):  # a part of a request (the envelope's records)
        assert type(message).from_record(_wire(RecordDict({"x": record})).config_records["x"]) == message
    else:
        assert type(message).from_record(_wire(record)) == message


def test_vector_carrying_messages_round_trip():
    start, target, arrays = _vector(2), _vector(3), _vector(4)
    train = M.TrainRequest.from_record(_wire(M.TrainRequest(vector_to_record(start), vector_to_record(target),
                                                            True).to_record()))
    assert train.embedding and _same_vector(train.start, start) and _same_vector(train.target, target)
    plain = M.TrainRequest.from_record(_wire(M.TrainRequest().to_record()))
    assert (plain.start, plain.target, plain.embedding) == (None, None, False)
    assert _same_vector(M.UploadReply.from_record(_wire(M.UploadReply(vector_to_record(arrays)).to_record())).vector,
                        arrays)
    result = {"site": "site-1", "domain": "records", "examples": 24, "tokens": 700, "train_loss": 2.5,
              "base_loss": 3.0, "local_loss": 2.0, "warnings": "", "base_samples": "[]"}
    reply = M.TrainReply.from_record(_wire(M.TrainReply(result, ["a.weight", "b.bias"],
                                                        np.arange(4, dtype=np.float32)).to_record()))
    assert reply.result == result and reply.layout == ["a.weight", "b.bias"]
    assert np.array_equal(reply.embedding, np.arange(4, dtype=np.float32))
    masked = M.MaskedReply(vector_to_record(arrays), [0, 12], [b"t0", b"t1"], 3, 17)
    back = M.MaskedReply.from_record(_wire(masked.to_record()))
    assert (back.offsets, back.tags, back.clipped, back.elements) == ([0, 12], [b"t0", b"t1"], 3, 17)
    assert _same_vector(back.masked, arrays)


def test_the_envelope_carries_the_version_the_settings_and_the_base():
    cfg = RunConfig(steps=3, weighting="search", noise=0.1, aggregation_budget=8, search_budget=8)
    content = _wire(site_message(cfg, M.BaseModelRef("ref", "sum").to_record(), 1, M.TRAIN, RecordDict()).content)
    envelope = M.Envelope.from_record(content)
    assert envelope == M.Envelope(M.SiteSettings.from_run_config(cfg), M.BaseModelRef("ref", "sum"), M.VERSION)
    sent = set(content.config_records[M.SETTINGS])
    assert sent == {f.replace("_", "-") for f in M.SiteSettings.__dataclass_fields__}
    # only what a site uses: no server-side option (the weighting, the search, the run folder, the timeout...)
    assert not sent & {"weighting", "search-budget", "out-dir", "timeout", "sites", "ablate", "rounds"}
    assert len(sent) < len(RunConfig.keys())


@pytest.mark.parametrize("build, named", [
    (lambda: M.UploadRequest.from_record(RecordDict({M.WEIGHT: ConfigRecord({})})), "missing required field 'weight'"),
    (lambda: M.UploadRequest.from_record(RecordDict()), "missing required record 'weight'"),
    (lambda: M.UploadRequest.from_record(RecordDict({M.WEIGHT: ConfigRecord({"weight": "half"})})),
     "field 'weight' must be float, got str"),
    (lambda: M.KeysRequest.from_record(RecordDict({M.SA_PARAMS: ConfigRecord(PARAMS.to_dict()), M.SA_ROUND:
                                                   ConfigRecord({"client-id": 0, "weight": 0.5, "names": ["a"]})})),
     "keys request: missing required field 'weights'"),
    (lambda: M.TrainReply.from_record(RecordDict({M.SITE: ConfigRecord({"site": "site-2"}), M.METRICS: MetricRecord(
        {"examples": 1, "tokens": 2, "train_loss": 1.0, "base_loss": 1.0, "local_loss": 1.0}),
        M.LAYOUT: ConfigRecord({"names": []})})), "train reply from site-2: missing required field(s) domain"),
    (lambda: M.MaskedReply.from_record(RecordDict({M.SA: ConfigRecord({"offsets": [0], "tags": [b"t"]}),
                                                   M.METRICS: MetricRecord({})})),
     "masked reply: missing required record 'masked'"),
])
def test_a_missing_or_mistyped_field_is_named(build, named):
    with pytest.raises(FeddemError, match=named.replace("(", r"\(").replace(")", r"\)")):
        build()


def test_versions_of_the_same_major_are_accepted_another_major_is_refused_naming_both(caplog):
    assert M.Version.parse("1.12") == M.Version(1, 12) and str(M.Version(3, 4)) == "3.4"
    with pytest.raises(FeddemError, match="malformed feddem-protocol version 'one'"):
        M.Version.parse("one")
    newer = M.stamp(RecordDict(), M.Version(M.VERSION.major, M.VERSION.minor + 1))
    with caplog.at_level(logging.WARNING, logger="feddem.messages"):
        for _ in range(3):
            assert M.peer_version(newer, "the server", "this site") == M.Version(M.VERSION.major, M.VERSION.minor + 1)
    assert caplog.text.count("newer than this site's") == 1  # logged once, not per message
    other = M.Version(M.VERSION.major + 1, 0)
    with pytest.raises(FeddemError, match=rf"the server speaks feddem-protocol {other} and this site {M.VERSION}: "
                                          rf"a different major version cannot be understood \(upgrade this site"):
        M.peer_version(M.stamp(RecordDict(), other), "the server", "this site")
    with pytest.raises(FeddemError, match="carries no feddem-protocol version"):
        M.peer_version(RecordDict(), "the server", "this site")


# --- the real ClientApp handlers against servers of other versions ---

def _cfg(base, **kw) -> RunConfig:
    values = dict(sites=3, model=str(base), steps=2, train_examples=24, eval_examples=8, batch_size=4, seq_len=32,
                  base_steps=30, device="cpu", timeout=2.0, min_peers=2)
    return RunConfig(**(values | kw))


def _base(base) -> ConfigRecord:
    return M.BaseModelRef(str(base), model_checksum(load_model(str(base)))).to_record()


def _rewriting(grid: FakeGrid, rewrite) -> FakeGrid:
    """The grid with every request altered by `rewrite(content)` on its way to the site (another server)."""
    def deliver(msg, original=grid._deliver):
        rewrite(msg.content)
        return original(msg)

    grid._deliver = deliver
    return grid


def _newer_server(content: RecordDict) -> None:
    """What a server one minor version ahead sends: a newer version, a setting and fields this site never heard
    of, and a record of its own."""
    content.config_records[M.PROTOCOL][M.PROTOCOL_KEY] = f"{M.VERSION.major}.{M.VERSION.minor + 1}"
    content.config_records[M.SETTINGS]["future-setting"] = 3
    content["future-record"] = ConfigRecord({"anything": "at all"})
    for record in content.config_records.values():
        record["future-field"] = 1.5


def test_a_site_completes_a_round_with_a_newer_server(tmp_path, tiny_base, caplog):
    """Training, a secure sum and the evaluation, each request from a server one minor version ahead that sends
    a setting and fields the site does not know: the site ignores them (logged once) and the round completes with
    the exact sum of every site."""
    cfg = _cfg(tiny_base)
    grid = _rewriting(FakeGrid(tmp_path, NODES), _newer_server)
    stage = Stage(grid, cfg, _base(tiny_base))
    with caplog.at_level(logging.WARNING, logger="feddem.messages"):
        trained = stage.run("train", M.TRAIN, {n: M.TrainRequest().to_record() for n in NODES})
        layout = M.TrainReply.from_record(trained[NODES[0]]).layout
        shapes = {n: t.shape for n, t in parameters_of(load_model(str(tiny_base))).items()}
        result = secure_sum(grid, cfg, stage.base, WEIGHTS, layout, shapes)
        evaluated = evaluate_records(stage, NODES, result.aggregate, "test", "evaluation")
    assert not stage.failures and sorted(result.survivors) == NODES and sorted(evaluated) == NODES
    assert all(r["merged_loss"] > 0 for r in evaluated.values())
    vectors = [load_vector(tmp_path / f"site-{i}" / "runs" / str(RUN_ID) / "vector.safetensors") for i in range(3)]
    for name in layout:
        exact = sum(w * v[name].double() for w, v in zip(WEIGHTS.values(), vectors))
        assert (result.aggregate[name].double() - exact).abs().max() <= result.error_bound
    assert caplog.text.count("future-setting") == 1  # ignored, and said once for the whole round
    assert caplog.text.count("newer than this site's") == 1


def test_a_site_completes_a_train_request_of_the_previous_minor_with_the_default_merge_examples(tmp_path, tiny_base):
    """A 1.1 server sends no `merge-examples` (1.2): the site computes its merge statistics on the default count
    of its train examples, and says how many it used."""
    from feddem.client.merge_parts import stats_path
    from feddem.common.site_context import SiteContext
    from feddem.common.stored_tensors import read_header

    def older_server(content: RecordDict) -> None:
        content.config_records[M.PROTOCOL][M.PROTOCOL_KEY] = "1.1"
        del content.config_records[M.SETTINGS]["merge-examples"]

    # more train blocks (24 x 2 steps) than the default count, and a run config whose own count never arrives
    cfg = _cfg(tiny_base, merge="regmean", merge_examples=3, train_examples=300, batch_size=24)
    stage = Stage(_rewriting(FakeGrid(tmp_path, NODES[:1]), older_server), cfg, _base(tiny_base))
    [reply] = stage.run("train", M.TRAIN, {NODES[0]: M.TrainRequest().to_record()}).values()
    assert not stage.failures
    default = RunConfig().merge_examples
    assert M.TrainReply.from_record(reply).result["merge_stats_examples"] == default
    site = SiteContext(0, "site-0", tmp_path / "site-0")
    assert read_header(stats_path(site, RUN_ID))[2]["examples"] == str(default)


def test_a_site_refuses_another_major_naming_both_versions(tmp_path, tiny_base):
    later = f"{M.VERSION.major + 1}.0"
    grid = _rewriting(FakeGrid(tmp_path, NODES),
                      lambda c: c.config_records[M.PROTOCOL].__setitem__(M.PROTOCOL_KEY, later))
    stage = Stage(grid, _cfg(tiny_base), _base(tiny_base))
    with pytest.raises(FeddemError, match="train: no site succeeded"):
        stage.run("train", M.TRAIN, {n: M.TrainRequest().to_record() for n in NODES})
    assert sorted(stage.failures) == ["site-0", "site-1", "site-2"]  # each named (the refusal carries its name)
    for reason in stage.failures.values():
        assert f"the server speaks feddem-protocol {later} and this site {M.VERSION}" in reason
        assert "different major" in reason
    assert not (tmp_path / "site-0" / "runs").exists()  # refused before any training


def test_a_site_names_the_required_setting_the_server_left_out(tmp_path, tiny_base):
    grid = _rewriting(FakeGrid(tmp_path, NODES), lambda c: c.config_records[M.SETTINGS].pop("steps"))
    stage = Stage(grid, _cfg(tiny_base), _base(tiny_base))
    with pytest.raises(FeddemError, match="no site succeeded"):
        stage.run("train", M.TRAIN, {n: M.TrainRequest().to_record() for n in NODES})
    for reason in stage.failures.values():
        assert "lack required setting(s) steps" in reason


def test_a_site_refuses_an_unversioned_request_and_a_bad_setting(tmp_path, tiny_base):
    grid = FakeGrid(tmp_path, NODES[:1])
    content = M.Envelope(M.SiteSettings.from_run_config(_cfg(tiny_base)), M.BaseModelRef(str(tiny_base))).wrap(
        M.UploadRequest(0.5).to_record())
    del content[M.PROTOCOL]
    [reply] = grid.send_and_receive([Message(content, dst_node_id=NODES[0], message_type=M.UPLOAD)])
    assert "carries no feddem-protocol version" in failure_reason(reply)
    bad = site_message(_cfg(tiny_base, seq_len=4), _base(tiny_base), NODES[0], M.UPLOAD,
                       M.UploadRequest(0.5).to_record())
    [reply] = grid.send_and_receive([bad])
    assert "the server's setting seq-len=4: expected at least 8" in failure_reason(reply)


def test_the_server_refuses_a_reply_of_another_major(tiny_base):
    """A site's reply carries its version: a result of another major is a failure that names both versions, one
    of the same major (an older minor too) is a result, and a site's Failure is read whatever its version."""
    request = site_message(_cfg(tiny_base), _base(tiny_base), NODES[0], M.EVALUATE, RecordDict())
    request.metadata.__dict__["_message_id"] = "request-1"
    result = {"site": "site-0", "domain": "prose", "merged_loss": 1.0}

    def reply(content, version):
        return Message(M.stamp(content, version), reply_to=request)

    older = M.Version(M.VERSION.major - 1, 9)
    assert f"the site speaks feddem-protocol {older} and this server {M.VERSION}" in failure_reason(
        reply(M.EvaluateReply(result).to_record(), older))
    assert failure_reason(reply(M.EvaluateReply(result).to_record(), M.Version(M.VERSION.major, 0))) is None
    assert failure_reason(reply(M.Failure("refused").to_record(), older)) == "refused"
    unversioned = Message(M.EvaluateReply(result).to_record(), reply_to=request)
    assert "carries no feddem-protocol version" in failure_reason(unversioned)
