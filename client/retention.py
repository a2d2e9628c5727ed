"""Retention of a site's stored vectors: keep the newest N runs' vectors, delete older vector files, keep the guard.

Each run leaves one full vector per site under `<work-dir>/runs/<run-id>/vector.safetensors`. A site's node config
`keep-runs = N` prunes after each training (the current run's vector is never pruned); `feddem-site prune --keep N`
does it by hand for every site folder under `$FEDDEM_HOME/sites` (or the given work dirs). Pruning deletes vector
files (and what lies beside each: its merge statistics and the base's evaluation of that run, so the run's folder
goes): the guard's record (`client.ledger`) keeps every entry about them and gets a `pruned` entry each, so a
pruned vector that a new run recreated bit for bit is still refused as already aggregated. A site whose record
cannot be trusted is not pruned (its vectors are the only evidence left of what it trained).
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

from feddem.client import ledger
from feddem.common.site_context import BESIDE_VECTOR, SiteContext
from feddem.common.errors import FeddemError
from feddem.common.paths import feddem_home
from feddem.common.digests import stored_digest

log = logging.getLogger("feddem.site")

VECTOR_NAME = "vector.safetensors"


@dataclass
class Pruned:
    site: str
    deleted: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    freed: int = 0  # bytes
    records: int = 0  # guard record entries, all kept


def _run_of(vector: Path):
    name = vector.parent.name
    return int(name) if name.isdigit() else name


def stored_vectors(site: SiteContext) -> list[Path]:
    """The site's stored vectors, newest first (by modification time)."""
    runs = site.work_dir / "runs"
    found = [p for p in runs.glob(f"*/{VECTOR_NAME}") if p.is_file()] if runs.is_dir() else []
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def prune(site: SiteContext, keep: int, protect: tuple = (), dry_run: bool = False) -> Pruned:
    """Delete all but the newest `keep` vectors (never those of the runs in `protect`); every deletion is recorded
    in the guard's record first. A RecordError (untrusted record) deletes nothing."""
    if keep < 0:
        raise FeddemError(f"keep-runs must be 0 or more, got {keep}")
    vectors = stored_vectors(site)
    old = [p for p in vectors[keep:] if _run_of(p) not in protect]
    out = Pruned(site.name, kept=[p for p in vectors if p not in old])
    digests = {p: stored_digest(p) for p in old}
    if dry_run:
        out.deleted, out.freed = old, sum(p.stat().st_size for p in old)
        out.records = len(ledger.entries(site))
        return out
    written = ledger.update(site, lambda entries: [{"event": "pruned", "run": _run_of(p), "digest": digests[p]}
                                                   for p in old])
    for p in old:
        out.freed += p.stat().st_size
        p.unlink()
        out.deleted.append(p)
        for beside in (p.with_name(name) for name in BESIDE_VECTOR):  # derived from that run's vector and data
            if beside.is_file():
                out.freed += beside.stat().st_size
                beside.unlink()
        if not any(p.parent.iterdir()):
            p.parent.rmdir()
    out.records = len(ledger.entries(site))
    if written:
        log.info("%s: pruned %d old vector(s), %.1f MiB; the guard's record keeps %d entries", site.name,
                 len(out.deleted), out.freed / 2**20, out.records)
    return out


def keep_runs(node_config: dict) -> int:
    """The node config's `keep-runs` (0: keep every vector, the default)."""
    value = node_config.get("keep-runs", 0)
    try:
        keep = int(value)
    except (TypeError, ValueError):
        raise FeddemError(f"node config keep-runs={value!r}: expected a whole number (0 keeps every run)") from None
    if keep < 0:
        raise FeddemError(f"node config keep-runs={keep}: expected 0 (keep every run) or more")
    return keep


def apply(site: SiteContext, node_config: dict, keep) -> Pruned | None:
    """After a training: prune to the node config's `keep-runs` (the run `keep` stays)."""
    n = keep_runs(node_config)
    return prune(site, n, protect=(keep,)) if n else None


def site_dirs(work_dirs: list[str]) -> list[SiteContext]:
    """The given work dirs, or every site folder under $FEDDEM_HOME/sites."""
    if work_dirs:
        paths = [Path(d).expanduser() for d in work_dirs]
        missing = [str(p) for p in paths if not p.is_dir()]
        if missing:
            raise FeddemError(f"--work-dir: no such folder: {', '.join(missing)}")
    else:
        root = feddem_home() / "sites"
        paths = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return [SiteContext(0, p.name, p) for p in paths]


def add_parser(sub) -> None:
    """Register `prune` on `feddem-site`'s subparsers (`client.cli`)."""
    p = sub.add_parser(
        "prune", help="delete old stored vectors, keep the guard's records",
        description="Delete the stored vectors of all but the newest --keep runs of each site (every folder under "
        "$FEDDEM_HOME/sites, or each --work-dir). The privacy guard's record (guard-record.json, site.json) is "
        "kept and notes each deletion, so a pruned vector is never aggregated again.")
    p.add_argument("--keep", type=int, required=True, metavar="N", help="runs' vectors to keep per site (newest)")
    p.add_argument("--work-dir", action="append", default=[], metavar="DIR",
                   help="a site's work dir (repeatable; default: every site under $FEDDEM_HOME/sites)")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")


def run(args) -> None:
    sites = site_dirs(args.work_dir)
    if not sites:
        print(f"no site folders under {feddem_home() / 'sites'}")
    failed = []
    for site in sites:
        try:
            done = prune(site, args.keep, dry_run=args.dry_run)
        except ledger.RecordError as exc:
            failed.append(site.name)
            print(f"{site.name}: not pruned: {exc}")
            continue
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{site.name}: {verb} {len(done.deleted)} vector(s) ({done.freed / 2**20:.1f} MiB), kept "
              f"{len(done.kept)}; guard record: {done.records} entries kept")
    if failed:
        raise FeddemError(f"{len(failed)} site(s) not pruned (their guard record cannot be trusted): "
                          f"{', '.join(failed)}")
