"""The admin API's services over the run store: AdminService (what an operator asks) and RecorderService (how a
ServerApp records its runs).

Requests are parsed here from their bytes (not by gRPC), so a malformed message is INVALID_ARGUMENT like any other
bad input. Every method is served as a request stream at the gRPC level (one message read for a unary method), so
the server's time limits (`server.admin.limits`) cover the wait for a request as well: a client that sends a header
and stalls is ended after the idle limit. Every error becomes a gRPC status with a message of at most
MAX_DETAILS characters: a StoreError carries its status name; another FeddemError is INVALID_ARGUMENT; a store locked
by another process too long is UNAVAILABLE (retry); anything unexpected is INTERNAL (and logged with its traceback).
"""

import base64
import binascii
import json
import logging
import re
import sqlite3
from importlib import metadata
from pathlib import Path

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from feddem.common.errors import FeddemError
from feddem.admin.v1 import admin_pb2 as pb
from feddem.server.admin import model_ops
from feddem.server.admin.limits import CallGuard, Limits, Watchdog
from feddem.server.store import Store
from feddem.server.store.artefacts import check_run_id
from feddem.server.store.errors import FailedPrecondition, InvalidArgument, StoreError
from feddem.server.store.validate import MAX_CONFIG_BYTES, MAX_REPORT_BYTES, parse_json, quote, text

