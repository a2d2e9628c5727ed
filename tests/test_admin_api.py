"""The admin API against a real `feddem server` on 127.0.0.1, over a store seeded here: authentication, bad input,
fuzzed and mutated messages (each answered with the right status, the server still serving, the store unchanged),
export with checksums, and feddem-admin's output and exit codes."""

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from feddem.common.vector_io import save_vector
from feddem.admin.v1 import admin_pb2 as pb
from feddem.admin.v1 import admin_pb2_grpc
from feddem.server import admin_cli
from feddem.server.store import Store, site_vector_name
from tests.admin_server import ROOT, AdminServer, fingerprint, make_client_cert, make_tls
from tests.test_store import report

SERVICES = {name: pb.DESCRIPTOR.services_by_name[name] for name in ("AdminService", "RecorderService")}
METHODS = [(s, m) for s in SERVICES.values() for m in s.methods]
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED}
MODEL_BYTES = os.urandom(2 * (1 << 20) + 123)  # more than two streamed chunks


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A store with a trusted run (model, aggregate, site vectors; its base is not on this machine), a finished
    secure run, and a run that is still being written (by this process)."""
    root = tmp_path_factory.mktemp("admin-api")
    store = Store(root / "store")
    runs = {}
    for name, aggregation in (("trusted", "plain"), ("secure", "secure")):
        run = store.begin_run({"aggregation": aggregation, "weighting": "uniform"}, flower_run_id=7)
        store.put_artefact(run, "model/config.json", "model", [b'{"model_type": "llama"}'])
        store.put_artefact(run, "model/model.safetensors", "model", [MODEL_BYTES])
        store.put_artefact(run, "aggregate.safetensors", "aggregate", [b"sum"])
        if aggregation == "plain":
            for i, site in enumerate(("site-0", "site-1")):
                path = root / f"{site}.safetensors"
                save_vector({"w": torch.full((3,), float(i))}, path)
                store.put_file(run, site_vector_name(site), "site-vector", path)
        store.finish_run(run, report() | {"aggregation": aggregation})
        runs[name] = run
    runs["open"] = store.begin_run({"aggregation": "plain"})
    store.close()
    return root, runs


@pytest.fixture(scope="module")
def server(seeded):
    root, runs = seeded
    tls = make_tls(root / "tls")
    srv = AdminServer(root / "store", tls, root / "server.log").start()
    try:
        yield srv, runs
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def admin(server):
    srv, _ = server
    return admin_pb2_grpc.AdminServiceStub(srv.channel())


def raw_call(channel, service, method, payload, timeout=30):
    """Call with raw request bytes (a list of them for a client stream); returns the status code and details."""
    path = f"/{service.full_name}/{method.name}"
    try:
        if method.client_streaming:
            channel.stream_unary(path)(iter(payload), timeout=timeout)
        elif method.server_streaming:
            list(channel.unary_stream(path)(payload, timeout=timeout))
        else:
            channel.unary_unary(path)(payload, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def _payload(method, data: bytes):
    return [data] if method.client_streaming else data


@pytest.mark.parametrize("token, code", [(None, grpc.StatusCode.UNAUTHENTICATED),
                                         ("not-the-token-0123456789", grpc.StatusCode.PERMISSION_DENIED)])
def test_every_method_refuses_a_missing_or_wrong_token(server, admin, token, code):
    srv, _ = server
    before = fingerprint(admin, pb)
    channel = srv.channel(token=token)
    for service, method in METHODS:
        got, details = raw_call(channel, service, method, _payload(method, b""))
        assert got == code and details, (method.name, got, details)
    assert fingerprint(admin, pb) == before


def test_a_server_signed_by_another_ca_is_refused(server, tmp_path):
    srv, _ = server
    other = make_tls(tmp_path / "other")
    got, _ = raw_call(srv.channel(ca=other.ca), *METHODS[0], b"", timeout=10)
    assert got == grpc.StatusCode.UNAVAILABLE
    assert admin_cli.main(["status", "--server", srv.address, "--token", srv.token, "--ca", str(other.ca),
                           "--timeout", "10"]) == 6


def test_unknown_methods_are_unimplemented(server):
    srv, _ = server
    with pytest.raises(grpc.RpcError) as exc:
        srv.channel().unary_unary("/feddem.admin.v1.AdminService/DropEverything")(b"", timeout=10)
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED


def _bad_requests(runs):
    trusted, secure, open_ = runs["trusted"], runs["secure"], runs["open"]
    invalid, missing, refused = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                 grpc.StatusCode.FAILED_PRECONDITION)
    return [
        ("GetRun", pb.GetRunRequest(run_id="20990101-000000-ffffff"), missing),
        ("GetRun", pb.GetRunRequest(run_id=""), invalid),
        ("GetRun", pb.GetRunRequest(run_id="../store.db"), invalid),
        ("ExportModel", pb.ExportModelRequest(run_id="nope"), missing),
        ("ExportModel", pb.ExportModelRequest(run_id=open_), refused),
        ("RemergeModel", pb.RemergeModelRequest(run_id="nope", weights={"site-0": 1.0}), missing),
        ("RemergeModel", pb.RemergeModelRequest(run_id=secure, weights={"site-0": 1.0}), refused),
        ("RemergeModel", pb.RemergeModelRequest(run_id=open_, weights={"site-0": 1.0}), refused),
        ("RemergeModel", pb.RemergeModelRequest(run_id=trusted, weights={}), invalid),
        ("RemergeModel", pb.RemergeModelRequest(run_id=trusted, weights={"site-9": 0.5}), invalid),
        ("RemergeModel", pb.RemergeModelRequest(run_id=trusted, weights={"site-0": math.nan}), invalid),
        ("RemergeModel", pb.RemergeModelRequest(run_id=trusted, weights={"site-0": math.inf}), invalid),
        ("RemergeModel", pb.RemergeModelRequest(run_id=trusted, weights={"site-0": -0.5}), invalid),
        ("RemergeModel", pb.RemergeModelRequest(run_id=trusted, weights={"site-0": 1.5}), invalid),
        ("RemergeModel", pb.RemergeModelRequest(run_id=trusted, weights={"site-0": 0.0, "site-1": 0.0}), invalid),
        # valid weights, but this run's base model is not on the server
        ("RemergeModel", pb.RemergeModelRequest(run_id=trusted, weights={"site-0": 0.5}), refused),
        ("EvaluateModel", pb.EvaluateModelRequest(run_id=trusted, data="/no/such/folder"), invalid),
        ("EvaluateModel", pb.EvaluateModelRequest(run_id=trusted, data="synthetic:nope"), invalid),
        ("EvaluateModel", pb.EvaluateModelRequest(run_id=open_, data="synthetic"), refused),
        ("EvaluateModel", pb.EvaluateModelRequest(run_id="nope"), missing),
        ("RankPool", pb.RankPoolRequest(run_id=secure, candidates="1"), refused),
        ("RankPool", pb.RankPoolRequest(run_id=trusted, candidates="site-0,site-7"), invalid),
        ("RankPool", pb.RankPoolRequest(run_id=trusted, candidates="9"), invalid),
        ("BeginRun", pb.BeginRunRequest(config_json="[1, 2]"), invalid),
        ("BeginRun", pb.BeginRunRequest(config_json="{not json"), invalid),
        ("BeginRun", pb.BeginRunRequest(config_json="{}", writer="bad writer"), invalid),
        ("FinishRun", pb.FinishRunRequest(run_id=open_, report_json="{}"), invalid),
        ("FinishRun", pb.FinishRunRequest(run_id=open_, report_json="nope"), invalid),
        ("FinishRun", pb.FinishRunRequest(run_id=trusted, report_json=json.dumps(report())), refused),
        ("FinishRun", pb.FinishRunRequest(run_id="nope", report_json=json.dumps(report())), missing),
        ("FailRun", pb.FailRunRequest(run_id=trusted, reason="x"), refused),
        ("FailRun", pb.FailRunRequest(run_id="nope", reason="x"), missing),
        ("PutArtefact", [pb.PutArtefactRequest(data=b"no header")], invalid),
        ("PutArtefact", [], invalid),
        ("PutArtefact", [pb.PutArtefactRequest(header=pb.ArtefactHeader(run_id=trusted, name="x.bin",
                                                                        kind="report", size=1)),
                         pb.PutArtefactRequest(data=b"x")], refused),
        ("PutArtefact", [pb.PutArtefactRequest(header=pb.ArtefactHeader(run_id=open_, name="../x", kind="report",
                                                                        size=1))], invalid),
        ("PutArtefact", [pb.PutArtefactRequest(header=pb.ArtefactHeader(run_id=open_, name="a.bin", kind="movie",
                                                                        size=1))], invalid),
        ("PutArtefact", [pb.PutArtefactRequest(header=pb.ArtefactHeader(run_id=open_, name="a.bin", kind="report",
                                                                        size=5)),
                         pb.PutArtefactRequest(data=b"abc")], invalid),
        ("PutArtefact", [pb.PutArtefactRequest(header=pb.ArtefactHeader(run_id=open_, name="a.bin", kind="report",
                                                                        size=3, sha256="00" * 32)),
                         pb.PutArtefactRequest(data=b"abc")], invalid),
        ("PutArtefact", [pb.PutArtefactRequest(header=pb.ArtefactHeader(run_id=open_, name="a.bin", kind="report",
                                                                        size=3)),
                         pb.PutArtefactRequest(header=pb.ArtefactHeader(run_id=open_))], invalid),
        # issue 15: what the fuzzer found
        ("BeginRun", pb.BeginRunRequest(config_json='{"a": ' + "[" * 5000 + "]" * 5000 + "}"), invalid),
        ("BeginRun", pb.BeginRunRequest(config_json='{"a": ' + "[" * 20 + "]" * 20 + "}"), invalid),
        ("BeginRun", pb.BeginRunRequest(config_json='{"n": ' + str(2**64) + "}"), invalid),
        ("BeginRun", pb.BeginRunRequest(config_json='{"n": ' + "9" * 5000 + "}"), invalid),
        ("BeginRun", pb.BeginRunRequest(config_json='{"x": NaN}'), invalid),
        ("BeginRun", pb.BeginRunRequest(config_json=json.dumps({"pad": "x" * 70_000})), invalid),
        ("FinishRun", pb.FinishRunRequest(run_id=open_, report_json=json.dumps(
            report() | {"rounds": [{"round": 2**40, "weights": {"site-0": 1.0}}]})), invalid),
        ("FinishRun", pb.FinishRunRequest(run_id=open_, report_json=json.dumps(
            report() | {"timings": {"a": json.loads("[" * 30 + "]" * 30)}})), invalid),
        ("FinishRun", pb.FinishRunRequest(run_id=open_, report_json=json.dumps(
            report(), default=str).replace('"examples": 10', f'"examples": {2**64}')), invalid),
        ("FinishRun", pb.FinishRunRequest(run_id=open_, report_json="[" * 100_000), invalid),
        ("GetRun", pb.GetRunRequest(run_id="r" * 16_000), invalid),
        ("GetRun", pb.GetRunRequest(run_id="2"), invalid),  # a prefix of every seeded run: ambiguous
        ("DeleteRun", pb.DeleteRunRequest(run_id="20990101-000000-ffffff"), missing),
        ("DeleteRun", pb.DeleteRunRequest(run_id=""), invalid),
        ("EvaluateModel", pb.EvaluateModelRequest(run_id=trusted, data="/etc"), invalid),
        ("EvaluateModel", pb.EvaluateModelRequest(run_id=trusted, data="d" * 100_000), invalid),
        ("RankPool", pb.RankPoolRequest(run_id=trusted, candidates="1", data="/etc"), invalid),
        ("ListRuns", pb.ListRunsRequest(page_token="not-a-token"), invalid),
        ("ListRuns", pb.ListRunsRequest(page_size=-1), invalid),
        ("ListModels", pb.ListModelsRequest(page_token="e30="), invalid),
        ("FailRun", pb.FailRunRequest(run_id="f" * 16_000, reason="x"), invalid),
        ("PutArtefact", [pb.PutArtefactRequest(header=pb.ArtefactHeader(run_id=open_, name="a.bin", kind="report",
                                                                        size=3, sha256="zz"))], invalid),
        ("PutArtefact", [pb.PutArtefactRequest(header=pb.ArtefactHeader(run_id=open_, name="a.bin", kind="report",
                                                                        size=2**62))], invalid),
        ("PutArtefact", [pb.PutArtefactRequest(header=pb.ArtefactHeader(
            run_id=open_, name="a.bin", kind="report", size=shutil.disk_usage(tempfile.gettempdir()).free + (1 << 30))
        )], grpc.StatusCode.RESOURCE_EXHAUSTED),  # more than the disk holds
    ]


def _method(name):
    return next((s, m) for s, m in METHODS if m.name == name)


def _serialized(request):
    if isinstance(request, list):
        return [r.SerializeToString() for r in request]
    return request.SerializeToString()


def test_bad_requests_get_the_right_status_and_change_nothing(server, admin):
    srv, runs = server
    channel, before = srv.channel(), fingerprint(admin, pb)
    for name, request, code in _bad_requests(runs):
        got, details = raw_call(channel, *_method(name), _serialized(request))
        assert (got, bool(details)) == (code, True), (name, str(request)[:300], got, details)
        assert len(details) <= 1000 and "PackageKit" not in details, (name, details)  # a short quote of the input
    not_utf8 = b"\x0a\x02\xff\xfe"  # field 1 (run_id), 2 bytes that are not UTF-8
    for name in ("GetRun", "ExportModel", "FailRun"):
        got, details = raw_call(channel, *_method(name), not_utf8)
        assert got == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in details, (name, got, details)
    assert fingerprint(admin, pb) == before
    assert not list((srv.store / "artefacts").rglob("*.tmp"))
    assert admin.GetStatus(pb.GetStatusRequest(verify=True), timeout=30).problems == []


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(METHODS), st.lists(st.binary(max_size=200), min_size=1, max_size=3))
def test_random_bytes_are_invalid_arguments(server, admin, method, blobs):
    srv, _ = server
    service, m = method
    before = fingerprint(admin, pb)
    got, details = raw_call(srv.channel(), service, m, blobs if m.client_streaming else blobs[0])
    assert got in REFUSALS | {grpc.StatusCode.OK}, (m.name, got, details)
    if got != grpc.StatusCode.OK:
        assert details and fingerprint(admin, pb) == before


def _mutate(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for kind, pos, value in edits:
        at = pos % (len(buf) + 1)
        if kind == 0 and buf:
            buf[at % len(buf)] = value
        elif kind == 1:
            buf.insert(at, value)
        elif kind == 2 and buf:
            del buf[at % len(buf)]
        elif kind == 3:
            del buf[at:]
    return bytes(buf)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_mutated_messages_are_refused_or_served(server, admin, data):
    srv, runs = server
    name, request, _ = data.draw(st.sampled_from(_bad_requests(runs)))
    edits = data.draw(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10_000), st.integers(0, 255)),
                               min_size=1, max_size=4))
    payload = _serialized(request)
    payload = [_mutate(p, edits) for p in payload] if isinstance(payload, list) else _mutate(payload, edits)
    before = fingerprint(admin, pb)
    got, details = raw_call(srv.channel(), *_method(name), payload)
    assert got in REFUSALS | {grpc.StatusCode.OK}, (name, got, details)
    if got != grpc.StatusCode.OK:
        assert details and fingerprint(admin, pb) == before
    assert admin.GetStatus(pb.GetStatusRequest(), timeout=30).version  # still serving


def run_cli(srv, *args, env_auth=True) -> tuple[int, str, str]:
    """feddem-admin through its console entry point, in a subprocess (the environment names the server)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDDEM_ADMIN_")}
    if env_auth:
        env |= srv.env
    p = subprocess.run([sys.executable, "-m", "feddem.server.admin_cli", *args], capture_output=True, text=True, env=env,
                       timeout=120, cwd=ROOT, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout, p.stderr


def test_export_streams_every_file_and_checks_it(server, tmp_path):
    srv, runs = server
    code, out, err = run_cli(srv, "models", "export", runs["trusted"], "--out", str(tmp_path / "m"), "--json")
    assert code == 0, err
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == MODEL_BYTES
    assert sorted(f["path"] for f in json.loads(out)["files"]) == ["config.json", "model.safetensors"]
    # a stored file that no longer matches its checksum: DATA_LOSS, and no folder is left behind
    stored = srv.store / "artefacts" / runs["trusted"] / "model" / "model.safetensors"
    stored.write_bytes(MODEL_BYTES[:-1] + bytes([MODEL_BYTES[-1] ^ 1]))
    try:
        code, _, err = run_cli(srv, "models", "export", runs["trusted"], "--out", str(tmp_path / "bad"))
        assert code == 7 and "DATA_LOSS" in err and not (tmp_path / "bad").exists()
        assert list(tmp_path.iterdir()) == [tmp_path / "m"]
        code, out, _ = run_cli(srv, "status", "--verify")
        assert code == 7 and "model/model.safetensors" in out
    finally:
        stored.write_bytes(MODEL_BYTES)
    assert run_cli(srv, "models", "export", runs["trusted"], "--out", str(tmp_path / "m"))[0] == 2  # not empty


def test_cli_exit_codes_and_outputs(server):
    srv, runs = server
    script = Path(sys.executable).with_name("feddem-admin")  # the console script (pyproject [project.scripts])
    p = subprocess.run([str(script), "status", "--json"], capture_output=True, text=True, timeout=60,
                       env=os.environ | srv.env)
    assert p.returncode == 0 and json.loads(p.stdout)["runs_by_status"]["finished"] == 2, p.stderr
    code, out, _ = run_cli(srv, "runs", "list")
    assert code == 0 and all(run in out for run in runs.values()) and out.splitlines()[0].startswith("RUN_ID")
    code, out, _ = run_cli(srv, "runs", "list", "--json")
    listed = {r["run_id"]: r["status"] for r in json.loads(out)}  # (a fuzzed BeginRun may have added runs)
    assert code == 0 and {run: listed.get(run) for run in runs.values()} == {
        runs["trusted"]: "finished", runs["secure"]: "finished", runs["open"]: "running"}
    code, out, _ = run_cli(srv, "models", "list", "--json")
    assert code == 0 and {m["run_id"]: m["remergeable"] for m in json.loads(out)} == {
        runs["trusted"]: True, runs["secure"]: False}
    code, out, _ = run_cli(srv, "pool", "list", "--json")
    assert code == 0 and json.loads(out) == [{"run_id": runs["trusted"], "created": json.loads(out)[0]["created"],
                                              "sites": ["site-0", "site-1"]}]
    assert run_cli(srv, "runs", "show", "20990101-000000-ffffff")[0] == 3
    assert run_cli(srv, "models", "remerge", runs["secure"], "--weights", "site-0=1")[0] == 4
    assert run_cli(srv, "models", "remerge", runs["trusted"], "--weights", "site-0=nan")[0] == 2
    assert run_cli(srv, "models", "remerge", runs["trusted"], "--weights", "site-0")[0] == 2  # not SITE=W
    assert run_cli(srv, "evaluate", runs["trusted"], "--data", "/no/such")[0] == 2
    assert run_cli(srv, "runs", "list", env_auth=False)[0] == 6  # the default address: nothing there
    code, _, err = run_cli(srv, "runs", "list", "--server", srv.address, "--ca", str(srv.tls.ca), env_auth=False)
    assert code == 5 and "UNAUTHENTICATED" in err
    code, _, err = run_cli(srv, "runs", "list", "--token", "wrong-token-0123456789")
    assert code == 5 and "PERMISSION_DENIED" in err


def test_client_certificates(tmp_path):
    """A server started with --client-ca refuses a client without a certificate that CA signed; with a token as
    well, it needs both."""
    tls = make_tls(tmp_path / "tls")
    client = make_client_cert(tls)
    stranger = make_client_cert(make_tls(tmp_path / "other"), "stranger")
    status = _method("GetStatus")
    for token in ("", None):  # certificates only, then certificates and a token
        srv = AdminServer(tmp_path / f"store{token is None}", tls, tmp_path / f"server{token is None}.log",
                          token=token, client_ca=tls.ca).start()
        try:
            assert raw_call(srv.channel(client=client), *status, b"")[0] == grpc.StatusCode.OK
            assert raw_call(srv.channel(), *status, b"", timeout=10)[0] == grpc.StatusCode.UNAVAILABLE
            assert raw_call(srv.channel(client=stranger), *status, b"", timeout=10)[0] == grpc.StatusCode.UNAVAILABLE
            if token is None:
                assert raw_call(srv.channel(token=None, client=client), *status, b"")[0] == \
                    grpc.StatusCode.UNAUTHENTICATED
            code, out, err = run_cli(srv, "status", "--json", "--cert", str(client[0]), "--key", str(client[1]))
            assert code == 0 and json.loads(out)["schema_version"] >= 1, err
        finally:
            srv.stop()


def test_the_server_refuses_to_run_without_authentication(tmp_path):
    from feddem.common.errors import FeddemError
    from feddem.server.admin.serve import read_token

    tls = make_tls(tmp_path / "tls")
    with pytest.raises(RuntimeError, match="refusing to serve without authentication"):
        AdminServer(tmp_path / "store", tls, tmp_path / "server.log", token="").start(timeout=30)
    (tmp_path / "short.token").write_text("short\n")
    with pytest.raises(FeddemError, match="shorter than 16"):
        read_token(tmp_path / "short.token")


# -- issue 15: sizes, listings, unshowable records, TLS files, server-side data -----------------------------------


def test_big_configs_are_refused_and_listings_are_paged_summaries(server, admin):
    srv, runs = server
    channel = srv.channel()
    recorder = admin_pb2_grpc.RecorderServiceStub(channel)
    for size in (1 << 20, 15 << 20):
        with pytest.raises(grpc.RpcError) as exc:
            recorder.BeginRun(pb.BeginRunRequest(config_json=json.dumps({"pad": "x" * size})), timeout=60)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "bytes" in exc.value.details()
    listed, token, pages = [], "", 0
    while True:
        page = admin.ListRuns(pb.ListRunsRequest(page_size=1, page_token=token), timeout=30)
        listed += page.runs
        pages, token = pages + 1, page.next_page_token
        if not token:
            break
    ids = [r.run_id for r in listed]
    assert pages == len(ids) >= 3 and len(set(ids)) == len(ids) and set(runs.values()) <= set(ids)
    trusted = next(r for r in listed if r.run_id == runs["trusted"])
    assert trusted.config_json == "" and not trusted.weights and not trusted.metrics and not trusted.artefacts
    assert [(s.site, s.vector_stored) for s in trusted.sites] == [("site-0", True), ("site-1", True)]
    models = admin.ListModels(pb.ListModelsRequest(page_size=1), timeout=30)
    assert len(models.models) == 1 and models.next_page_token
    rest = admin.ListModels(pb.ListModelsRequest(page_token=models.next_page_token), timeout=30)
    assert {m.run_id for m in [*models.models, *rest.models]} == {runs["trusted"], runs["secure"]}
    assert {(w.round, w.site) for w in models.models[0].weights} == {(1, "site-0"), (1, "site-1")}


def test_a_stored_run_that_cannot_be_shown_can_be_deleted(server, admin):
    """A record written before the store checked rounds (round 2**40 does not fit the API's int32): GetRun names the
    problem and the way out, listings still work, and `feddem-admin runs delete` removes it (audited)."""
    import hashlib
    import sqlite3

    srv, _ = server
    bad = "20000101-000000-badbad"
    db = sqlite3.connect(srv.store / "store.db", timeout=30)
    with db:
        db.execute("INSERT INTO runs (run_id, status, kind, owner, created, config_json) "
                   "VALUES (?, 'finished', 'federated', 'elsewhere:1:1', 1.0, '{}')", (bad,))
        db.execute("INSERT INTO weights VALUES (?, ?, 'site-0', 1.0)", (bad, 2**40))
        db.execute("INSERT INTO artefacts VALUES (?, 'model/x', 'model', 0, ?, 1.0)",
                   (bad, hashlib.sha256(b"").hexdigest()))
    db.close()
    with pytest.raises(grpc.RpcError) as exc:
        admin.GetRun(pb.GetRunRequest(run_id=bad), timeout=30)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION and f"runs delete {bad}" in exc.value.details()
    assert bad in [r.run_id for r in admin.ListRuns(pb.ListRunsRequest(), timeout=30).runs]
    assert bad in [m.run_id for m in admin.ListModels(pb.ListModelsRequest(), timeout=30).models]
    code, out, err = run_cli(srv, "runs", "delete", bad, "--json")
    assert code == 2 and "--yes" in err  # no terminal to ask
    code, out, err = run_cli(srv, "runs", "delete", bad, "--yes", "--json")
    assert code == 0 and json.loads(out) == {"run_id": bad, "status": "finished", "artefacts": 1, "bytes": 0}, err
    with pytest.raises(grpc.RpcError) as exc:
        admin.GetRun(pb.GetRunRequest(run_id=bad), timeout=30)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    db = sqlite3.connect(srv.store / "store.db", timeout=30)
    assert db.execute("SELECT action, run_id FROM audit").fetchall()[-1] == ("delete", bad)
    db.close()


def _certificate(folder: Path, days: float) -> tuple[Path, Path]:
    """A self-signed certificate valid until `days` from now (negative: expired), and its key."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=400))
            .not_valid_after(now + datetime.timedelta(days=days)).sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "c.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "c.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    return folder / "c.crt", folder / "c.key"


def test_a_key_that_is_not_the_certificates_is_named_and_expiry_warned(tmp_path, capsys):
    from feddem.common.errors import FeddemError
    from feddem.server import cli
    from feddem.server.admin.serve import check_tls

    a, b = make_tls(tmp_path / "a"), make_tls(tmp_path / "b")
    assert check_tls(a.cert, a.key) == []
    with pytest.raises(FeddemError, match="does not match the certificate"):
        check_tls(a.cert, b.key)
    token = tmp_path / "token"
    token.write_text("t" * 32)
    assert cli.main(["server", "--store", str(tmp_path / "store"), "--address", "127.0.0.1:0", "--cert", str(a.cert),
                     "--key", str(b.key), "--token-file", str(token)]) == 2
    err = capsys.readouterr().err
    assert "does not match the certificate" in err and "Failed to bind" not in err
    assert not (tmp_path / "store").exists()
    for days, word in ((10, "expires on"), (-1, "expired on"), (90, None)):
        warnings = check_tls(*_certificate(tmp_path / f"c{days}", days))
        assert (warnings[0].split("' ", 1)[1].startswith(word) if word else warnings == []), warnings


def test_server_side_data_comes_only_from_the_data_roots(tmp_path):
    from feddem.server.admin.model_ops import check_data
    from feddem.server.store.errors import InvalidArgument

    root = tmp_path / "data"
    (root / "eval").mkdir(parents=True)
    (root / "eval" / "dom.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "private.txt").write_text("a\nb\n")
    (root / "link").symlink_to(tmp_path / "secret")
    assert check_data("synthetic:arithmetic", ()) == "synthetic:arithmetic"
    with pytest.raises(InvalidArgument, match="--data-root"):
        check_data(str(root / "eval"), ())
    roots = (root.resolve(),)
    assert check_data("eval", roots) == check_data(str(root / "eval"), roots) == str((root / "eval").resolve())
    for bad in ("/etc", "/", str(tmp_path / "secret"), "link", "../secret", "eval/../../secret", "d" * 100_000,
                "é" * 200,  # found by fuzzing (seed 1): 400 bytes, a name too long for the file system
                "eval/dom.txt", "synthetic:nope"):
        with pytest.raises(InvalidArgument) as exc:
            check_data(bad, roots)
        assert "private" not in str(exc.value) and len(str(exc.value)) < 600, str(exc.value)


# -- issue 19: feddem-admin ---------------------------------------------------------------------------------------


def _connection(srv) -> list[str]:
    return ["--server", srv.address, "--token", srv.token, "--ca", str(srv.tls.ca)]


def test_every_cli_argument_has_help():
    import argparse

    def walk(parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from walk(sub)
            elif not isinstance(action, argparse._HelpAction):
                yield parser.prog, action

    actions = list(walk(admin_cli.build_parser()))
    missing = [(prog, a.dest) for prog, a in actions if not a.help or a.help == argparse.SUPPRESS]
    assert len(actions) > 50 and not missing, missing
    positional = {a.help for _, a in actions if a.dest == "run"}
    assert positional and all("prefix" in h and "latest" in h for h in positional)


def test_cli_run_references_and_json(server, admin, capsys):
    import datetime

    srv, runs = server
    trusted = runs["trusted"]

    def cli(*args):
        code = admin_cli.main([*_connection(srv), *args])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = cli("runs", "show", trusted[:-1], "--json")  # a unique prefix
    run = json.loads(out)
    assert code == 0 and run["run_id"] == trusted, err
    assert run["config"] == {"aggregation": "plain", "weighting": "uniform"} and "config_json" not in run
    assert datetime.datetime.fromisoformat(run["created"]).tzinfo is not None
    assert datetime.datetime.fromisoformat(run["ended"]) >= datetime.datetime.fromisoformat(run["created"])
    code, _, err = cli("runs", "show", trusted[:2])
    assert code == 2 and "ambiguous" in err and trusted in err and runs["secure"] in err
    code, out, _ = cli("runs", "list", "--json")
    listed = json.loads(out)
    every = admin.ListRuns(pb.ListRunsRequest(page_size=500), timeout=30)  # (fuzzed BeginRuns add runs)
    assert not every.next_page_token
    newest = max(every.runs, key=lambda r: (r.created, r.run_id)).run_id
    assert {r["run_id"]: [s["site"] for s in r["sites"]] for r in listed}[trusted] == ["site-0", "site-1"]
    code, out, _ = cli("runs", "show", "latest", "--json")
    assert code == 0 and json.loads(out)["run_id"] == newest
    code, out, _ = cli("runs", "list")
    assert "SITES" in out.splitlines()[0] and "site-0,site-1" in out
    code, out, _ = cli("runs", "show", trusted)  # what deploy/README.md says: sites, weights, metrics, artefacts
    sections = out.split("\n\n")
    assert code == 0 and [s.splitlines()[0] for s in sections[1:]] == ["sites", "weights", "metrics", "artefacts"]
    assert "site-1" in sections[2] and "merged" in sections[3] and "model/model.safetensors" in sections[4]
    code, _, err = cli("models", "export", trusted[:-1], "--out", "/proc/x/model")
    assert code == 2 and "cannot write --out '/proc/x/model'" in err and "Traceback" not in err


def test_cli_never_hangs_and_closes_its_channels(server, capsys):
    srv, _ = server
    def python_threads() -> int:  # gRPC's C threads that ran Python code stay listed as dummies: not channels
        return sum(1 for t in threading.enumerate() if not isinstance(t, threading._DummyThread))

    before = python_threads()
    started = time.monotonic()
    for _ in range(40):
        assert admin_cli.main([*_connection(srv), "runs", "show", "nope"]) == 3
    assert "NOT_FOUND" in capsys.readouterr().err
    assert time.monotonic() - started < 60
    deadline = time.monotonic() + 30
    while python_threads() > before + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert python_threads() <= before + 2  # no channel left open
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDDEM_ADMIN_")} | srv.env
    procs = [subprocess.Popen([sys.executable, "-m", "feddem.server.admin_cli", "runs", "show", "nope"], env=env,
                              cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(5)]
    try:
        assert [p.wait(timeout=120) for p in procs] == [3] * 5
    finally:
        for p in procs:
            p.kill()
    assert admin_cli.main([*_connection(srv), "--timeout", "0.001", "runs", "list"]) == 6  # DEADLINE_EXCEEDED


def test_artefact_names_that_clash_as_file_and_folder_are_invalid(server):
    srv, runs = server
    recorder = admin_pb2_grpc.RecorderServiceStub(srv.channel())

    def put(name):
        header = pb.ArtefactHeader(run_id=runs["open"], name=name, kind="report", size=1)
        return recorder.PutArtefact(iter([pb.PutArtefactRequest(header=header), pb.PutArtefactRequest(data=b"x")]),
                                    timeout=30)

    assert put("clash").size == 1 and put("nest/b").size == 1
    for name in ("clash/b", "nest"):
        with pytest.raises(grpc.RpcError) as exc:
            put(name)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "both a file and a folder" in \
            exc.value.details()
