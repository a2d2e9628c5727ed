"""End to end: a real `feddem server` on 127.0.0.1, a real simulation (3 sites, plain aggregation, --keep-pool) that
records itself through the RecorderService, and every feddem-admin command against what it recorded."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from feddem.common.vector_io import load_vector
from feddem.server.store import Store
from tests.admin_server import AdminServer, make_tls
from tests.conftest import simulate_cli
from tests.test_admin_api import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tiny_base):
    root = tmp_path_factory.mktemp("admin-e2e")
    srv = AdminServer(root / "store", make_tls(root / "tls"), root / "server.log").start()
    saved = {k: os.environ.get(k) for k in srv.env}
    os.environ.update(srv.env)  # the simulation's ServerApp records through the server
    try:
        report, result = simulate_cli(root / "run", "--sites", "3", "--aggregation", "plain", "--keep-pool",
                                      "--steps", "5", "--train-examples", "60", "--max-shard-size", "2MB")
    except BaseException:
        srv.stop()
        raise
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    code, out, err = run_cli(srv, "runs", "list", "--json")
    assert code == 0, err
    runs = json.loads(out)
    assert len(runs) == 1, runs
    try:
        yield srv, runs[0]["run_id"], root / "run", report, result
    finally:
        srv.stop()


def cli_json(srv, *args):
    code, out, err = run_cli(srv, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def model_params(folder) -> dict:
    """Every weight of a model folder (one file, or shards with an index)."""
    params = {}
    for f in sorted(folder.glob("*.safetensors")):
        params |= load_file(str(f))
    return params


def test_the_run_is_recorded_as_its_folder_says(recorded):
    srv, run_id, out, report, result = recorded
    assert f"as {run_id}" in result.stdout + result.stderr
    run = cli_json(srv, "runs", "show", run_id)
    assert (run["status"], run["kind"], run["aggregation"], run["remergeable"]) == ("finished", "federated",
                                                                                      "plain", True)
    assert run["out_dir"] == str(out.resolve()) and run["base_checksum"] == report["base_model"]["checksum"]
    stored = {a["name"]: a for a in run["artefacts"]}
    for f in (out / "model").iterdir():
        assert stored[f"model/{f.name}"]["size"] == f.stat().st_size
    assert {"aggregate.safetensors", "report.json", "sites/site-0.safetensors", "sites/site-1.safetensors",
            "sites/site-2.safetensors"} <= set(stored)
    sites = cli_json(srv, "runs", "sites", run_id)
    assert [(s["site"], s["domain"], s["tokens"], s["vector_stored"]) for s in sites] == [
        (s["site"], s["domain"], s["tokens"], True) for s in report["sites"]]
    weights = cli_json(srv, "runs", "weights", run_id)
    assert {w["site"]: w["weight"] for w in weights} == pytest.approx(report["weights"])
    metrics = cli_json(srv, "runs", "metrics", run_id)
    merged = {m["domain"]: m["value"] for m in metrics if m["stage"] == "merged" and m["name"] == "loss"}
    assert merged == pytest.approx({d: v["loss"] for d, v in report["eval"]["merged"].items()})
    code, table, _ = run_cli(srv, "runs", "sites", run_id)
    assert code == 0 and table.splitlines()[0].split()[:2] == ["SITE", "DOMAIN"] and "site-2" in table
    status = cli_json(srv, "status", "--verify")
    assert status["runs_by_status"] == {"finished": 1} and status["problems"] == []
    assert Store(srv.store).verify() == []


def test_export_gives_the_runs_model(recorded, tmp_path):
    from transformers import AutoModelForCausalLM

    srv, run_id, out, _, _ = recorded
    exported = cli_json(srv, "models", "export", run_id, "--out", str(tmp_path / "model"))
    assert sorted(f["path"] for f in exported["files"]) == sorted(p.name for p in (out / "model").iterdir())
    assert "model.safetensors.index.json" in {f["path"] for f in exported["files"]}  # sharded (--max-shard-size)
    for f in (out / "model").iterdir():
        assert (tmp_path / "model" / f.name).read_bytes() == f.read_bytes()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "model").num_parameters() > 0


def test_remerge_from_the_stored_site_vectors(recorded, tmp_path):
    srv, run_id, out, report, _ = recorded
    same = ",".join(f"{s}={w!r}" for s, w in report["weights"].items())
    again = cli_json(srv, "models", "remerge", run_id, "--weights", same)
    assert (again["kind"], again["parent_run"], again["status"], again["weighting"]) == ("remerge", run_id,
                                                                                        "finished", "manual")
    cli_json(srv, "models", "export", again["run_id"], "--out", str(tmp_path / "same"))
    original, remerged = model_params(out / "model"), model_params(tmp_path / "same")
    assert original.keys() == remerged.keys()
    for name in original:
        torch.testing.assert_close(remerged[name], original[name], atol=1e-6, rtol=1e-5)

    only = cli_json(srv, "models", "remerge", run_id, "--weights", "site-1=1")
    assert {w["site"]: w["weight"] for w in only["weights"]} == {"site-0": 0.0, "site-1": 1.0, "site-2": 0.0}
    cli_json(srv, "models", "export", only["run_id"], "--out", str(tmp_path / "only"))
    base = model_params(type(out)(report["base_model"]["ref"]))
    d1 = load_vector(out / "pool" / "site-1.safetensors")
    got = model_params(tmp_path / "only")
    for name, delta in d1.items():
        key = name if name in got else next(k for k in got if k.endswith(name))
        torch.testing.assert_close(got[key], base[key] + delta, atol=1e-6, rtol=1e-5)
    models = {m["run_id"]: m for m in cli_json(srv, "models", "list")}
    assert models[only["run_id"]]["parent_run"] == run_id and not models[only["run_id"]]["remergeable"]
    code, _, err = run_cli(srv, "models", "remerge", run_id, "--weights", "site-1=2")
    assert code == 2 and "weight-max" in err


def test_evaluate_on_data_the_server_holds(recorded):
    srv, run_id, _, report, _ = recorded
    got = cli_json(srv, "evaluate", run_id)
    losses = {r["domain"]: r["loss"] for r in got["results"]}
    for domain, entry in report["eval"]["merged"].items():  # the sites' own test splits, evaluated at the sites
        assert losses[domain] == pytest.approx(entry["loss"], abs=1e-4)
    stages = {m["stage"] for m in cli_json(srv, "runs", "metrics", run_id)}
    assert "server:synthetic" in stages


def test_pool_ranks_candidate_mixtures(recorded):
    srv, run_id, _, _, _ = recorded
    pools = cli_json(srv, "pool", "list")
    assert [(p["run_id"], p["sites"]) for p in pools] == [(run_id, ["site-0", "site-1", "site-2"])]
    ranked = cli_json(srv, "pool", "rank", run_id, "--candidates", "site-0;site-0,site-1", "--data",
                      "synthetic:arithmetic")
    rows = ranked["ranking"]
    assert sorted(tuple(r["sites"]) for r in rows) == [("site-0",), ("site-0", "site-1")]
    assert rows[0]["mean_loss"] <= rows[1]["mean_loss"] and set(rows[0]["loss"]) == {"arithmetic"}
    code, table, _ = run_cli(srv, "pool", "rank", run_id, "--candidates", "site-2", "--data", "synthetic:prose")
    assert code == 0 and "site-2" in table
