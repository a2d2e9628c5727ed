"""The run store on its own: records, atomic checksummed artefacts, migrations, crash leftovers, interrupted runs."""

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from feddem.server.store import Store, site_vector_name
from feddem.server.store.errors import AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument, NotFound
from feddem.server.store.owner import current_owner
from feddem.server.store.schema import MIGRATIONS, SCHEMA_VERSION


def report(sites=("site-0", "site-1"), weights=None) -> dict:
    """A report shaped like server/report.py's."""
    domains = {s: f"dom{i}" for i, s in enumerate(sites)}
    weights = weights or {s: 1 / len(sites) for s in sites}
    entry = {"loss": 1.0, "perplexity": 2.718}
    return {
        "config": {"aggregation": "plain"},
        "base_model": {"ref": "/nowhere", "checksum": "ab" * 32, "parameters": 123},
        "aggregation": "plain",
        "sites": [{"site": s, "domain": d, "examples": 10, "tokens": 100, "heldout_examples": 4, "train_loss": 1.5}
                  for s, d in domains.items()],
        "weights": weights,
        "eval": {"unit": "nats per token", **{stage: {d: entry for d in domains.values()}
                                               for stage in ("base", "local", "merged")}},
        "failures": {},
        "timings": {"total": 1.0},
    }


def test_a_run_from_begin_to_finish(tmp_path):
    store = Store(tmp_path)
    run = store.begin_run({"aggregation": "plain", "weighting": "uniform"}, flower_run_id=2**64 - 1)
    assert store.get_run(run)["status"] == "running"
    data = os.urandom(3 * (1 << 20) + 5)  # several chunks
    a = store.put_artefact(run, "model/model.safetensors", "model", [data[:1000], data[1000:]])
    assert a["size"] == len(data) and a["sha256"] == hashlib.sha256(data).hexdigest()
    store.put_artefact(run, site_vector_name("site-0"), "site-vector", [b"v0"])
    store.put_artefact(run, "aggregate.safetensors", "aggregate", [b"agg"])
    store.finish_run(run, report(), out_dir="/runs/x")
    got = store.get_run(run)
    assert got["status"] == "finished" and got["flower_run_id"] == 2**64 - 1 and got["out_dir"] == "/runs/x"
    assert [s["site"] for s in got["sites"]] == ["site-0", "site-1"]
    assert [s["vector_stored"] for s in got["sites"]] == [True, False]
    assert {(w["site"], w["weight"]) for w in got["weights"]} == {("site-0", 0.5), ("site-1", 0.5)}
    assert len(got["metrics"]) == 3 * 2 * 2  # stages x domains x (loss, perplexity)
    assert got["has_model"] and got["remergeable"]
    assert b"".join(store.read_artefact(run, "model/model.safetensors")) == data
    assert store.status(verify=True)["problems"] == []
    with pytest.raises(FailedPrecondition, match="finished"):
        store.put_artefact(run, "late.bin", "report", [b"x"])
    with pytest.raises(FailedPrecondition):
        store.fail_run(run, "too late")


def test_weights_of_every_round(tmp_path):
    store = Store(tmp_path)
    run = store.begin_run({})
    r = report()
    r["rounds"] = [{"round": 1, "weights": {"site-0": 0.5, "site-1": 0.5}},
                   {"round": 2, "weights": {"site-0": 0.7, "site-1": 0.3}}]
    store.finish_run(run, r)
    got = store.get_run(run)
    assert [(w["round"], w["site"], w["weight"]) for w in got["weights"]] == [
        (1, "site-0", 0.5), (1, "site-1", 0.5), (2, "site-0", 0.7), (2, "site-1", 0.3)]
    assert {m["round"] for m in got["metrics"]} == {2}


def test_records_survive_reopening(tmp_path):
    store = Store(tmp_path)
    run = store.begin_run({})
    store.put_artefact(run, "report.json", "report", [b"{}"])
    store.finish_run(run, report())
    store.close()
    again = Store(tmp_path)
    assert again.get_run(run)["status"] == "finished"
    assert b"".join(again.read_artefact(run, "report.json")) == b"{}"


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../../b", ".hidden", "a//b", "x" * 200, "a/b/c/d/e",
                                  "sp ace", "", "model/.x.tmp", "é"])