log = logging.getLogger("feddem.admin")
MAX_DETAILS = 1000  # characters of an error message (gRPC metadata has a hard size limit)
PAGE_SIZE, MAX_PAGE_SIZE = 50, 500  # runs per listing page: default, most
SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
PAGE_BYTES = 4 << 20  # a listing page stops growing past this many bytes (the next one goes on)


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, StoreError):
        return grpc.StatusCode[exc.status], str(exc)
    if isinstance(exc, FeddemError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return grpc.StatusCode.UNAVAILABLE, f"the store is busy ({exc}): try again"
    log.exception("admin API: unexpected error")
    return grpc.StatusCode.INTERNAL, f"internal error of the feddem server: {type(exc).__name__}: {exc}"


def shorten(details: str) -> str:
    return details if len(details) <= MAX_DETAILS else details[:MAX_DETAILS - 20] + f"... ({len(details)} chars)"


def _message(cls, fields: dict):
    """A response message from a store dict (keys the message does not have are left out). A stored record that
    the message cannot hold (written before the store checked what it takes) is FAILED_PRECONDITION naming the
    run and how to remove it."""
    try:
        return json_format.ParseDict(fields, cls(), ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        run = fields.get("run_id", "")
        raise FailedPrecondition(f"run {run} holds records this server cannot show ({str(exc)[:200]}): remove it "
                                 f"with `feddem-admin runs delete {run}`") from None


def _summary_message(cls, fields: dict):
    """A listing's entry; a run whose records cannot be shown is listed with its id, status and the problem."""
    try:
        return _message(cls, fields)
    except FailedPrecondition as exc:
        keep = {k: fields[k] for k in ("run_id", "status", "kind", "created") if k in fields}
        return _message(cls, keep | ({"reason": str(exc)} if "reason" in cls.DESCRIPTOR.fields_by_name else {}))


def _version() -> str:
    try:
        return metadata.version("feddem")
    except metadata.PackageNotFoundError:
        return "unknown"


def _page(request) -> tuple[int, tuple[float, str] | None]:
    """(page size, the key after which the page starts) of a listing request."""
    if request.page_size < 0:
        raise InvalidArgument(f"page_size {request.page_size} is negative")
    size = min(request.page_size or PAGE_SIZE, MAX_PAGE_SIZE)
    if not request.page_token:
        return size, None
    try:
        created, run_id = json.loads(base64.urlsafe_b64decode(request.page_token.encode("ascii")))
        return size, (float(created), check_run_id(run_id))
    except (ValueError, TypeError, binascii.Error, UnicodeError, StoreError):
        raise InvalidArgument(f"page_token {quote(request.page_token)} is not one this server gave") from None


def _token(run: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps([run["created"], run["run_id"]]).encode()).decode("ascii")


def _paged(store: Store, request, where: str, make) -> tuple[list, str]:
    """One page of `make(run)` messages over the runs that `where` selects, and the next page's token."""
    size, after = _page(request)
    runs = store.list_runs(limit=size + 1, after=after, where=where)
    messages, used = [], 0
    for i, run in enumerate(runs[:size]):
        message = make(run)
        used += message.ByteSize()
        if messages and used > PAGE_BYTES:
            return messages, _token(runs[i - 1])
        messages.append(message)
    return messages, (_token(runs[size - 1]) if len(runs) > size else "")


HAS_MODEL = ("status = 'finished' AND EXISTS (SELECT 1 FROM artefacts a WHERE a.run_id = runs.run_id "
             "AND a.kind = 'model')")


class AdminService:
    def __init__(self, store: Store, data_roots: tuple[Path, ...] = ()):
        self.store, self.data_roots = store, tuple(data_roots)

    def _run_id(self, value: str) -> str:
        """The run a request names: its id, a unique prefix of one, or `latest`."""
        if not value:
            raise InvalidArgument("run_id is empty: give a run's id, a unique prefix of one, or `latest`")
        return self.store.resolve_run(check_run_id(value))

    def GetStatus(self, request, context):
        return _message(pb.GetStatusResponse, self.store.status(request.verify) | {"version": _version()})

    def ListRuns(self, request, context):
        runs, token = _paged(self.store, request, "", lambda r: _summary_message(pb.Run, r))
        return pb.ListRunsResponse(runs=runs, next_page_token=token)

    def GetRun(self, request, context):
        return _message(pb.Run, self.store.get_run(self._run_id(request.run_id)))

    def _model(self, run: dict):
        weights = self.store.weights(run["run_id"], last_round=True)
        size = sum(a["size"] for a in self.store.artefacts(run["run_id"], "model"))
        return _summary_message(pb.Model, run | {"weights": weights, "size": size})

    def ListModels(self, request, context):
        found, token = _paged(self.store, request, HAS_MODEL, self._model)
        return pb.ListModelsResponse(models=found, next_page_token=token)

    def DeleteRun(self, request, context):
        run_id = self._run_id(request.run_id)
        return _message(pb.DeleteRunResponse, self.store.delete_run(run_id, by=context.peer() or ""))

    def ExportModel(self, request, context):
        run_id = self._run_id(request.run_id)
        run = self.store.get_run(run_id)
        files = [a for a in run["artefacts"] if a["kind"] == "model"]
        if not run["has_model"] or not files:
            raise FailedPrecondition(f"run {run_id} holds no merged model (status {run['status']})")
        for a in files:
            path, offset, previous = a["name"].removeprefix("model/"), 0, None
            for data in self.store.read_artefact(run_id, a["name"]):  # DataLoss at the end if it does not verify
                if previous is not None:
                    yield pb.FileChunk(path=path, offset=offset, data=previous, size=a["size"], sha256=a["sha256"])
                    offset += len(previous)
                previous = data
            yield pb.FileChunk(path=path, offset=offset, data=previous or b"", size=a["size"], sha256=a["sha256"],
                               last=True)

    def RemergeModel(self, request, context):
        new = model_ops.remerge(self.store, self._run_id(request.run_id), dict(request.weights))
        return _message(pb.Run, self.store.get_run(new))

    def EvaluateModel(self, request, context):
        run_id = self._run_id(request.run_id)
        results = model_ops.evaluate(self.store, run_id, request.data, self.data_roots)
        return pb.EvaluateModelResponse(run_id=run_id, data=request.data, results=[
            pb.DomainLoss(domain=d, loss=r["loss"], perplexity=r["perplexity"], tokens=r["tokens"])
            for d, r in results.items()])

    def RankPool(self, request, context):
        run_id = self._run_id(request.run_id)
        text(request.candidates, "candidates", 4096)
        rows = model_ops.rank_pool(self.store, run_id, request.candidates, request.data, self.data_roots)
        return pb.RankPoolResponse(run_id=run_id, data=request.data, ranking=[
            pb.PoolCandidate(sites=r["candidate"], mean_loss=r.get("mean_loss", 0.0), loss=r.get("loss", {}),
                             error=r.get("error", "")) for r in rows])


def _run_id(value: str) -> str:
    """A recorder names its run by its full id."""
    if not value:
        raise InvalidArgument("run_id is empty")
    return check_run_id(value)


class RecorderService:
    def __init__(self, store: Store):
        self.store = store

    def BeginRun(self, request, context):
        config = parse_json(request.config_json, "config_json", MAX_CONFIG_BYTES)
        run_id = self.store.begin_run(config, request.flower_run_id, writer=request.writer)
        return _message(pb.Run, self.store.get_run(run_id))

    def PutArtefact(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("PutArtefact: the first message must be the header (run_id, name, kind, size)")
        h = first.header
        if h.size < 0:
            raise InvalidArgument(f"PutArtefact: negative size {h.size}")
        if h.sha256 and not SHA256.match(h.sha256):
            raise InvalidArgument(f"PutArtefact: sha256 {quote(h.sha256)} is not 64 hex digits")

        def chunks():
            for part in request_iterator:
                if part.WhichOneof("part") != "data":
                    raise InvalidArgument("PutArtefact: only data may follow the header")
                yield part.data

        stored = self.store.put_artefact(_run_id(h.run_id), h.name, h.kind, chunks(), h.size, h.sha256 or None)
        return _message(pb.Artefact, stored)

    def FinishRun(self, request, context):
        run_id = _run_id(request.run_id)
        report = parse_json(request.report_json, "report_json", MAX_REPORT_BYTES)
        self.store.finish_run(run_id, report, request.out_dir)
        return _message(pb.Run, self.store.get_run(run_id))

    def FailRun(self, request, context):
        run_id = _run_id(request.run_id)
        self.store.fail_run(run_id, text(request.reason[:2000], "reason", 2000) or "failed (no reason given)")
        return _message(pb.Run, self.store.get_run(run_id))


def _parse(cls, raw: bytes):
    try:
        return cls.FromString(raw)
    except (DecodeError, ValueError, RuntimeError, RecursionError) as exc:
        raise InvalidArgument(f"malformed {cls.DESCRIPTOR.name}: {str(exc)[:200]}") from None


def _guarded(method, name: str, request_streaming: bool, response_streaming: bool, request_cls, response_cls,
             limits: Limits, watchdog: Watchdog):
    """The gRPC behaviour of one method: read the request bytes under the idle limit, parse, call, map errors to
    statuses. Served as a request stream whatever the proto says (the wire format is the same)."""

    def requests(raw, guard: CallGuard):
        parsed = (_parse(request_cls, r) for r in guard.requests(raw))
        if request_streaming:
            return parsed
        first = next(parsed, None)
        if first is None:
            raise InvalidArgument(f"{name}: the call ended before its request message")
        return first

    def fail(context, guard: CallGuard, exc: Exception):
        if guard.ended:  # the server ended the call (its status is sent); the handler's error follows from it
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, guard.ended)
        if isinstance(exc, grpc.RpcError):  # the client went away while the server read from it
            context.abort(grpc.StatusCode.CANCELLED, f"{name}: the client cancelled the call")
        code, details = status_of(exc)
        context.abort(code, shorten(details))

    if response_streaming:
        def behaviour(raw, context):
            guard = CallGuard(context, limits, watchdog, name)
            try:
                yield from guard.responses(method(requests(raw, guard), context))
            except Exception as exc:  # every error leaves as a status with a message (abort raises)
                fail(context, guard, exc)
            finally:
                guard.close()

        return grpc.stream_stream_rpc_method_handler(behaviour, response_serializer=response_cls.SerializeToString)

    def behaviour(raw, context):
        guard = CallGuard(context, limits, watchdog, name)
        try:
            return method(requests(raw, guard), context)
        except Exception as exc:
            fail(context, guard, exc)
        finally:
            guard.close()

    return grpc.stream_unary_rpc_method_handler(behaviour, response_serializer=response_cls.SerializeToString)


def service_handler(name: str, implementation, limits: Limits, watchdog: Watchdog) -> grpc.GenericRpcHandler:
    """The handler of service `name` (from the proto's descriptor) backed by `implementation`'s methods."""
    service = pb.DESCRIPTOR.services_by_name[name]
    handlers = {
        m.name: _guarded(getattr(implementation, m.name), m.name, m.client_streaming, m.server_streaming,
                         getattr(pb, m.input_type.name), getattr(pb, m.output_type.name), limits, watchdog)
        for m in service.methods
    }
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def handlers(store: Store, data_roots: tuple[Path, ...] = (), limits: Limits = Limits()
             ) -> list[grpc.GenericRpcHandler]:
    watchdog = Watchdog()
    return [service_handler("AdminService", AdminService(store, data_roots), limits, watchdog),
            service_handler("RecorderService", RecorderService(store), limits, watchdog)]
