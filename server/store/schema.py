"""The run store's SQLite schema, versioned with `PRAGMA user_version` and migrated forward in order.

To change the schema, append a migration (never edit a released one): a store written by an older feddem is
brought up to date when it is opened, each step in one transaction; a store newer than this code is refused.
"""

import sqlite3

from feddem.server.store.errors import FailedPrecondition

MIGRATIONS: list[str] = [
    # 1: runs, their sites, rounds, weights, metrics and artefact records
    """
    CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('running', 'finished', 'failed')),
        reason TEXT NOT NULL DEFAULT '',
        kind TEXT NOT NULL CHECK (kind IN ('federated', 'remerge')),
        parent_run TEXT REFERENCES runs(run_id),
        flower_run_id TEXT NOT NULL DEFAULT '',  -- Flower's run id: an unsigned 64-bit number
        owner TEXT NOT NULL,
        created REAL NOT NULL,
        ended REAL,
        aggregation TEXT NOT NULL DEFAULT '',
        weighting TEXT NOT NULL DEFAULT '',
        config_json TEXT NOT NULL,
        base_ref TEXT NOT NULL DEFAULT '',
        base_checksum TEXT NOT NULL DEFAULT '',
        base_parameters INTEGER NOT NULL DEFAULT 0,
        out_dir TEXT NOT NULL DEFAULT '',
        report_json TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE sites (
        run_id TEXT NOT NULL REFERENCES runs(run_id),
        site TEXT NOT NULL,
        domain TEXT NOT NULL,
        examples INTEGER NOT NULL,
        tokens INTEGER NOT NULL,
        heldout_examples INTEGER NOT NULL,
        train_loss REAL NOT NULL,
        PRIMARY KEY (run_id, site)
    );
    CREATE TABLE rounds (
        run_id TEXT NOT NULL REFERENCES runs(run_id),
        round INTEGER NOT NULL,
        failures_json TEXT NOT NULL,
        timings_json TEXT NOT NULL,
        PRIMARY KEY (run_id, round)
    );
    CREATE TABLE weights (
        run_id TEXT NOT NULL REFERENCES runs(run_id),
        round INTEGER NOT NULL,
        site TEXT NOT NULL,
        weight REAL NOT NULL,
        PRIMARY KEY (run_id, round, site)
    );
    CREATE TABLE metrics (
        run_id TEXT NOT NULL REFERENCES runs(run_id),
        round INTEGER NOT NULL,
        stage TEXT NOT NULL,
        domain TEXT NOT NULL,
        name TEXT NOT NULL,
        value REAL NOT NULL,
        PRIMARY KEY (run_id, round, stage, domain, name)
    );
    CREATE TABLE artefacts (
        run_id TEXT NOT NULL REFERENCES runs(run_id),
        name TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('model', 'aggregate', 'site-vector', 'report')),
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (run_id, name)
    );
    CREATE INDEX runs_by_status ON runs(status);
    """,
    # 2: the process that writes a run through the server (its recorder), besides the server that accepted it
    """
    ALTER TABLE runs ADD COLUMN writer TEXT NOT NULL DEFAULT '';
    """,
    # 3: what was done to the store besides recording runs (an operator deleting a run)
    """
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time REAL NOT NULL,
        action TEXT NOT NULL,
        run_id TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
    );
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the database to SCHEMA_VERSION; returns the version it had."""
    found = conn.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise FailedPrecondition(f"the store has schema version {found}, newer than this feddem knows "
                                 f"({SCHEMA_VERSION}): upgrade feddem to open it")
    for version in range(found, SCHEMA_VERSION):
        with conn:  # one transaction per step: the version moves only with its tables
            conn.execute("BEGIN")
            for statement in MIGRATIONS[version].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
    return found