def test_bad_artefact_names_are_refused(tmp_path, name):
    store = Store(tmp_path)
    run = store.begin_run({})
    with pytest.raises(InvalidArgument):
        store.put_artefact(run, name, "model", [b"x"])
    assert store.artefacts(run) == [] and not any(p.is_file() for p in (tmp_path / "artefacts").rglob("*"))


def test_announced_size_and_checksum_must_match(tmp_path):
    store = Store(tmp_path)
    run = store.begin_run({})
    with pytest.raises(InvalidArgument, match="announced"):
        store.put_artefact(run, "a.bin", "report", [b"abc"], size=4)
    with pytest.raises(InvalidArgument, match="more bytes"):
        store.put_artefact(run, "a.bin", "report", [b"abcde"], size=4)
    with pytest.raises(InvalidArgument, match="sha256"):
        store.put_artefact(run, "a.bin", "report", [b"abc"], size=3, sha256="00" * 32)
    with pytest.raises(InvalidArgument, match="kind"):
        store.put_artefact(run, "a.bin", "weights", [b"abc"])
    assert store.artefacts(run) == []
    assert not [p for p in (tmp_path / "artefacts").rglob("*") if p.is_file()]  # no file, no temporary


def test_an_artefact_is_written_once(tmp_path):
    store = Store(tmp_path)
    run = store.begin_run({})
    store.put_artefact(run, "report.json", "report", [b"first"])
    with pytest.raises(AlreadyExists):
        store.put_artefact(run, "report.json", "report", [b"second"])
    assert b"".join(store.read_artefact(run, "report.json")) == b"first"


def test_a_run_that_ends_while_an_artefact_streams_does_not_record_it(tmp_path):
    store = Store(tmp_path)
    run = store.begin_run({})

    def chunks():
        yield b"half"
        store.fail_run(run, "stopped meanwhile")
        yield b"rest"

    with pytest.raises(FailedPrecondition):
        store.put_artefact(run, "model/model.safetensors", "model", chunks())
    assert store.artefacts(run) == [] and not [p for p in (tmp_path / "artefacts").rglob("*") if p.is_file()]


def test_a_failing_writer_leaves_nothing(tmp_path):
    store = Store(tmp_path)
    run = store.begin_run({})

    def chunks():
        yield b"part"
        raise OSError("connection lost")

    with pytest.raises(OSError):
        store.put_artefact(run, "model/model.safetensors", "model", chunks())
    assert store.artefacts(run) == [] and not [p for p in tmp_path.rglob("*.tmp")]


def test_a_changed_file_does_not_verify(tmp_path):
    store = Store(tmp_path)
    run = store.begin_run({})
    store.put_artefact(run, "aggregate.safetensors", "aggregate", [b"x" * 100])
    store.finish_run(run, report())
    path = store.files.path(run, "aggregate.safetensors")
    path.write_bytes(b"y" * 100)
    with pytest.raises(DataLoss, match="does not verify"):
        b"".join(store.read_artefact(run, "aggregate.safetensors"))
    assert len(store.status(verify=True)["problems"]) == 1
    path.unlink()
    with pytest.raises(DataLoss, match="missing"):
        b"".join(store.read_artefact(run, "aggregate.safetensors"))


def test_unknown_runs_and_artefacts(tmp_path):
    store = Store(tmp_path)
    for call in (lambda: store.get_run("nope"), lambda: store.finish_run("nope", report()),
                 lambda: store.fail_run("nope", "x"), lambda: store.put_artefact("nope", "a", "model", [b""]),
                 lambda: store.artefact("nope", "a")):
        with pytest.raises(NotFound):
            call()


@pytest.mark.parametrize("broken", [
    lambda r: r.pop("sites"),
    lambda r: r["sites"][0].pop("tokens"),
    lambda r: r["sites"][0].update(tokens="many"),
    lambda r: r["sites"][0].update(examples=1.5),
    lambda r: r.update(weights={"site-0": float("nan")}),
    lambda r: r.update(weights=[1, 2]),
    lambda r: r["eval"]["merged"]["dom0"].update(loss="low"),
    lambda r: r.pop("base_model"),
])
def test_a_malformed_report_changes_nothing(tmp_path, broken):
    store = Store(tmp_path)
    run = store.begin_run({})
    bad = report()
    broken(bad)
    with pytest.raises(InvalidArgument):
        store.finish_run(run, bad)
    got = store.get_run(run)
    assert got["status"] == "running" and got["sites"] == [] and got["weights"] == [] and got["metrics"] == []


