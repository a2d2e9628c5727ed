"""The run store: runs, sites, rounds, weights, metrics and artefact records in SQLite (WAL, synchronous FULL),
artefact files beside it (`server.store.artefacts`).

A run is recorded `running` when it begins; its report (sites, weights, metrics) lands in one transaction that
also marks it `finished`. Artefacts are recorded only once their file is complete, so a reader never sees a
half-written one. A `running` run whose writer process is gone (checked on open and before each listing) is marked
`failed` with the reason "interrupted".

What enters is checked first (`server.store.validate`: sizes, depth, ranges), so whatever is stored can be shown.
A run is removed with `delete_run` (records and files), which the store's `audit` table records.
Everything in the store folder is its owner's alone (folders 0700, files 0600; `server.store.artefacts`).
"""

import json
import logging
import math
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from feddem.server.store import validate
from feddem.server.store.artefacts import (
    FILE_MODE, ArtefactFiles, check_name, check_run_id, make_private, private_dir,
)
from feddem.server.store.errors import (
    AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted,
)
from feddem.server.store.owner import OWNER, current_owner, owner_alive
from feddem.server.store.schema import SCHEMA_VERSION, migrate

log = logging.getLogger("feddem.store")
MAX_ARTEFACT_BYTES = 1 << 40  # 1 TiB: far above any model feddem merges
FREE_MARGIN = 256 << 20  # bytes an upload leaves free on the store's disk

KINDS = ("model", "aggregate", "site-vector", "report")
EVAL_STAGES = ("base", "local", "merged")
SITE_FIELDS = ("site", "domain", "examples", "tokens", "heldout_examples", "train_loss")


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


