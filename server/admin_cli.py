"""`feddem-admin`: the operator's view of a feddem server's run store, over the admin API (TLS, bearer token).

    feddem-admin status [--verify]
    feddem-admin runs list | show RUN | sites RUN | weights RUN | metrics RUN | delete RUN [--yes]
    feddem-admin models list | export RUN --out DIR | remerge RUN --weights site-0=0.7,site-1=0.3
    feddem-admin evaluate RUN [--data SPEC]
    feddem-admin pool list | rank RUN --candidates SPEC [--data SPEC]

RUN is a run's id, a unique prefix of one, or `latest`. Output is a table, or JSON with `--json` (times in ISO 8601,
a run's config as an object). Every call has a deadline (`--timeout`) and the connection is closed on every path. `--server`, `--token` and `--ca` default to FEDDEM_ADMIN_SERVER,
FEDDEM_ADMIN_TOKEN and FEDDEM_ADMIN_CA (`--cert`/`--key`, a client certificate: FEDDEM_ADMIN_CERT/_KEY).
"""

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import grpc

from feddem.common.atomic import atomic_folder
from feddem.common.errors import FeddemError
from feddem.server.admin.client import (
    ADDRESS_ENV, CA_ENV, CERT_ENV, DEFAULT_ADDRESS, KEY_ENV, TOKEN_ENV, open_channel, to_dict,
)

EXIT_CODES = """exit codes:
  0  done
  1  an unexpected error of the server or this tool
  2  bad usage or a request the server refuses as invalid (INVALID_ARGUMENT, ALREADY_EXISTS), e.g. bad weights
  3  no such run or artefact (NOT_FOUND)
  4  the run does not allow it (FAILED_PRECONDITION), e.g. re-merging a secure run
  5  not authenticated or not allowed (UNAUTHENTICATED, PERMISSION_DENIED): check --token
  6  the server cannot be reached, or TLS fails (UNAVAILABLE, DEADLINE_EXCEEDED): check --server and --ca
  7  stored data does not verify against its checksum (DATA_LOSS)"""

EXIT = {"INVALID_ARGUMENT": 2, "OUT_OF_RANGE": 2, "ALREADY_EXISTS": 2, "NOT_FOUND": 3, "FAILED_PRECONDITION": 4,
        "UNAUTHENTICATED": 5, "PERMISSION_DENIED": 5, "UNAVAILABLE": 6, "DEADLINE_EXCEEDED": 6,
        "RESOURCE_EXHAUSTED": 6, "CANCELLED": 6, "DATA_LOSS": 7}
QUICK, LONG = 60.0, 3600.0  # default seconds per call: listings and lookups; export, re-merge, evaluation, ranking
RUN_HELP = "the run: its id, a unique prefix of one, or `latest` (the newest run)"


class UsageError(FeddemError):
    pass


@contextlib.contextmanager
def connect(args):
    """(admin_pb2, an AdminService stub) over a channel that is closed when the block ends, whatever happens."""
    from feddem.admin.v1 import admin_pb2, admin_pb2_grpc

    with open_channel(args.server, args.token, args.ca, args.cert, args.key) as channel:
        yield admin_pb2, admin_pb2_grpc.AdminServiceStub(channel)


def timeout(args, long: bool = False) -> float:
    """Every call's deadline: --timeout, else QUICK (or LONG for calls that move or compute models)."""
    if args.timeout is not None:
        return args.timeout
    return LONG if long else QUICK


def pages(list_call, request_cls, field: str, args) -> list[dict]:
    """Every entry of a paged listing, page after page."""
    found, token = [], ""
    while True:
        page = list_call(request_cls(page_token=token), timeout=timeout(args))
        found += [to_dict(m) for m in getattr(page, field)]
        token = page.next_page_token
        if not token:
            return found


# -- output ------------------------------------------------------------------------------------------------------


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) and abs(value) < 1e6 else f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines) if rows else lines[0] + "\n(none)"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else ""


def iso(ts: float) -> str | None:
    """A time as ISO 8601 (UTC), None for 'never'."""
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(timespec="seconds") if ts else None


def jsonable(value):
    """What `--json` prints: times (`created`, `ended`) as ISO 8601 and `config_json` as the object `config`."""
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for k, v in value.items():
        if k in ("created", "ended") and isinstance(v, (int, float)):
            out[k] = iso(v)
        elif k == "config_json":
            try:
                out["config"] = json.loads(v) if v else None
            except ValueError:
                out["config"] = v
        else:
            out[k] = jsonable(v)
    return out


def _site_names(run: dict) -> str:
    return ",".join(s["site"] for s in run.get("sites", []))


def _runs_rows(runs: list[dict]) -> list[dict]:
    return [r | {"created": _when(r["created"]), "remergeable": "yes" if r["remergeable"] else "",
                 "reason": r["reason"][:60], "sites": _site_names(r)} for r in runs]


