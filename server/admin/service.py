"""The admin API's services over the run store: AdminService (what an operator asks) and RecorderService (how a
ServerApp records its runs).

Requests are parsed here from their bytes (not by gRPC), so a malformed message is INVALID_ARGUMENT like any other
bad input. Every error becomes a gRPC status with a message: a StoreError carries its status name; another
FeddemError is INVALID_ARGUMENT; a store locked by another process too long is UNAVAILABLE (retry); anything
unexpected is INTERNAL (and logged with its traceback).
"""

import json
import logging
import sqlite3
from importlib import metadata

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from feddem.common.errors import FeddemError
from feddem.admin.v1 import admin_pb2 as pb
from feddem.server.admin import models
from feddem.server.store import Store
from feddem.server.store.artefacts import check_name
from feddem.server.store.errors import FailedPrecondition, InvalidArgument, StoreError

log = logging.getLogger("feddem.admin")


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, StoreError):
        return grpc.StatusCode[exc.status], str(exc)
    if isinstance(exc, FeddemError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return grpc.StatusCode.UNAVAILABLE, f"the store is busy ({exc}): try again"
    log.exception("admin API: unexpected error")
    return grpc.StatusCode.INTERNAL, f"internal error of the feddem server: {type(exc).__name__}: {exc}"


def _message(cls, fields: dict):
    """A response message from a store dict (keys the message does not have are left out)."""
    return json_format.ParseDict(fields, cls(), ignore_unknown_fields=True)


def _run_id(value: str) -> str:
    if not value:
        raise InvalidArgument("run_id is empty")
    return check_name(value)


def _version() -> str:
    try:
        return metadata.version("feddem")
    except metadata.PackageNotFoundError:
        return "unknown"


class AdminService:
    def __init__(self, store: Store):
        self.store = store

    def GetStatus(self, request, context):
        return _message(pb.GetStatusResponse, self.store.status(request.verify) | {"version": _version()})

    def ListRuns(self, request, context):
        return pb.ListRunsResponse(runs=[_message(pb.Run, r) for r in self.store.list_runs()])

    def GetRun(self, request, context):
        return _message(pb.Run, self.store.get_run(_run_id(request.run_id)))

    def ListModels(self, request, context):
        found = []
        for run in self.store.list_runs():
            if run["has_model"]:
                full = self.store.get_run(run["run_id"])
                size = sum(a["size"] for a in full["artefacts"] if a["kind"] == "model")
                found.append(_message(pb.Model, full | {"size": size}))
        return pb.ListModelsResponse(models=found)

    def ExportModel(self, request, context):
        run_id = _run_id(request.run_id)
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
        new = models.remerge(self.store, _run_id(request.run_id), dict(request.weights))
        return _message(pb.Run, self.store.get_run(new))

    def EvaluateModel(self, request, context):
        run_id = _run_id(request.run_id)
        results = models.evaluate(self.store, run_id, request.data)
        return pb.EvaluateModelResponse(run_id=run_id, data=request.data, results=[
            pb.DomainLoss(domain=d, loss=r["loss"], perplexity=r["perplexity"], tokens=r["tokens"])
            for d, r in results.items()])

    def RankPool(self, request, context):
        run_id = _run_id(request.run_id)
        rows = models.rank_pool(self.store, run_id, request.candidates, request.data)
        return pb.RankPoolResponse(run_id=run_id, data=request.data, ranking=[
            pb.PoolCandidate(sites=r["candidate"], mean_loss=r.get("mean_loss", 0.0), loss=r.get("loss", {}),
                             error=r.get("error", "")) for r in rows])


class RecorderService:
    def __init__(self, store: Store):
        self.store = store

    def BeginRun(self, request, context):
        try:
            config = json.loads(request.config_json)
        except ValueError as exc:
            raise InvalidArgument(f"config_json is not JSON: {exc}") from None
        run_id = self.store.begin_run(config, request.flower_run_id, writer=request.writer)
        return _message(pb.Run, self.store.get_run(run_id))

    def PutArtefact(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidArgument("PutArtefact: the first message must be the header (run_id, name, kind, size)")
        h = first.header
        if h.size < 0:
            raise InvalidArgument(f"PutArtefact: negative size {h.size}")

        def chunks():
            for part in request_iterator:
                if part.WhichOneof("part") != "data":
                    raise InvalidArgument("PutArtefact: only data may follow the header")
                yield part.data

        stored = self.store.put_artefact(_run_id(h.run_id), h.name, h.kind, chunks(), h.size, h.sha256 or None)
        return _message(pb.Artefact, stored)

    def FinishRun(self, request, context):
        try:
            report = json.loads(request.report_json)
        except ValueError as exc:
            raise InvalidArgument(f"report_json is not JSON: {exc}") from None
        run_id = _run_id(request.run_id)
        self.store.finish_run(run_id, report, request.out_dir)
        return _message(pb.Run, self.store.get_run(run_id))

    def FailRun(self, request, context):
        run_id = _run_id(request.run_id)
        self.store.fail_run(run_id, request.reason or "failed (no reason given)")
        return _message(pb.Run, self.store.get_run(run_id))


def _parse(cls, raw: bytes):
    try:
        return cls.FromString(raw)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise InvalidArgument(f"malformed {cls.DESCRIPTOR.name}: {exc}") from None


def _guarded(method, request_streaming: bool, response_streaming: bool, request_cls, response_cls):
    """The gRPC behaviour of one method: parse the request bytes, call, map errors to statuses."""

    def requests(raw):
        return (_parse(request_cls, r) for r in raw) if request_streaming else _parse(request_cls, raw)

    if response_streaming:
        def behaviour(raw, context):
            try:
                yield from method(requests(raw), context)
            except Exception as exc:  # every error leaves as a status with a message (abort raises)
                context.abort(*status_of(exc))
    else:
        def behaviour(raw, context):
            try:
                return method(requests(raw), context)
            except Exception as exc:
                context.abort(*status_of(exc))

    kind = {(False, False): grpc.unary_unary_rpc_method_handler, (True, False): grpc.stream_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
    return kind[request_streaming, response_streaming](behaviour, response_serializer=response_cls.SerializeToString)


def service_handler(name: str, implementation) -> grpc.GenericRpcHandler:
    """The handler of service `name` (from the proto's descriptor) backed by `implementation`'s methods."""
    service = pb.DESCRIPTOR.services_by_name[name]
    handlers = {
        m.name: _guarded(getattr(implementation, m.name), m.client_streaming, m.server_streaming,
                         getattr(pb, m.input_type.name), getattr(pb, m.output_type.name))
        for m in service.methods
    }
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def handlers(store: Store) -> list[grpc.GenericRpcHandler]:
    return [service_handler("AdminService", AdminService(store)), service_handler("RecorderService",
                                                                                  RecorderService(store))]
