"""Crash consistency: `feddem server` is killed (SIGKILL) while a run's artefact is streaming in; after a restart the
store opens, every checksum verifies, the run is failed (interrupted) with only its complete artefacts, and the runs
finished before the crash are intact."""

import json
import sqlite3
import threading
import time

import grpc

from feddem.admin.v1 import admin_pb2 as pb
from feddem.admin.v1 import admin_pb2_grpc
from feddem.server.admin.recorder import RemoteRecorder
from tests.admin_server import AdminServer, make_tls
from tests.test_store import report


def test_a_killed_server_leaves_a_consistent_store(tmp_path):
    tls = make_tls(tmp_path / "tls")
    srv = AdminServer(tmp_path / "store", tls, tmp_path / "server.log").start()
    small = tmp_path / "report.json"
    small.write_text(json.dumps(report()))
    try:
        recorder = RemoteRecorder(srv.address, srv.token, tls.ca)
        done = recorder.begin({"aggregation": "plain"})
        recorder.put_file(done, "report.json", "report", small)
        recorder.finish(done, report())
        run = recorder.begin({"aggregation": "plain"})
        recorder.put_file(run, "report.json", "report", small)

        def slow_upload():
            yield pb.PutArtefactRequest(header=pb.ArtefactHeader(run_id=run, name="model/model.safetensors",
                                                                 kind="model", size=200 << 20))
            for _ in range(3200):
                yield pb.PutArtefactRequest(data=b"\0" * (64 << 10))
                time.sleep(0.01)

        outcome = {}

        def upload():
            try:
                recorder.stub.PutArtefact(slow_upload(), timeout=120)
                outcome["code"] = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                outcome["code"] = exc.code()

        thread = threading.Thread(target=upload, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not list((srv.store / "artefacts").rglob("*.tmp")):  # the server is writing the file
            assert time.monotonic() < deadline and thread.is_alive(), "the upload never reached the store"
            time.sleep(0.05)
        srv.kill()
        thread.join(timeout=60)
        assert outcome["code"] != grpc.StatusCode.OK

        srv.start()
        admin = admin_pb2_grpc.AdminServiceStub(srv.channel())
        got = admin.GetRun(pb.GetRunRequest(run_id=run), timeout=30)
        assert got.status == "failed" and got.reason.startswith("interrupted"), got
        assert [a.name for a in got.artefacts] == ["report.json"]
        assert admin.GetRun(pb.GetRunRequest(run_id=done), timeout=30).status == "finished"
        status = admin.GetStatus(pb.GetStatusRequest(verify=True), timeout=30)
        assert status.problems == [] and dict(status.runs_by_status) == {"failed": 1, "finished": 1}
        assert not list((srv.store / "artefacts").rglob("*.tmp"))  # the half-written file is gone
        assert sqlite3.connect(srv.store / "store.db").execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        try:  # an interrupted run takes no more records
            RemoteRecorder(srv.address, srv.token, tls.ca).put_file(run, "late.json", "report", small)
            raise AssertionError("an interrupted run accepted an artefact")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        srv.stop()
