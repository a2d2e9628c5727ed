"""The admin API of a real `feddem server` (127.0.0.1, a free port) under fuzzing and abuse: a few hundred calls with
random bytes, mutated messages and hostile field values to every RPC (no INTERNAL, no hang, the server still
answers, the store still verifies and shows every run); calls that send a header and stall, or trickle forever
(ended by the server's idle and call limits while it keeps serving); and a second server on a port in use."""

import collections
import json
import os
import random
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest

from feddem.admin.v1 import admin_pb2 as pb
from feddem.server.store import Store
from tests.admin_server import ROOT, AdminServer, make_tls
from tests.test_store import report

SERVICES = [pb.DESCRIPTOR.services_by_name[name] for name in ("AdminService", "RecorderService")]
METHODS = [(s, m) for s in SERVICES for m in s.methods]
CALLS = int(os.environ.get("FEDDEM_FUZZ_CALLS", "300"))
SEED = int(os.environ.get("FEDDEM_FUZZ_SEED", "1915"))
IDLE, CALL = 2.0, 6.0  # the server's limits in these tests (seconds)
CALL_TIMEOUT = 120.0  # a fuzzed call slower than this is a hang


def _start(root, call_limit: float):
    """A server with a short idle limit over a store with a finished run (a model) and an open run."""
    store = Store(root / "store")
    finished = store.begin_run({"aggregation": "plain", "weighting": "uniform"}, flower_run_id=3)
    store.put_artefact(finished, "model/config.json", "model", [b'{"model_type": "llama"}'])
    store.put_artefact(finished, "model/model.safetensors", "model", [b"not a tensor file"])
    store.finish_run(finished, report())
    running = store.begin_run({"aggregation": "secure"})
    store.close()
    (root / "data" / "eval").mkdir(parents=True)
    srv = AdminServer(root / "store", make_tls(root / "tls"), root / "server.log",
                      extra=["--idle-timeout", str(IDLE), "--call-timeout", str(call_limit),
                             "--data-root", str(root / "data")]).start()
    return srv, {"finished": finished, "running": running}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """For fuzzing: the default call limit (a call that loads a model may take a while on a busy machine)."""
    srv, runs = _start(tmp_path_factory.mktemp("admin-fuzz"), 600.0)
    try:
        yield srv, runs
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """For stalls: a call limit of CALL seconds."""
    srv, runs = _start(tmp_path_factory.mktemp("admin-stall"), CALL)
    try:
        yield srv, runs
    finally:
        srv.stop()


