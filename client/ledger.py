"""The site's guard record: one site-wide, append-only ledger of what happened to its vectors, kept across runs.

Two files in the site's work dir, beside each other:
- `site.json`: the site's identity, written once: an id, a secret (never leaves the site; it seeds fresh training
  randomness, `client.guard.training_seed`), and how many ledger entries exist (updated after every append);
- `guard-record.json`: the entries, oldest first. `trained` (a vector was stored: its content digest, the digest of
  the data it came from, the aggregation mode the run declared, how it was seeded), `aggregated` (it went into a
  secure sum), `uploaded` (it was sent in the clear), `adopted` (it was found without a record: counted as spent),
  `pruned` (its file was deleted; the entries about it stay).

The record is keyed on what is protected (the vector's content and its data), not on a run id: a new run can
recreate the same vector, and a close one from the same data. It fails closed: an unreadable record, one with
fewer entries than `site.json` counts, one file of the pair without the other, are refusals; a work dir with
vectors this site trained (or old per-run records) but no record at all adopts them as spent before anything else.
"""

import fcntl
import json
import logging
import secrets
import time
from contextlib import contextmanager
from pathlib import Path

from feddem.common.site_context import SiteContext
from feddem.common.errors import FeddemError
from feddem.common.atomic import write_atomic
from feddem.common.digests import stored_digest
from feddem.common.stored_tensors import read_header

log = logging.getLogger("feddem.site")

IDENTITY_NAME = "site.json"
RECORD_NAME = "guard-record.json"
LEGACY_RECORD = "aggregations.json"  # the per-run record of earlier versions, imported on adoption
SPENT = ("aggregated", "uploaded", "adopted")  # events after which a vector has left the site (or may have)
UNKNOWN_DATA = "*"  # the data digest of a vector found without a record: counted against every data


class RecordError(FeddemError):
    """The guard's record cannot be trusted; the site refuses to contribute until its operator acts."""


def identity_path(site: SiteContext) -> Path:
    return site.work_dir / IDENTITY_NAME


def record_path(site: SiteContext) -> Path:
    return site.work_dir / RECORD_NAME


def _write_json(path: Path, value) -> None:
    """Atomic, durable write, readable by the site's owner alone (`common.atomic`)."""
    write_atomic(path, json.dumps(value, indent=1))


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text())
        if not isinstance(value, dict):
            raise ValueError("not an object")
        return value
    except (OSError, ValueError) as exc:
        raise RecordError(f"the guard's {what} {path} is unreadable ({exc}): refusing to contribute until it is "
                          f"restored from a backup") from None


@contextmanager
def _locked(site: SiteContext):
    """One writer at a time per site (a deployed site may run several flwr-clientapp processes)."""
    site.work_dir.mkdir(parents=True, exist_ok=True)
    with open(site.work_dir / ".guard.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _history(site: SiteContext) -> list[dict]:
    """What a work dir without a record holds that the guard must not forget: vectors this site trained (their
    header names the site) and per-run records of earlier versions. Entries to adopt, as spent."""
    runs = site.work_dir / "runs"
    if not runs.is_dir():
        return []
    adopted, now = [], time.time()
    for run_dir in sorted(p for p in runs.iterdir() if p.is_dir()):
        run = int(run_dir.name) if run_dir.name.isdigit() else run_dir.name
        legacy = run_dir / LEGACY_RECORD
        if legacy.is_file():
            try:
                old = list(json.loads(legacy.read_text())["aggregations"])
            except (OSError, ValueError, KeyError, TypeError):
                old = [{"digest": UNKNOWN_DATA}]
            for e in old:
                adopted.append({"event": "adopted", "run": run, "digest": str(e.get("digest", UNKNOWN_DATA)),
                                "data": UNKNOWN_DATA, "noise": float(e.get("noise", 0.0)), "time": now,
                                "note": f"from {legacy}"})
        vector = run_dir / "vector.safetensors"
        if vector.is_file() and "site" in read_header(vector)[2]:
            adopted.append({"event": "adopted", "run": run, "digest": stored_digest(vector), "data": UNKNOWN_DATA,
                            "noise": 0.0, "time": now, "note": "vector found without a guard record"})
    return adopted


def _load(site: SiteContext) -> tuple[dict, list[dict]]:
    """(identity, entries), creating both for a new site (adopting any history); a RecordError when the pair is
    inconsistent. Call under `_locked`."""
    ident_file, record_file = identity_path(site), record_path(site)
    has_ident, has_record = ident_file.is_file(), record_file.is_file()
    if has_ident and has_record:
        identity = _read_json(ident_file, "site identity")
        entries = _read_json(record_file, "record").get("entries")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise RecordError(f"the guard's record {record_file} is malformed: refusing to contribute until it is "
                              f"restored from a backup")
        if len(entries) < int(identity.get("entries", 0)):
            raise RecordError(f"the guard's record {record_file} holds {len(entries)} entries but {ident_file} "
                              f"counts {identity['entries']}: it was truncated or rolled back; refusing to "
                              f"contribute until it is restored")
        return identity, entries
    if has_ident or has_record:
        present, missing = (ident_file, record_file) if has_ident else (record_file, ident_file)
        raise RecordError(f"{missing} is missing but {present} exists: the guard's record of which vectors were "
                          f"already aggregated cannot be trusted, so this site refuses to contribute. Restore "
                          f"{missing.name} from a backup (or, knowing that earlier sums could then be differenced "
                          f"against new ones, delete the whole work dir {site.work_dir} to start a new site)")
    entries = _history(site)
    identity = {"site": site.name, "id": secrets.token_hex(8), "secret": secrets.token_hex(32),
                "created": time.time(), "entries": len(entries)}
    if entries:
        log.warning("%s: no guard record in %s but %d earlier vector(s)/record(s): adopted as already aggregated",
                    site.name, site.work_dir, len(entries))
    _write_json(record_file, {"entries": entries})
    _write_json(ident_file, identity)
    return identity, entries


def entries(site: SiteContext) -> list[dict]:
    """Every entry of the site's record (created when the site has none)."""
    with _locked(site):
        return _load(site)[1]


def secret(site: SiteContext) -> bytes:
    with _locked(site):
        return bytes.fromhex(_load(site)[0]["secret"])


def update(site: SiteContext, build) -> list[dict]:
    """Persist the entries `build(current entries)` returns (it raises to refuse), under the record's lock, so two
    processes cannot both spend the last of a budget: an atomic write + fsync of the record, then of the count in
    `site.json`, before the caller lets anything leave the site. Returns the new entries."""
    with _locked(site):
        identity, old = _load(site)
        stamped = [{"time": time.time()} | e for e in build(old)]
        _write_json(record_path(site), {"entries": old + stamped})
        _write_json(identity_path(site), identity | {"entries": len(old) + len(stamped)})
        return stamped


def append(site: SiteContext, *new: dict) -> None:
    update(site, lambda old: list(new))