RUN_COLUMNS = ["run_id", "status", "kind", "aggregation", "weighting", "created", "sites", "remergeable", "reason"]


def emit(args, data, text: str) -> None:
    print(json.dumps(jsonable(data), indent=2) if args.json else text)


# -- commands ----------------------------------------------------------------------------------------------------


def cmd_status(args):
    with connect(args) as (pb, stub):
        s = to_dict(stub.GetStatus(pb.GetStatusRequest(verify=args.verify), timeout=timeout(args, args.verify)))
    lines = [f"server version  {s['version']}", f"store           {s['store']} (schema {s['schema_version']})",
             "runs            " + (", ".join(f"{n} {k}" for k, n in sorted(s["runs_by_status"].items())) or "none"),
             f"artefacts       {s['artefacts']} ({s['artefact_bytes']} bytes)"]
    if s["verified"]:
        lines.append("verified        " + ("every checksum matches" if not s["problems"] else
                                           f"{len(s['problems'])} problem(s):\n  " + "\n  ".join(s["problems"])))
    emit(args, s, "\n".join(lines))
    return 7 if s["problems"] else 0


def _run(args, pb, stub) -> dict:
    return to_dict(stub.GetRun(pb.GetRunRequest(run_id=args.run), timeout=timeout(args)))


SITE_COLUMNS = ["site", "domain", "examples", "tokens", "heldout_examples", "train_loss", "vector_stored"]


def show_run(run: dict) -> str:
    """`runs show`: provenance, then the sites, weights by round, metrics and artefacts."""
    keys = ["run_id", "status", "reason", "kind", "parent_run", "flower_run_id", "aggregation", "weighting",
            "base_ref", "base_checksum", "base_parameters", "out_dir", "remergeable", "has_model"]
    text = "\n".join(f"{k:<16}{_cell(run[k])}" for k in keys)
    text += f"\n{'created':<16}{_when(run['created'])}\n{'ended':<16}{_when(run['ended'])}"
    for title, rows, columns in (("sites", run["sites"], SITE_COLUMNS),
                                 ("weights", run["weights"], ["round", "site", "weight"]),
                                 ("metrics", run["metrics"], ["round", "stage", "domain", "name", "value"]),
                                 ("artefacts", run["artefacts"], ["name", "kind", "size", "sha256"])):
        text += f"\n\n{title}\n" + table(rows, columns)
    return text


def cmd_runs(args):
    with connect(args) as (pb, stub):
        if args.what == "list":
            runs = pages(stub.ListRuns, pb.ListRunsRequest, "runs", args)
            emit(args, runs, table(_runs_rows(runs), RUN_COLUMNS))
            return 0
        if args.what == "delete":
            return delete_run(args, pb, stub)
        run = _run(args, pb, stub)
    if args.what == "show":
        emit(args, run, show_run(run))
    elif args.what == "sites":
        emit(args, run["sites"], table(run["sites"], SITE_COLUMNS))
    elif args.what == "weights":
        emit(args, run["weights"], table(run["weights"], ["round", "site", "weight"]))
    elif args.what == "metrics":
        emit(args, run["metrics"], table(run["metrics"], ["round", "stage", "domain", "name", "value"]))
    return 0


def delete_run(args, pb, stub) -> int:
    try:
        run = _run(args, pb, stub)  # the full id, and NOT_FOUND before any question
        what = f"{run['run_id']} ({run['status']}, {len(run['artefacts'])} artefacts)"
    except grpc.RpcError as exc:  # a run whose records cannot be shown can still be deleted
        if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
            raise
        run, what = {"run_id": args.run}, f"{args.run} (its records cannot be shown)"
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(f"deleting run {what} removes its records and files for good: add --yes")
        try:
            answer = input(f"delete run {what} and its files for good? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted", file=sys.stderr)
            return 1
    gone = to_dict(stub.DeleteRun(pb.DeleteRunRequest(run_id=run["run_id"]), timeout=timeout(args)))
    emit(args, gone, f"deleted run {gone['run_id']} ({gone['status']}; {gone['artefacts']} artefacts, "
                     f"{gone['bytes']} bytes)")
    return 0