def call(channel, method, payload, timeout=CALL_TIMEOUT):
    """Raw request bytes (a list of them for a client stream); returns (status, details, seconds)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    started = time.monotonic()
    try:
        if method.client_streaming:
            channel.stream_unary(path)(iter(payload), timeout=timeout)
        elif method.server_streaming:
            for _ in channel.unary_stream(path)(payload, timeout=timeout):
                pass
        else:
            channel.unary_unary(path)(payload, timeout=timeout)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
    return code, details, time.monotonic() - started


# -- hostile values ----------------------------------------------------------------------------------------------


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def strings(rng: random.Random, runs: dict) -> str:
    ids = list(runs.values())
    choices = [
        "", "latest", rng.choice(ids), rng.choice(ids)[:rng.randint(1, 12)], "../store.db", "a/../../etc",
        "x" * rng.choice([129, 16_000, 100_000]), "\x00\x01\x7f", "é" * 200, "synthetic", "synthetic:nope",
        "/etc", "/proc/self", "eval", "../../..", "1", "site-0,site-1;site-0", "9999999999",
        _deep(rng.choice([20, 5000])), '{"a": ' * 30 + "1" + "}" * 30, '{"n": ' + "9" * rng.choice([20, 5000]) + "}",
        '{"x": NaN}', '{"x": 1e999}', json.dumps({"aggregation": "plain", "pad": "p" * rng.choice([10, 70_000])}),
        json.dumps(report() | {"rounds": [{"round": 2**40, "weights": {"site-0": 1.0}}]}),
        json.dumps(report() | {"sites": [{"site": "s", "domain": "d", "examples": 2**70, "tokens": 1,
                                          "heldout_examples": 1, "train_loss": 1.0}]}),
        json.dumps(report()), "fd", "fd/b", "model/x", "0" * 64, "host:1:2",
    ]
    return rng.choice(choices)


def value(rng: random.Random, field, runs: dict):
    kind = field.type
    if kind == field.TYPE_STRING:
        return strings(rng, runs)
    if kind == field.TYPE_BYTES:
        return rng.randbytes(rng.choice([0, 1, 100, 70_000]))
    if kind == field.TYPE_BOOL:
        return rng.random() < 0.5
    if kind in (field.TYPE_DOUBLE, field.TYPE_FLOAT):
        return rng.choice([0.0, -0.0, 0.5, -1.0, 1e308, float("nan"), float("inf"), float("-inf"), 2.0])
    if kind in (field.TYPE_UINT64, field.TYPE_FIXED64):
        return rng.choice([0, 1, 2**40, 2**64 - 1])
    if kind in (field.TYPE_UINT32, field.TYPE_FIXED32):
        return rng.choice([0, 1, 2**32 - 1])
    return rng.choice([0, 1, -1, 2**31 - 1, -(2**31)] if field.cpp_type == field.CPPTYPE_INT32
                      else [0, 1, -1, 2**40, 2**63 - 1, -(2**63), 1 << 20])


def message(rng: random.Random, cls, runs: dict):
    """A message of `cls` with hostile values in a random subset of its fields (nested messages filled alike)."""
    msg = cls()
    for field in cls.DESCRIPTOR.fields:
        if rng.random() < 0.3:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target = getattr(msg, field.name)
            for _ in range(rng.choice([1, 1, 3])):
                key, val = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
                target[value(rng, key, runs)] = value(rng, val, runs)
        elif field.message_type is not None:
            if field.containing_oneof is not None and msg.WhichOneof(field.containing_oneof.name):
                continue
            getattr(msg, field.name).CopyFrom(message(rng, getattr(pb, field.message_type.name), runs))
        elif field.containing_oneof is not None and msg.WhichOneof(field.containing_oneof.name):
            continue
        else:
            setattr(msg, field.name, value(rng, field, runs))
    return msg


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(buf) + 1)
        op = rng.randrange(4)
        if op == 0 and buf:
            buf[at % len(buf)] = rng.randrange(256)
        elif op == 1:
            buf.insert(at, rng.randrange(256))
        elif op == 2 and buf:
            del buf[at % len(buf)]
        else:
            del buf[at:]
    return bytes(buf)


def payload(rng: random.Random, method, runs: dict):
    """Request bytes for `method`: random bytes, a hostile message, or a mutated one (a list for a client stream:
    header and data parts in orders good and bad)."""
    request_cls = getattr(pb, method.input_type.name)

    def one():
        roll = rng.random()
        if roll < 0.2:
            return rng.randbytes(rng.randint(0, 300))
        data = message(rng, request_cls, runs).SerializeToString()
        return mutate(rng, data) if roll < 0.4 else data

    if not method.client_streaming:
        return one()
    parts = []
    if rng.random() < 0.7:
        header = pb.ArtefactHeader(run_id=rng.choice([runs["running"], runs["finished"], strings(rng, runs)]),
                                   name=rng.choice(["fd", "fd/b", "model/w.bin", strings(rng, runs)]),
                                   kind=rng.choice(["report", "model", "movie"]), size=rng.choice([0, 3, 10, -1]))
        parts.append(pb.PutArtefactRequest(header=header).SerializeToString())
    parts += [one() if rng.random() < 0.3 else pb.PutArtefactRequest(data=b"abc").SerializeToString()
              for _ in range(rng.randint(0, 4))]
    return parts


def test_fuzzing_every_method(server):
    srv, runs = server
    rng = random.Random(SEED)
    channel = srv.channel()
    codes, slowest, internal = collections.Counter(), (0.0, ""), []
    try:
        for i in range(CALLS):
            service, method = rng.choice(METHODS)
            code, details, seconds = call(channel, method, payload(rng, method, runs))
            codes[code.name] += 1
            slowest = max(slowest, (seconds, method.name))
            if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED):
                internal.append((i, method.name, code.name, details[:300]))
            assert len(details) <= 1000, (method.name, len(details))
        print(f"\nfuzz: {CALLS} calls (seed {SEED}), status codes {dict(codes.most_common())}, slowest "
              f"{slowest[0]:.2f} s ({slowest[1]})")
        assert not internal, internal
        assert srv.alive()
        # the server still answers, the store verifies, and everything stored can be shown
        stub_status = call(channel, pb.DESCRIPTOR.services_by_name["AdminService"].methods_by_name["GetStatus"],
                           pb.GetStatusRequest(verify=True).SerializeToString())
        assert stub_status[0] == grpc.StatusCode.OK, stub_status
        from feddem.admin.v1 import admin_pb2_grpc

        admin = admin_pb2_grpc.AdminServiceStub(channel)
        assert admin.GetStatus(pb.GetStatusRequest(verify=True), timeout=30).problems == []
        token, listed = "", []
        while True:
            page = admin.ListRuns(pb.ListRunsRequest(page_token=token, page_size=7), timeout=30)
            listed += [r.run_id for r in page.runs]
            token = page.next_page_token
            if not token:
                break
        for run_id in listed:
            admin.GetRun(pb.GetRunRequest(run_id=run_id), timeout=30)
        admin.ListModels(pb.ListModelsRequest(), timeout=30)
    finally:
        channel.close()


def test_a_stored_model_that_cannot_be_loaded_is_a_failed_precondition(server):
    """Found by fuzzing (seed 7, 1500 calls): a model file that is not a safetensors file was INTERNAL."""
    srv, runs = server
    from feddem.admin.v1 import admin_pb2_grpc

    with srv.channel() as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.RpcError) as exc:
            admin.EvaluateModel(pb.EvaluateModelRequest(run_id=runs["finished"], data="synthetic:arithmetic"),
                                timeout=120)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "cannot be loaded" in exc.value.details()


# -- stalls and limits -------------------------------------------------------------------------------------------


def _stalled(first: list, release: threading.Event):
    """A request stream that sends `first` and then waits (a client that stalls after its header)."""
    yield from first
    release.wait(60)


def test_stalled_calls_are_ended_and_the_server_keeps_serving(short):
    srv, runs = short
    from feddem.admin.v1 import admin_pb2_grpc

    release = threading.Event()
    channels = [srv.channel() for _ in range(3)]  # each connection takes 16 calls at once
    header = pb.PutArtefactRequest(header=pb.ArtefactHeader(run_id=runs["running"], name="stalled.bin",
                                                            kind="report", size=10))
    get_run = "/feddem.admin.v1.AdminService/GetRun"
    put = "/feddem.admin.v1.RecorderService/PutArtefact"
    try:
        started = time.monotonic()
        stalls = [channels[i % 2].stream_unary(get_run).future(_stalled([], release), timeout=60)
                  for i in range(19)]  # a header, then nothing: more calls than the server has workers
        stalls.append(channels[0].stream_unary(put).future(_stalled([header.SerializeToString()], release),
                                                           timeout=60))
        admin = admin_pb2_grpc.AdminServiceStub(channels[2])
        assert admin.GetStatus(pb.GetStatusRequest(), timeout=IDLE * 4 + 10).version  # served meanwhile
        deadline = time.monotonic() + IDLE * 4 + 20
        while not all(f.done() for f in stalls) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(f.done() for f in stalls), f"{sum(not f.done() for f in stalls)} stalled calls were not ended"
        ended = {(f.exception().code(), "no progress" in f.exception().details()) for f in stalls}
        assert ended == {(grpc.StatusCode.DEADLINE_EXCEEDED, True)}, ended
        assert time.monotonic() - started < IDLE * 4 + 20
        # the stalled upload left nothing: its name is free, and no temporary file is left
        recorder = admin_pb2_grpc.RecorderServiceStub(channels[2])
        done = recorder.PutArtefact(iter([header, pb.PutArtefactRequest(data=b"0123456789")]), timeout=30)
        assert done.size == 10
        assert not list((srv.store / "artefacts").rglob("*.tmp"))

        def trickle():  # never idle, but longer than the call limit
            yield pb.PutArtefactRequest(header=pb.ArtefactHeader(run_id=runs["running"], name="slow.bin",
                                                                 kind="report", size=1000)).SerializeToString()
            for _ in range(1000):
                if release.wait(0.5):
                    return
                yield pb.PutArtefactRequest(data=b"x").SerializeToString()

        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as exc:
            channels[1].stream_unary(put)(trickle(), timeout=60)
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "longer than" in exc.value.details()
        assert CALL - 1 < time.monotonic() - t0 < CALL + 10
        assert admin.GetStatus(pb.GetStatusRequest(verify=True), timeout=30).problems == []
    finally:
        release.set()
        for c in channels:
            c.close()


# -- a port in use -----------------------------------------------------------------------------------------------


def test_a_second_server_on_a_port_in_use_refuses_to_start(short, tmp_path):
    srv, _ = short
    tls = srv.tls
    token = tmp_path / "token"
    token.write_text(srv.token)
    p = subprocess.run([sys.executable, "-m", "feddem.server.cli", "server", "--store", str(tmp_path / "other"),
                        "--address", srv.address, "--cert", str(tls.cert), "--key", str(tls.key), "--token-file",
                        str(token)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 2 and "in use" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "other").exists()  # refused before the store was created
    assert srv.alive()


def test_grpc_option_keeps_a_second_server_off_a_port():
    """Without SO_REUSEPORT a second gRPC server cannot bind a port a first one serves (which gRPC's default allows:
    the check below shows both, so it can fail)."""
    from feddem.server.admin.serve import server_options
    from tests.processes import free_ports

    address = f"127.0.0.1:{free_ports(1)[0]}"
    first = grpc.server(futures.ThreadPoolExecutor(1))
    assert first.add_insecure_port(address)
    first.start()
    try:
        shared = grpc.server(futures.ThreadPoolExecutor(1))
        assert shared.add_insecure_port(address)  # gRPC's default: the port is shared
        shared.stop(None)
        ours = grpc.server(futures.ThreadPoolExecutor(1), options=server_options())
        try:
            bound = ours.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        assert bound == 0
    finally:
        first.stop(None)
