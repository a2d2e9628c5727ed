"""The ServerApp's recording hook (server/admin/recorder.py) with a local store: a finished run's outputs, a failed
run's reason, a run that records nothing when nothing is configured, and an unreachable server stopping a run early."""

import json

import pytest

from feddem.common.errors import FeddemError
from feddem.server.admin.recorder import output_files, recorded
from feddem.server.store import Store
from feddem.server.workflow import RunResult
from tests.test_store import report


def run_folder(tmp_path, aggregation="plain"):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "pool").mkdir()
    (out / "model" / "config.json").write_text("{}")
    (out / "model" / "model.safetensors").write_bytes(b"weights")
    (out / "aggregate.safetensors").write_bytes(b"sum")
    (out / "pool" / "site-0.safetensors").write_bytes(b"d0")
    rep = report() | {"aggregation": aggregation}
    (out / "report.json").write_text(json.dumps(rep))
    return out, rep


@pytest.fixture
def local_store(tmp_path, monkeypatch):
    for var in ("FEDDEM_ADMIN_SERVER", "FEDDEM_ADMIN_TOKEN", "FEDDEM_ADMIN_CA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("FEDDEM_STORE", str(tmp_path / "store"))
    return tmp_path / "store"


def test_a_finished_run_is_recorded_with_its_outputs(tmp_path, local_store):
    out, rep = run_folder(tmp_path)
    result = recorded({"aggregation": "plain"}, 42, lambda: RunResult(out, rep))
    assert result.out_dir == out
    store = Store(local_store)
    (run,) = store.list_runs()
    got = store.get_run(run["run_id"])
    assert (got["status"], got["flower_run_id"], got["out_dir"]) == ("finished", 42, str(out))
    assert sorted(a["name"] for a in got["artefacts"]) == [
        "aggregate.safetensors", "model/config.json", "model/model.safetensors", "report.json",
        "sites/site-0.safetensors"]
    assert b"".join(store.read_artefact(run["run_id"], "model/model.safetensors")) == b"weights"


def test_a_secure_runs_vectors_never_reach_the_store(tmp_path):
    out, rep = run_folder(tmp_path, aggregation="secure")
    kinds = {kind for _, kind, _ in output_files(out, rep)}
    assert kinds == {"model", "aggregate", "report"}


def test_a_failed_run_is_recorded_with_its_reason(local_store):
    def failing():
        raise FeddemError("no site succeeded")

    with pytest.raises(FeddemError, match="no site"):
        recorded({}, 1, failing)
    (run,) = Store(local_store).list_runs()
    assert run["status"] == "failed" and "no site succeeded" in run["reason"] and not run["has_model"]


def test_nothing_is_recorded_unless_configured(tmp_path, monkeypatch):
    for var in ("FEDDEM_STORE", "FEDDEM_ADMIN_SERVER"):
        monkeypatch.delenv(var, raising=False)
    out, rep = run_folder(tmp_path)
    assert recorded({}, 1, lambda: RunResult(out, rep)).out_dir == out
    assert not (tmp_path / "store").exists()


def test_an_unreachable_server_stops_the_run_before_it_starts(tmp_path, monkeypatch):
    from tests.processes import free_ports

    monkeypatch.delenv("FEDDEM_STORE", raising=False)
    monkeypatch.setenv("FEDDEM_ADMIN_SERVER", f"127.0.0.1:{free_ports(1)[0]}")
    monkeypatch.setenv("FEDDEM_ADMIN_TOKEN", "x" * 20)
    started = []
    with pytest.raises(FeddemError, match="cannot record the run"):
        recorded({}, 1, lambda: started.append(1))
    assert not started
