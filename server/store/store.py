"""The run store: runs, sites, rounds, weights, metrics and artefact records in SQLite (WAL, synchronous FULL),
artefact files beside it (`server.store.artefacts`).

A run is recorded `running` when it begins; its report (sites, weights, metrics) lands in one transaction that
also marks it `finished`. Artefacts are recorded only once their file is complete, so a reader never sees a
half-written one. A `running` run whose writer process is gone (checked on open and before each listing) is marked
`failed` with the reason "interrupted".
"""

import json
import math
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from feddem.server.store.artefacts import ArtefactFiles, check_name
from feddem.server.store.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from feddem.server.store.owner import OWNER, current_owner, owner_alive
from feddem.server.store.schema import SCHEMA_VERSION, migrate

KINDS = ("model", "aggregate", "site-vector", "report")
EVAL_STAGES = ("base", "local", "merged")
SITE_FIELDS = {"site": str, "domain": str, "examples": int, "tokens": int, "heldout_examples": int,
               "train_loss": float}


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{what} must be a finite number, got {value!r}")
    return float(value)


class Store:
    """One store folder: `store.db` and `artefacts/`. Thread-safe (one connection behind a lock)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.files = ArtefactFiles(self.root / "artefacts")
        self._lock = threading.RLock()
        self._writing: set[tuple[str, str]] = set()  # artefacts whose file is being written
        self._db = sqlite3.connect(self.root / "store.db", check_same_thread=False, isolation_level=None,
                                   timeout=30.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("PRAGMA foreign_keys = ON")
        migrate(self._db)
        self.sweep_interrupted()
        running = {r["run_id"] for r in self._rows("SELECT run_id FROM runs WHERE status = 'running'")}
        self.files.remove_temporaries(keep_runs=running)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writing ---------------------------------------------------------------------------------------------------

    def _write(self):
        """A write transaction (BEGIN IMMEDIATE ... COMMIT, rolled back on error), under the lock."""
        store = self

        class _Tx:
            def __enter__(self):
                store._lock.acquire()
                store._db.execute("BEGIN IMMEDIATE")
                return store._db

            def __exit__(self, kind, exc, tb):
                try:
                    store._db.execute("COMMIT" if kind is None else "ROLLBACK")
                finally:
                    store._lock.release()

        return _Tx()

    def begin_run(self, config: dict, flower_run_id: int = 0, kind: str = "federated",
                  parent_run: str | None = None, owner: str | None = None, writer: str = "") -> str:
        """A new `running` run. `owner`: the process holding this store (default: this one); `writer`: the process
        that records the run through the server, when it is another one (host:pid:starttime)."""
        if not isinstance(config, dict):
            raise InvalidArgument("the run config must be a JSON object")
        if writer and not OWNER.match(writer):
            raise InvalidArgument(f"writer {writer[:80]!r} is not host:pid:starttime")
        if not 0 <= int(flower_run_id) < 2**64:
            raise InvalidArgument(f"flower_run_id {flower_run_id} is not an unsigned 64-bit number")
        run_id = new_run_id()
        with self._write() as db:
            db.execute(
                "INSERT INTO runs (run_id, status, kind, parent_run, flower_run_id, owner, writer, created, "
                "aggregation, weighting, config_json) VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, kind, parent_run, str(int(flower_run_id)), owner or current_owner(), writer, time.time(),
                 str(config.get("aggregation", "")), str(config.get("weighting", "")), json.dumps(config)),
            )
        return run_id

    def _running(self, run_id: str) -> sqlite3.Row:
        row = self._run_row(run_id)
        if row["status"] != "running":
            raise FailedPrecondition(f"run {run_id} is {row['status']}"
                                     f"{' (' + row['reason'] + ')' if row['reason'] else ''}: it takes no more "
                                     f"records")
        return row

    def put_artefact(self, run_id: str, name: str, kind: str, chunks: Iterable[bytes], size: int | None = None,
                     sha256: str | None = None) -> dict:
        """Store one artefact of a running run: the file first, then its record. A name is written once: a second
        write could leave a file that differs from its record (ALREADY_EXISTS)."""
        if kind not in KINDS:
            raise InvalidArgument(f"unknown artefact kind '{kind}': one of {', '.join(KINDS)}")
        check_name(name)
        key = (run_id, name)
        with self._lock:
            self._running(run_id)
            if key in self._writing or self._rows("SELECT 1 FROM artefacts WHERE run_id = ? AND name = ?", *key):
                raise AlreadyExists(f"run {run_id} already has an artefact '{name}' (or it is being written)")
            self._writing.add(key)
        try:
            written, digest = self.files.write(run_id, name, chunks, size, sha256)
            try:
                with self._write() as db:
                    self._running(run_id)  # the run may have ended while the file streamed in
                    db.execute("INSERT INTO artefacts (run_id, name, kind, size, sha256, created) "
                               "VALUES (?, ?, ?, ?, ?, ?)", (run_id, name, kind, written, digest, time.time()))
            except BaseException:
                self.files.path(run_id, name).unlink(missing_ok=True)
                raise
        finally:
            with self._lock:
                self._writing.discard(key)
        return {"name": name, "kind": kind, "size": written, "sha256": digest}

    def put_file(self, run_id: str, name: str, kind: str, path: Path) -> dict:
        with open(path, "rb") as fh:
            return self.put_artefact(run_id, name, kind, iter(lambda: fh.read(1 << 20), b""))

    def finish_run(self, run_id: str, report: dict, out_dir: str = "") -> None:
        """Record the run's report (sites, weights, per-domain metrics, base model) and mark it finished."""
        sites, weights, metrics, rounds, base = _parse_report(report)
        with self._write() as db:
            self._running(run_id)
            db.executemany("INSERT INTO sites VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(run_id, *(s[k] for k in SITE_FIELDS)) for s in sites])
            db.executemany("INSERT INTO weights VALUES (?, ?, ?, ?)", [(run_id, *w) for w in weights])
            last = max(r[0] for r in rounds)  # the report's evaluation is of the last round's merge
            db.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?)", [(run_id, last, *m) for m in metrics])
            db.executemany("INSERT INTO rounds VALUES (?, ?, ?, ?)", [(run_id, *r) for r in rounds])
            db.execute(
                "UPDATE runs SET status = 'finished', ended = ?, base_ref = ?, base_checksum = ?, "
                "base_parameters = ?, out_dir = ?, report_json = ?, aggregation = ? WHERE run_id = ?",
                (time.time(), base["ref"], base["checksum"], base["parameters"], str(out_dir), json.dumps(report),
                 str(report.get("aggregation", "")), run_id),
            )

    def fail_run(self, run_id: str, reason: str) -> None:
        with self._write() as db:
            self._running(run_id)
            db.execute("UPDATE runs SET status = 'failed', reason = ?, ended = ? WHERE run_id = ?",
                       (str(reason)[:2000] or "failed", time.time(), run_id))

    def add_metrics(self, run_id: str, stage: str, losses: dict[str, dict]) -> None:
        """Record an evaluation of a run's model (round 0: after the run), replacing an earlier one of `stage`."""
        with self._write() as db:
            self._run_row(run_id)
            db.executemany("INSERT OR REPLACE INTO metrics VALUES (?, 0, ?, ?, ?, ?)",
                           [(run_id, stage, domain, name, float(values[name]))
                            for domain, values in losses.items() for name in ("loss", "perplexity")])

    def sweep_interrupted(self) -> list[str]:
        """Mark failed the running runs whose owner (the process that held the store) or writer (the process that
        recorded through the server) on this host is gone."""
        with self._lock:
            rows = self._db.execute("SELECT run_id, owner, writer FROM runs WHERE status = 'running'").fetchall()
        gone = [r["run_id"] for r in rows
                if owner_alive(r["owner"]) is False or (r["writer"] and owner_alive(r["writer"]) is False)]
        if gone:
            with self._write() as db:
                db.executemany("UPDATE runs SET status = 'failed', ended = ?, reason = ? "
                               "WHERE run_id = ? AND status = 'running'",
                               [(time.time(), "interrupted: its writer stopped before the run was finished "
                                 "(crash, kill or restart)", run_id) for run_id in gone])
        return gone

    # -- reading ---------------------------------------------------------------------------------------------------

    def _rows(self, sql: str, *args) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _run_row(self, run_id: str) -> sqlite3.Row:
        rows = self._rows("SELECT * FROM runs WHERE run_id = ?", str(run_id))
        if not rows:
            raise NotFound(f"no run '{run_id}' in the store (see `feddem-admin runs list`)")
        return rows[0]

    def _summary(self, row: sqlite3.Row) -> dict:
        run = {k: row[k] for k in row.keys() if k not in ("report_json", "owner", "writer")}
        run["parent_run"] = run["parent_run"] or ""
        run["ended"] = run["ended"] or 0.0
        run["flower_run_id"] = int(run["flower_run_id"] or 0)
        kinds = {r["kind"] for r in self._rows("SELECT DISTINCT kind FROM artefacts WHERE run_id = ?", row["run_id"])}
        run["has_model"] = row["status"] == "finished" and "model" in kinds
        run["remergeable"] = run["has_model"] and "site-vector" in kinds and "aggregate" in kinds
        return run

    def list_runs(self) -> list[dict]:
        self.sweep_interrupted()
        return [self._summary(r) for r in self._rows("SELECT * FROM runs ORDER BY created, run_id")]

    def get_run(self, run_id: str) -> dict:
        self.sweep_interrupted()
        run = self._summary(self._run_row(run_id))
        vectors = {a["name"] for a in self.artefacts(run_id, "site-vector")}
        run["sites"] = [dict(r) | {"vector_stored": site_vector_name(r["site"]) in vectors}
                        for r in self._rows("SELECT * FROM sites WHERE run_id = ? ORDER BY site", run_id)]
        run["weights"] = [dict(r) for r in self._rows(
            "SELECT round, site, weight FROM weights WHERE run_id = ? ORDER BY round, site", run_id)]
        run["metrics"] = [dict(r) for r in self._rows(
            "SELECT round, stage, domain, name, value FROM metrics WHERE run_id = ? "
            "ORDER BY round DESC, stage, domain, name", run_id)]
        run["artefacts"] = self.artefacts(run_id)
        for r in (*run["sites"], *run["weights"], *run["metrics"]):
            r.pop("run_id", None)
        return run

    def report(self, run_id: str) -> dict:
        text = self._run_row(run_id)["report_json"]
        return json.loads(text) if text else {}

    def artefacts(self, run_id: str, kind: str | None = None) -> list[dict]:
        rows = self._rows("SELECT name, kind, size, sha256 FROM artefacts WHERE run_id = ? "
                          "AND (? IS NULL OR kind = ?) ORDER BY name", run_id, kind, kind)
        return [dict(r) for r in rows]

    def artefact(self, run_id: str, name: str) -> dict:
        rows = self._rows("SELECT name, kind, size, sha256 FROM artefacts WHERE run_id = ? AND name = ?",
                          run_id, name)
        if not rows:
            raise NotFound(f"run {run_id} has no artefact '{name}'")
        return dict(rows[0])

    def read_artefact(self, run_id: str, name: str) -> Iterator[bytes]:
        """The artefact's bytes in chunks, verified against its record (DataLoss at the end when they differ)."""
        a = self.artefact(run_id, name)
        return self.files.read(run_id, name, a["size"], a["sha256"])

    def verified_folder(self, run_id: str, kind: str, prefix: str) -> Path:
        """The folder holding a run's artefacts `prefix/*` of `kind`, every file verified first."""
        found = [a for a in self.artefacts(run_id, kind) if a["name"].startswith(prefix + "/")]
        if not found:
            raise FailedPrecondition(f"run {run_id} holds no {kind} (status {self._run_row(run_id)['status']})")
        for a in found:
            self.files.verify(run_id, a["name"], a["size"], a["sha256"])
        return self.files.path(run_id, prefix)

    def verify(self) -> list[str]:
        """Every artefact re-hashed: the problems found (empty when the store verifies)."""
        problems = []
        for a in self._rows("SELECT run_id, name, size, sha256 FROM artefacts ORDER BY run_id, name"):
            try:
                self.files.verify(a["run_id"], a["name"], a["size"], a["sha256"])
            except Exception as exc:  # each problem is reported, the check goes on
                problems.append(str(exc))
        return problems

    def status(self, verify: bool = False) -> dict:
        self.sweep_interrupted()
        counts = {r["status"]: r["n"] for r in self._rows("SELECT status, COUNT(*) AS n FROM runs GROUP BY status")}
        total = self._rows("SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS bytes FROM artefacts")[0]
        problems = self.verify() if verify else []
        return {"store": str(self.root), "schema_version": SCHEMA_VERSION, "runs_by_status": counts,
                "artefacts": total["n"], "artefact_bytes": total["bytes"], "verified": verify,
                "problems": problems}