def test_a_duplicate_site_rolls_the_whole_report_back(tmp_path):
    store = Store(tmp_path)
    run = store.begin_run({})
    bad = report()
    bad["sites"].append(dict(bad["sites"][0]))
    with pytest.raises(InvalidArgument, match="twice"):
        store.finish_run(run, bad)
    got = store.get_run(run)
    assert got["status"] == "running" and got["sites"] == [] and got["weights"] == []


def test_schema_is_migrated_and_a_newer_one_refused(tmp_path):
    Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / "store.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} >= {
        "runs", "sites", "rounds", "weights", "metrics", "artefacts"}
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(FailedPrecondition, match="newer"):
        Store(tmp_path)


def test_stray_temporaries_are_removed_on_open(tmp_path):
    """Those of ended runs go; those of a run another live process is writing stay (it may be mid-write)."""
    store = Store(tmp_path)
    run, live = store.begin_run({}), store.begin_run({})
    store.put_artefact(run, "model/config.json", "model", [b"{}"])
    store.fail_run(run, "crashed")
    store.close()
    stray = tmp_path / "artefacts" / run / "model" / ".model.safetensors.abcd1234.tmp"
    writing = tmp_path / "artefacts" / live / ".aggregate.safetensors.0123abcd.tmp"
    for p in (stray, writing):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"half a file")
    Store(tmp_path)
    assert not stray.exists() and (tmp_path / "artefacts" / run / "model" / "config.json").exists()
    assert writing.exists()