def cmd_models(args):
    with connect(args) as (pb, stub):
        if args.what == "list":
            found = pages(stub.ListModels, pb.ListModelsRequest, "models", args)
            rows = [m | {"created": _when(m["created"]), "weights": ",".join(f"{w['site']}={w['weight']:.3g}"
                                                                              for w in m["weights"])} for m in found]
            emit(args, found, table(rows, ["run_id", "kind", "parent_run", "aggregation", "size", "remergeable",
                                           "created", "weights"]))
            return 0
        if args.what == "export":
            run_id = _run(args, pb, stub)["run_id"]
            out = Path(args.out)
            files = export_model(stub.ExportModel(pb.ExportModelRequest(run_id=run_id), timeout=timeout(args, True)),
                                 out)
            emit(args, {"run_id": run_id, "out": str(out.resolve()), "files": files},
                 f"exported run {run_id} to {out}:\n" + table(files, ["path", "size", "sha256"]))
            return 0
        run = to_dict(stub.RemergeModel(pb.RemergeModelRequest(run_id=args.run, weights=parse_weights(args.weights)),
                                        timeout=timeout(args, True)))
    emit(args, run, f"re-merged run {run['parent_run']} as run {run['run_id']} ({run['status']}):\n"
         + table(run["weights"], ["site", "weight"]))
    return 0


def cmd_evaluate(args):
    with connect(args) as (pb, stub):
        r = to_dict(stub.EvaluateModel(pb.EvaluateModelRequest(run_id=args.run, data=args.data),
                                       timeout=timeout(args, True)))
    emit(args, r, f"run {r['run_id']} on {r['data'] or 'its own data'} (held-out test splits, nats/token):\n"
         + table(r["results"], ["domain", "loss", "perplexity", "tokens"]))
    return 0


def cmd_pool(args):
    with connect(args) as (pb, stub):
        if args.what == "list":
            pools = [{"run_id": run["run_id"], "created": run["created"],
                      "sites": [s["site"] for s in run["sites"] if s["vector_stored"]]}
                     for run in pages(stub.ListRuns, pb.ListRunsRequest, "runs", args) if run["remergeable"]]
            emit(args, pools, table([p | {"created": _when(p["created"])} for p in pools],
                                    ["run_id", "created", "sites"]))
            return 0
        r = to_dict(stub.RankPool(pb.RankPoolRequest(run_id=args.run, candidates=args.candidates, data=args.data),
                                  timeout=timeout(args, True)))
    rows = [{"rank": i + 1 if not c["error"] else "-", "mean_loss": c["mean_loss"] if not c["error"] else "",
             "candidate": "+".join(c["sites"]), "error": c["error"]} for i, c in enumerate(r["ranking"])]
    emit(args, r, table(rows, ["rank", "mean_loss", "candidate", "error"]))
    return 0


def parse_weights(spec: str) -> dict[str, float]:
    """`--weights SITE=W,...` as `feddem simulate` reads it (`common.weighting.weights`): a bad part is bad usage."""
    from feddem.common.weighting.weights import parse_weights as parse

    try:
        return parse(spec)
    except FeddemError as exc:
        raise UsageError(str(exc)) from None


def export_model(chunks, out: Path) -> list[dict]:
    """Write the streamed files into `out` (created; it must not hold anything yet). Each file is checked against
    its size and sha256; the folder appears only once every file is complete (`common.atomic.atomic_folder`)."""
    try:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"--out '{out}' exists and is not an empty folder")
        with atomic_folder(out) as tmp:
            return _receive(chunks, tmp)
    except OSError as exc:
        raise UsageError(f"cannot write --out '{out}': {exc.strerror or exc}") from None


def _receive(chunks, tmp: Path) -> list[dict]:
    files, fh, digest, current = [], None, None, None
    try:
        for c in chunks:
            if current != c.path:
                if fh is not None:
                    raise FeddemError(f"the server switched files inside '{current}' before its end")
                if "/" in c.path or c.path in ("", ".", ".."):
                    raise FeddemError(f"the server sent a file with a bad name '{c.path}'")
                current, fh, digest = c.path, open(tmp / c.path, "wb"), hashlib.sha256()
            fh.write(c.data)
            digest.update(c.data)
            if c.last:
                fh.close()
                size = (tmp / c.path).stat().st_size
                if size != c.size or digest.hexdigest() != c.sha256:
                    raise FeddemError(f"'{c.path}' arrived with {size} bytes / sha256 {digest.hexdigest()[:16]}..., "
                                      f"the server announced {c.size} / {c.sha256[:16]}...")
                files.append({"path": c.path, "size": size, "sha256": c.sha256})
                fh, current = None, None
        if fh is not None:
            raise FeddemError(f"the stream ended inside '{current}'")
        if not files:
            raise FeddemError("the server sent no files")
    finally:
        if fh is not None:
            fh.close()
    return files