def site_vector_name(site: str) -> str:
    return f"sites/{site}.safetensors"


def _parse_report(report: dict):
    """The rows of a report (server/report.py); InvalidArgument naming what is missing or of the wrong type."""
    try:
        if not isinstance(report, dict):
            raise TypeError("the report is not a JSON object")
        sites = []
        for s in report["sites"]:
            sites.append({k: kind(s[k]) if kind is str else _typed(s[k], kind, f"site {k}")
                          for k, kind in SITE_FIELDS.items()})
        names = [s["site"] for s in sites]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"malformed run report: a site is listed twice ({', '.join(names)})")
        # weights by round: each round's from `rounds` (multi-round runs), else the run's as round 1
        by_round = [(int(r["round"]), dict(r["weights"])) for r in report.get("rounds") or []]
        by_round = by_round or [(1, dict(report["weights"]))]
        if len({r for r, _ in by_round}) != len(by_round) or any(r < 1 for r, _ in by_round):
            raise InvalidArgument("malformed run report: rounds must be numbered 1, 2, ... once each")
        weights = [(r, str(k), _number(w, f"weight of {k} in round {r}")) for r, ws in by_round for k, w in ws.items()]
        metrics = []
        for stage in EVAL_STAGES:
            for domain, values in dict(report.get("eval", {}).get(stage, {})).items():
                metrics += [(stage, str(domain), name, _number(values[name], f"{stage} {name} of {domain}"))
                            for name in ("loss", "perplexity")]
        last = max(r for r, _ in by_round)  # the run's failures and timings go with its last round
        rounds = [(r, json.dumps(report.get("failures", {})) if r == last else "{}",
                   json.dumps(report.get("timings", {})) if r == last else "{}") for r, _ in by_round]
        base = dict(report["base_model"])
        base = {"ref": str(base.get("ref", "")), "checksum": str(base.get("checksum", "")),
                "parameters": int(base.get("parameters", 0))}
    except InvalidArgument:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidArgument(f"malformed run report: {type(exc).__name__}: {exc}") from None
    return sites, weights, metrics, rounds, base


def _typed(value, kind: type, what: str):
    number = _number(value, what)
    if kind is int:
        if not number.is_integer():
            raise InvalidArgument(f"{what} must be an integer, got {value!r}")
        return int(number)
    return number