def test_a_run_whose_writer_died_is_marked_interrupted(tmp_path):
    """A process begins a run and dies without finishing it: the next store to open marks it failed."""
    code = textwrap.dedent(f"""
        import os
        from feddem.server.store import Store
        store = Store({str(tmp_path)!r})
        run = store.begin_run({{"aggregation": "plain"}})
        store.put_artefact(run, "aggregate.safetensors", "aggregate", [b"x" * 10])
        print(run, flush=True)
        os._exit(9)  # no finish, no fail, no close
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    run = out.stdout.strip()
    assert out.returncode == 9 and run, out.stderr
    store = Store(tmp_path)
    got = store.get_run(run)
    assert got["status"] == "failed" and got["reason"].startswith("interrupted")
    assert store.status(verify=True)["problems"] == []
    assert [a["name"] for a in got["artefacts"]] == ["aggregate.safetensors"]


def test_a_run_whose_recording_process_died_is_marked_interrupted(tmp_path):
    """Recorded through a server (this process owns the store), written by another process that is gone."""
    dead = subprocess.run([sys.executable, "-c", "from server.store.owner import current_owner; "
                           "print(current_owner())"], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(__file__))).stdout.strip()
    store = Store(tmp_path)
    live = store.begin_run({}, writer=current_owner())
    run = store.begin_run({}, writer=dead)
    assert store.get_run(run)["status"] == "failed" and store.get_run(live)["status"] == "running"
    with pytest.raises(InvalidArgument, match="writer"):
        store.begin_run({}, writer="not an owner")


def test_a_store_of_schema_1_is_migrated(tmp_path):
    """A store written before the `writer` column gets it when opened, with its runs kept."""
    db = sqlite3.connect(tmp_path / "store.db")
    db.executescript(MIGRATIONS[0] + "PRAGMA user_version = 1;")
    db.execute("INSERT INTO runs (run_id, status, kind, owner, created, config_json) "
               "VALUES ('old', 'finished', 'federated', 'elsewhere:1:1', 1.0, '{}')")
    db.commit()
    db.close()
    store = Store(tmp_path)
    assert store.get_run("old")["status"] == "finished"
    assert sqlite3.connect(tmp_path / "store.db").execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.begin_run({}, writer=current_owner())


def test_a_live_writers_run_stays_running(tmp_path):
    store = Store(tmp_path)
    run = store.begin_run({})
    assert Store(tmp_path).get_run(run)["status"] == "running"  # this process is alive
    other = store.begin_run({}, owner="elsewhere:1:1")  # another host: cannot be checked, left as it is
    assert store.get_run(other)["status"] == "running"


def test_evaluations_are_added_as_metrics(tmp_path):
    store = Store(tmp_path)
    run = store.begin_run({})
    store.finish_run(run, report())
    store.add_metrics(run, "server:synthetic", {"dom0": {"loss": 0.5, "perplexity": 1.6, "tokens": 10}})
    got = [m for m in store.get_run(run)["metrics"] if m["stage"] == "server:synthetic"]
    assert {(m["round"], m["name"], m["value"]) for m in got} == {(0, "loss", 0.5), (0, "perplexity", 1.6)}
    assert json.loads(json.dumps(store.report(run)))["weights"] == {"site-0": 0.5, "site-1": 0.5}


# -- issue 15: what may enter, deletion, references, listings, permissions ----------------------------------------


@pytest.mark.parametrize("change", [
    lambda r: r | {"rounds": [{"round": 2**40, "weights": {"site-0": 1.0}}]},
    lambda r: r | {"rounds": [{"round": 0, "weights": {"site-0": 1.0}}]},
    lambda r: r | {"sites": [dict(r["sites"][0], examples=2**64)]},
    lambda r: r | {"sites": [dict(r["sites"][0], tokens=-1)]},
    lambda r: r | {"sites": [dict(r["sites"][0], site="x" * 129)]},
    lambda r: r | {"sites": [dict(r["sites"][0], domain="a\nb")]},
    lambda r: r | {"base_model": {"ref": "r", "checksum": "c", "parameters": 2**70}},
    lambda r: r | {"timings": {"deep": json.loads("[" * 40 + "]" * 40)}},
    lambda r: r | {"timings": {"nan": float("nan")}},
    lambda r: r | {"failures": {"big": "x" * (9 << 20)}},
    lambda r: r | {"weights": {f"s{i}": 0.1 for i in range(200_001)}},
])
def test_out_of_range_reports_are_refused(tmp_path, change):
    store = Store(tmp_path)
    run = store.begin_run({})
    with pytest.raises(InvalidArgument):
        store.finish_run(run, change(report()))
    assert store.get_run(run)["status"] == "running" and store.get_run(run)["weights"] == []


@pytest.mark.parametrize("config", [
    {"pad": "x" * (70 << 10)}, {"n": 2**64}, {"x": float("inf")}, {"deep": json.loads("[" * 20 + "]" * 20)},
    {"aggregation": "a" * 100}, ["not", "an", "object"],
])
def test_out_of_range_configs_are_refused(tmp_path, config):
    store = Store(tmp_path)
    with pytest.raises(InvalidArgument):
        store.begin_run(config)
    assert store.list_runs() == []


def test_validate_parses_json_within_its_bounds():
    from feddem.server.store.validate import parse_json, quote

    assert parse_json('{"a": [1, 2.5, "x"]}', "t", 100) == {"a": [1, 2.5, "x"]}
    # a report names its Flower run id, an unsigned 64-bit integer
    assert parse_json(f'{{"flower_run_id": {2**64 - 1}, "low": {-2**63}}}', "t", 100)["flower_run_id"] == 2**64 - 1
    for raw, word in (("[" * 100_000, "deep"), ('{"a": 1}', "bytes"), ("{", "not JSON"), ("NaN", "not JSON"),
                      ("1" * 5000, "not JSON"), (str(2**64), "64 bits")):
        with pytest.raises(InvalidArgument, match=word):
            parse_json(raw, "t", 7 if word == "bytes" else 1 << 20)
    assert quote("x" * 16_000).endswith("... (16000 characters)") and len(quote("x" * 16_000)) < 80


def test_artefact_names_that_clash_as_file_and_folder(tmp_path):
    store = Store(tmp_path)
    run = store.begin_run({})
    store.put_artefact(run, "fd", "report", [b"file"])
    with pytest.raises(InvalidArgument, match="both a file and a folder"):
        store.put_artefact(run, "fd/b", "report", [b"x"])
    store.put_artefact(run, "ga/b", "report", [b"x"])
    with pytest.raises(InvalidArgument, match="both a file and a folder"):
        store.put_artefact(run, "ga", "report", [b"x"])
    with pytest.raises(InvalidArgument, match="a part of its path is a file"):  # the files refuse it on their own
        store.files.write(run, "fd/c", [b"x"])
    assert [a["name"] for a in store.artefacts(run)] == ["fd", "ga/b"] and store.verify() == []


def test_a_deleted_run_is_gone_and_audited(tmp_path):
    store = Store(tmp_path)
    parent = store.begin_run({})
    store.put_artefact(parent, "model/m.bin", "model", [b"abc"])
    store.finish_run(parent, report())
    child = store.begin_run({}, kind="remerge", parent_run=parent)
    with pytest.raises(FailedPrecondition, match=child):
        store.delete_run(parent)
    store._writing.add((child, "x.bin"))  # an artefact streaming in
    with pytest.raises(FailedPrecondition, match="being written"):
        store.delete_run(child)
    store._writing.clear()
    assert store.delete_run(child, by="tester")["status"] == "running"
    assert store.delete_run(parent) == {"run_id": parent, "status": "finished", "artefacts": 1, "bytes": 3}
    assert store.list_runs() == [] and not (tmp_path / "artefacts" / parent).exists()
    for table in ("runs", "sites", "weights", "metrics", "rounds", "artefacts"):
        assert store._rows(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"] == 0, table
    assert [(a["action"], a["run_id"], a["detail"].get("by")) for a in store.audit()] == [
        ("delete", child, "tester"), ("delete", parent, "")]
    with pytest.raises(NotFound):
        store.delete_run(parent)
    (tmp_path / "artefacts" / ".deleted-x-1234").mkdir()  # a crash between rename and removal
    Store(tmp_path)
    assert list((tmp_path / "artefacts").iterdir()) == []


def test_run_references(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(NotFound, match="no runs yet"):
        store.resolve_run("latest")
    runs = [store.begin_run({}) for _ in range(3)]
    assert store.resolve_run(runs[1]) == runs[1] and store.resolve_run("latest") == max(
        store.list_runs(), key=lambda r: (r["created"], r["run_id"]))["run_id"]
    assert store.resolve_run(runs[2][:-1]) == runs[2] or runs[2][:-1] == runs[0][:-1]
    with pytest.raises(InvalidArgument, match="ambiguous") as exc:
        store.resolve_run(runs[0][:8])  # the same day
    assert all(r in str(exc.value) for r in runs)
    with pytest.raises(NotFound):
        store.resolve_run("19990101")


def test_listings_are_pages_of_summaries(tmp_path):
    store = Store(tmp_path)
    runs = [store.begin_run({"aggregation": "plain", "i": i}) for i in range(5)]
    store.finish_run(runs[0], report())
    first = store.list_runs(limit=2)
    rest = store.list_runs(after=(first[-1]["created"], first[-1]["run_id"]))
    assert [r["run_id"] for r in first + rest] == [r["run_id"] for r in store.list_runs()] and len(rest) == 3
    assert sorted(r["run_id"] for r in first + rest) == sorted(runs)
    summary = next(r for r in first + rest if r["run_id"] == runs[0])
    assert "config_json" not in summary and [s["site"] for s in summary["sites"]] == ["site-0", "site-1"]
    assert store.weights(runs[0], last_round=True) == [{"round": 1, "site": "site-0", "weight": 0.5},
                                                       {"round": 1, "site": "site-1", "weight": 0.5}]


def _modes(root) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


def test_the_store_is_its_owners_alone(tmp_path):
    old = os.umask(0o022)
    try:
        store = Store(tmp_path / "s")
        run = store.begin_run({})
        store.put_artefact(run, "model/deep/m.bin", "model", [b"abc"])
        store.finish_run(run, report())
        modes = _modes(tmp_path / "s")
        assert {"store.db", "store.db-wal", "artefacts", f"artefacts/{run}/model/deep/m.bin"} <= set(modes)
        wrong = {p: oct(m) for p, m in modes.items() if m != (0o700 if (tmp_path / "s" / p).is_dir() else 0o600)}
        assert not wrong, wrong
        store.close()
        for p in (tmp_path / "s").rglob("*"):  # a store written by an older feddem
            p.chmod(0o755 if p.is_dir() else 0o644)
        Store(tmp_path / "s")
        assert set(_modes(tmp_path / "s").values()) == {0o700, 0o600}
    finally:
        os.umask(old)