# -- parser ------------------------------------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, defaults: bool) -> argparse.ArgumentParser:
    """The connection and output options, accepted before and after the command (after it, they do not reset
    what was given before: their defaults are suppressed there)."""

    def default(value):
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--server", default=default(os.environ.get(ADDRESS_ENV, DEFAULT_ADDRESS)),
                        metavar="HOST:PORT", help=f"the feddem server (default: ${ADDRESS_ENV} or {DEFAULT_ADDRESS})")
    parser.add_argument("--token", default=default(os.environ.get(TOKEN_ENV, "")), metavar="TOKEN",
                        help=f"bearer token (default: ${TOKEN_ENV}; prefer the variable: other users can read a "
                        f"process's arguments)")
    parser.add_argument("--ca", default=default(os.environ.get(CA_ENV) or None), metavar="FILE",
                        help=f"CA certificate that signed the server's (default: ${CA_ENV}, else the system's)")
    parser.add_argument("--cert", default=default(os.environ.get(CERT_ENV) or None), metavar="FILE",
                        help=f"client certificate, for a server started with --client-ca (default: ${CERT_ENV})")
    parser.add_argument("--key", default=default(os.environ.get(KEY_ENV) or None), metavar="FILE",
                        help=f"the client certificate's key (default: ${KEY_ENV})")
    parser.add_argument("--json", action="store_true", default=default(False), help="print JSON instead of a table")
    parser.add_argument("--timeout", type=_seconds, default=default(None), metavar="SECONDS",
                        help=f"deadline of each call to the server (default: {QUICK:g}; {LONG:g} for export, "
                        f"remerge, evaluate and pool rank)")
    return parser


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"'{value}' is not a positive number of seconds")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    common = _common(argparse.ArgumentParser(add_help=False), defaults=False)

    parser = argparse.ArgumentParser(prog="feddem-admin", description=__doc__, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(parent, name, func, help_text, **kw):
        p = parent.add_parser(name, help=help_text, description=help_text, parents=[common], **kw)
        p.set_defaults(func=func)
        return p

    status = command(sub, "status", cmd_status, "the server's version, store and run counts")
    status.add_argument("--verify", action="store_true", help="also re-hash every stored artefact")

    runs = sub.add_parser("runs", help="runs in the store").add_subparsers(dest="what", required=True)
    command(runs, "list", cmd_runs, "every run: status, kind, aggregation, weighting, sites")
    for what, text in (("show", "one run: provenance, sites, weights, metrics and artefacts"),
                       ("sites", "a run's sites"), ("weights", "a run's weights by round"),
                       ("metrics", "a run's metrics (held-out loss)")):
        command(runs, what, cmd_runs, text).add_argument("run", metavar="RUN", help=RUN_HELP)
    delete = command(runs, "delete", cmd_runs, "remove a run's records and files from the store for good "
                     "(recorded in the store's audit table)")
    delete.add_argument("run", metavar="RUN", help=RUN_HELP)
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation (needed without a terminal)")

    models = sub.add_parser("models", help="merged models").add_subparsers(dest="what", required=True)
    command(models, "list", cmd_models, "runs that hold a merged model")
    export = command(models, "export", cmd_models, "download a run's merged model as a Hugging Face folder")
    export.add_argument("run", metavar="RUN", help=RUN_HELP)
    export.add_argument("--out", required=True, metavar="DIR", help="new (or empty) folder for the model")
    remerge = command(models, "remerge", cmd_models,
                      "a new model base + sum_i w_i d_i from a trusted run's stored site vectors (recorded as a new "
                      "run); sites not named get weight 0")
    remerge.add_argument("run", metavar="RUN", help=RUN_HELP + "; a trusted run with stored site vectors")
    remerge.add_argument("--weights", required=True, metavar="SITE=W,...",
                         help="each site's weight, e.g. site-0=0.7,site-1=0.3 (within the run's weight range)")

    evaluate = command(sub, "evaluate", cmd_evaluate,
                       "held-out loss per domain of a run's merged model on data the server holds")
    evaluate.add_argument("run", metavar="RUN", help=RUN_HELP)
    evaluate.add_argument("--data", default="", metavar="SPEC",
                          help="`synthetic[:DOMAINS]` or a folder inside the server's --data-root folders "
                          "(default: the run's data spec)")

    pool = sub.add_parser("pool", help="trusted runs' pools of site vectors (ablations)").add_subparsers(
        dest="what", required=True)
    command(pool, "list", cmd_pool, "runs whose site vectors the server holds")
    rank = command(pool, "rank", cmd_pool, "rank candidate mixtures (subsets of sites) by merging the pool")
    rank.add_argument("run", metavar="RUN", help=RUN_HELP + "; a trusted run with stored site vectors")
    rank.add_argument("--candidates", required=True, metavar="SPEC",
                      help="K (every subset of up to K sites) or 'site-0,site-1;site-2,site-3'")
    rank.add_argument("--data", default="", metavar="SPEC",
                      help="`synthetic[:DOMAINS]` or a folder inside the server's --data-root folders "
                      "(default: the run's data spec)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        print(f"feddem-admin: {code.name}: {exc.details() if hasattr(exc, 'details') else exc}", file=sys.stderr)
        return EXIT.get(code.name, 1)
    except FeddemError as exc:
        print(f"feddem-admin: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a local file: --ca, --cert, --key or --out
        print(f"feddem-admin: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