class Store:
    """One store folder: `store.db` and `artefacts/`. Thread-safe (one connection behind a lock)."""

    def __init__(self, root: str | Path):
        self.root = private_dir(Path(root).expanduser().resolve())
        db_file = self.root / "store.db"
        os.close(os.open(db_file, os.O_WRONLY | os.O_CREAT, FILE_MODE))  # SQLite's -wal/-shm files take its mode
        make_private(self.root)
        self.files = ArtefactFiles(self.root / "artefacts")
        self._lock = threading.RLock()
        self._writing: set[tuple[str, str]] = set()  # artefacts whose file is being written
        self._db = sqlite3.connect(db_file, check_same_thread=False, isolation_level=None, timeout=30.0)
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
        raw = validate.check_config(config)
        if writer and not OWNER.match(writer):
            raise InvalidArgument(f"writer {validate.quote(writer)} is not host:pid:starttime")
        validate.integer(flower_run_id, "flower_run_id", 0, 2**64 - 1)
        run_id = new_run_id()
        with self._write() as db:
            db.execute(
                "INSERT INTO runs (run_id, status, kind, parent_run, flower_run_id, owner, writer, created, "
                "aggregation, weighting, config_json) VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, kind, parent_run, str(int(flower_run_id)), owner or current_owner(), writer, time.time(),
                 str(config.get("aggregation", "")), str(config.get("weighting", "")), raw),
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
            raise InvalidArgument(f"unknown artefact kind {validate.quote(kind)}: one of {', '.join(KINDS)}")
        check_run_id(run_id)
        check_name(name)
        if size is not None:
            self._check_room(validate.integer(size, "artefact size", 0, MAX_ARTEFACT_BYTES))
        key = (run_id, name)
        with self._lock:
            self._running(run_id)
            if key in self._writing or self._rows("SELECT 1 FROM artefacts WHERE run_id = ? AND name = ?", *key):
                raise AlreadyExists(f"run {run_id} already has an artefact '{name}' (or it is being written)")
            taken = [r["name"] for r in self._rows("SELECT name FROM artefacts WHERE run_id = ?", run_id)]
            taken += [n for r, n in self._writing if r == run_id]
            clash = [n for n in taken if n.startswith(name + "/") or name.startswith(n + "/")]
            if clash:
                raise InvalidArgument(f"artefact '{name}' of run {run_id} clashes with '{clash[0]}': one name cannot "
                                      f"be both a file and a folder")
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

    def _check_room(self, size: int) -> None:
        free = shutil.disk_usage(self.files.root).free
        if size + FREE_MARGIN > free:
            raise ResourceExhausted(f"an artefact of {size} bytes does not fit on the store's disk ({free} bytes "
                                    f"free, {FREE_MARGIN} kept free)")

    def put_file(self, run_id: str, name: str, kind: str, path: Path) -> dict:
        with open(path, "rb") as fh:
            return self.put_artefact(run_id, name, kind, iter(lambda: fh.read(1 << 20), b""))

    def finish_run(self, run_id: str, report: dict, out_dir: str = "") -> None:
        """Record the run's report (sites, weights, per-domain metrics, base model) and mark it finished."""
        sites, weights, metrics, rounds, base = _parse_report(report)
        raw = validate.encode(report, "the run report", validate.MAX_REPORT_BYTES)
        out_dir = validate.text(str(out_dir), "out_dir", validate.MAX_TEXT)
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
                (time.time(), base["ref"], base["checksum"], base["parameters"], out_dir, raw,
                 str(report.get("aggregation", "")), run_id),
            )

    def fail_run(self, run_id: str, reason: str) -> None:
        reason = "".join(c if c.isprintable() else " " for c in str(reason)[:2000])
        with self._write() as db:
            self._running(run_id)
            db.execute("UPDATE runs SET status = 'failed', reason = ?, ended = ? WHERE run_id = ?",
                       (reason or "failed", time.time(), run_id))

    def delete_run(self, run_id: str, by: str = "") -> dict:
        """Remove a run: its records, then its files; the `audit` table keeps who deleted what and when. Refused
        while one of its artefacts streams in, and for a run that re-merged runs name as their parent."""
        with self._lock:
            row = self._run_row(run_id)
            if any(r == run_id for r, _ in self._writing):
                raise FailedPrecondition(f"an artefact of run {run_id} is being written: try again once it is done")
            children = [r["run_id"] for r in self._rows("SELECT run_id FROM runs WHERE parent_run = ?", run_id)]
            if children:
                raise FailedPrecondition(f"run {run_id} is the parent of {', '.join(children[:10])}: delete "
                                         f"{'that run' if len(children) == 1 else 'those runs'} first")
            files = self._rows("SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS bytes FROM artefacts "
                               "WHERE run_id = ?", run_id)[0]
            gone = {"run_id": run_id, "status": row["status"], "artefacts": files["n"], "bytes": files["bytes"]}
            with self._write() as db:
                for table in ("metrics", "weights", "rounds", "sites", "artefacts", "runs"):
                    db.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
                db.execute("INSERT INTO audit (time, action, run_id, detail) VALUES (?, 'delete', ?, ?)",
                           (time.time(), run_id, json.dumps(gone | {"by": by})))
            self.files.remove_run(run_id)
        log.warning("run %s deleted (%s, %d artefacts, %d bytes)%s", run_id, row["status"], files["n"],
                    files["bytes"], f" by {by}" if by else "")
        return gone

    def audit(self) -> list[dict]:
        """What was done to the store beyond recording runs (deletions), oldest first."""
        return [dict(r) | {"detail": json.loads(r["detail"] or "{}")}
                for r in self._rows("SELECT time, action, run_id, detail FROM audit ORDER BY id")]

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
            raise NotFound(f"no run {validate.quote(run_id)} in the store (see `feddem-admin runs list`)")
        return rows[0]

    def resolve_run(self, ref: str) -> str:
        """The run that `ref` names: its id, `latest` (the newest run) or a prefix of one id (an ambiguous prefix is
        refused with the candidates)."""
        if self._rows("SELECT 1 FROM runs WHERE run_id = ?", ref):
            return ref
        if ref == "latest":
            rows = self._rows("SELECT run_id FROM runs ORDER BY created DESC, run_id DESC LIMIT 1")
            if not rows:
                raise NotFound("the store holds no runs yet: `latest` names none")
            return rows[0]["run_id"]
        rows = self._rows("SELECT run_id FROM runs WHERE substr(run_id, 1, ?) = ? ORDER BY created, run_id LIMIT 11",
                          len(ref), ref)
        if not rows:
            raise NotFound(f"no run {validate.quote(ref)} in the store, nor one starting so (see `feddem-admin runs "
                           f"list`)")
        if len(rows) > 1:
            names = ", ".join(r["run_id"] for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
            raise InvalidArgument(f"run prefix {validate.quote(ref)} is ambiguous: it starts {names}; give more "
                                  f"characters")
        return rows[0]["run_id"]

    def _summary(self, row: sqlite3.Row) -> dict:
        run = {k: row[k] for k in row.keys() if k not in ("report_json", "owner", "writer")}
        run["parent_run"] = run["parent_run"] or ""
        run["ended"] = run["ended"] or 0.0
        run["flower_run_id"] = int(run["flower_run_id"] or 0)
        kinds = {r["kind"] for r in self._rows("SELECT DISTINCT kind FROM artefacts WHERE run_id = ?", row["run_id"])}
        run["has_model"] = row["status"] == "finished" and "model" in kinds
        run["remergeable"] = run["has_model"] and "site-vector" in kinds and "aggregate" in kinds
        return run

    def list_runs(self, limit: int | None = None, after: tuple[float, str] | None = None,
                  where: str = "") -> list[dict]:
        """Runs in the order they began (then by id), each a summary with its sites (no config, weights, metrics
        or artefacts): up to `limit` of them, those after the (created, run_id) key `after`; `where` (an SQL
        condition on runs) narrows them."""
        self.sweep_interrupted()
        conditions, args = [where] if where else [], []
        if after is not None:
            conditions.append("(created > ? OR (created = ? AND run_id > ?))")
            args += [after[0], after[0], after[1]]
        sql = ("SELECT * FROM runs" + (" WHERE " + " AND ".join(conditions) if conditions else "")
               + " ORDER BY created, run_id" + (" LIMIT ?" if limit is not None else ""))
        rows = self._rows(sql, *args, *([limit] if limit is not None else []))
        summaries = []
        for row in rows:
            run = self._summary(row)
            run.pop("config_json")
            run["sites"] = self._sites(row["run_id"])
            summaries.append(run)
        return summaries

    def _sites(self, run_id: str) -> list[dict]:
        vectors = {a["name"] for a in self.artefacts(run_id, "site-vector")}
        sites = [dict(r) | {"vector_stored": site_vector_name(r["site"]) in vectors}
                 for r in self._rows("SELECT * FROM sites WHERE run_id = ? ORDER BY site", run_id)]
        for s in sites:
            s.pop("run_id")
        return sites

    def get_run(self, run_id: str) -> dict:
        self.sweep_interrupted()
        run = self._summary(self._run_row(run_id))
        run["sites"] = self._sites(run_id)
        run["weights"] = self.weights(run_id)
        run["metrics"] = [dict(r) for r in self._rows(
            "SELECT round, stage, domain, name, value FROM metrics WHERE run_id = ? "
            "ORDER BY round DESC, stage, domain, name", run_id)]
        run["artefacts"] = self.artefacts(run_id)
        for r in (*run["weights"], *run["metrics"]):
            r.pop("run_id", None)
        return run

    def weights(self, run_id: str, last_round: bool = False) -> list[dict]:
        """A run's weights by round and site (only its last round's with `last_round`: those of its model)."""
        last = "AND round = (SELECT MAX(round) FROM weights WHERE run_id = ?)" if last_round else ""
        return [dict(r) for r in self._rows(f"SELECT round, site, weight FROM weights WHERE run_id = ? {last} "
                                            f"ORDER BY round, site", run_id, *([run_id] if last_round else []))]

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
    """The rows of a report (server/report.py), every value checked against its range; InvalidArgument naming what is
    missing, of the wrong type or out of range."""
    try:
        if not isinstance(report, dict):
            raise TypeError("the report is not a JSON object")
        validate.check_tree(report, "the run report")
        if not isinstance(report["sites"], list) or len(report["sites"]) > validate.MAX_SITES:
            raise InvalidArgument(f"malformed run report: sites must be a list of at most {validate.MAX_SITES}")
        sites = []
        for s in report["sites"]:
            sites.append({
                "site": validate.text(s["site"], "site name", empty=False),
                "domain": validate.text(s["domain"], "site domain"),
                **{k: validate.integer(s[k], f"site {k}") for k in ("examples", "tokens", "heldout_examples")},
                "train_loss": _number(s["train_loss"], "site train_loss"),
            })
        names = [s["site"] for s in sites]
        if len(set(names)) != len(names):
            raise InvalidArgument("malformed run report: a site is listed twice")
        # weights by round: each round's from `rounds` (multi-round runs), else the run's as round 1
        by_round = [(validate.integer(r["round"], "round", 1, validate.MAX_ROUND), dict(r["weights"]))
                    for r in report.get("rounds") or []]
        by_round = by_round or [(1, dict(report["weights"]))]
        if len({r for r, _ in by_round}) != len(by_round):
            raise InvalidArgument("malformed run report: rounds must be numbered 1, 2, ... once each")
        weights = [(r, validate.text(k, "weight site", empty=False), _number(w, f"weight of site in round {r}"))
                   for r, ws in by_round for k, w in ws.items()]
        if len(weights) > validate.MAX_WEIGHTS:
            raise InvalidArgument(f"malformed run report: {len(weights)} weights, at most {validate.MAX_WEIGHTS}")
        metrics = []
        evaluations = report.get("eval", {})
        for stage in EVAL_STAGES:
            for domain, values in dict(evaluations.get(stage, {})).items():
                metrics += [(stage, validate.text(domain, "metric domain"), name,
                             _number(values[name], f"{stage} {name}")) for name in ("loss", "perplexity")]
        if len(metrics) > validate.MAX_METRICS:
            raise InvalidArgument(f"malformed run report: {len(metrics)} metrics, at most {validate.MAX_METRICS}")
        last = max(r for r, _ in by_round)  # the run's failures and timings go with its last round
        rounds = [(r, json.dumps(report.get("failures", {})) if r == last else "{}",
                   json.dumps(report.get("timings", {})) if r == last else "{}") for r, _ in by_round]
        base = dict(report["base_model"])
        base = {"ref": validate.text(str(base.get("ref", "")), "base model ref", validate.MAX_TEXT),
                "checksum": validate.text(str(base.get("checksum", "")), "base model checksum"),
                "parameters": validate.integer(base.get("parameters", 0), "base model parameters")}
        validate.text(str(report.get("aggregation", "")), "report aggregation", 64)
    except InvalidArgument:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidArgument(f"malformed run report: {type(exc).__name__}: {validate.quote(exc, 120)}") from None
    return sites, weights, metrics, rounds, base


def _number(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{what} must be a finite number, got {validate.quote(value)}")
    return float(value)
