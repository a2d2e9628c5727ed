"""Recording a run in the run store: directly (`LocalRecorder`, a store folder on this machine) or through the feddem
server's RecorderService (`RemoteRecorder`). Both take the same steps, so simulation and deployment runs look
alike in the store:

    run_id = recorder.begin(config, flower_run_id)           # the run is `running`
    record_outputs(recorder, run_id, out_dir, report)        # artefacts, then the report: `finished`
    recorder.fail(run_id, reason)                            # or `failed` with a reason

The ServerApp finds its recorder in the environment (`recorder_from_environment`): `FEDDEM_STORE` names a local
store folder; `FEDDEM_ADMIN_SERVER` (with `FEDDEM_ADMIN_TOKEN` and `FEDDEM_ADMIN_CA`) a feddem server.
"""

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from feddem.common.errors import FeddemError

from feddem.server.manifest import KIND_SITE_VECTOR, Manifest
from feddem.server.store import Store, site_vector_name
from feddem.server.store.artefacts import CHUNK

STORE_ENV = "FEDDEM_STORE"
log = logging.getLogger("feddem.server")


class Recorder(Protocol):
    def begin(self, config: dict, flower_run_id: int = 0, kind: str = "federated", parent_run: str = "") -> str: ...

    def put_file(self, run_id: str, name: str, kind: str, path: Path) -> dict: ...

    def finish(self, run_id: str, report: dict, out_dir: str = "") -> None: ...

    def fail(self, run_id: str, reason: str) -> None: ...


class LocalRecorder:
    """Records into a store folder on this machine (the same `Store` the feddem server serves)."""

    def __init__(self, store: Store | str | Path):
        self._owned = not isinstance(store, Store)
        self.store = Store(store) if self._owned else store

    def begin(self, config: dict, flower_run_id: int = 0, kind: str = "federated", parent_run: str = "") -> str:
        return self.store.begin_run(config, flower_run_id, kind, parent_run or None)

    def put_file(self, run_id: str, name: str, kind: str, path: Path) -> dict:
        return self.store.put_file(run_id, name, kind, path)

    def finish(self, run_id: str, report: dict, out_dir: str = "") -> None:
        self.store.finish_run(run_id, report, out_dir)

    def fail(self, run_id: str, reason: str) -> None:
        self.store.fail_run(run_id, reason)

    def close(self) -> None:
        if self._owned:
            self.store.close()


class RemoteRecorder:
    """Records through a feddem server's RecorderService (TLS, bearer token)."""

    CALL_TIMEOUT, UPLOAD_TIMEOUT = 120.0, 6 * 3600.0  # seconds

    def __init__(self, server: str, token: str, ca: str | Path | None, cert: str | None = None,
                 key: str | None = None):
        from feddem.admin.v1 import admin_pb2_grpc
        from feddem.server.admin.client import open_channel

        self.pb = _pb()
        self.channel = open_channel(server, token, ca, cert, key)
        self.stub = admin_pb2_grpc.RecorderServiceStub(self.channel)

    def begin(self, config: dict, flower_run_id: int = 0, kind: str = "federated", parent_run: str = "") -> str:
        if kind != "federated" or parent_run:
            raise ValueError("a remote recorder records federated runs only")
        from feddem.server.store.owner import current_owner

        run = self.stub.BeginRun(self.pb.BeginRunRequest(config_json=json.dumps(config), flower_run_id=flower_run_id,
                                                         writer=current_owner()), timeout=self.CALL_TIMEOUT)
        return run.run_id

    def put_file(self, run_id: str, name: str, kind: str, path: Path) -> dict:
        size = Path(path).stat().st_size

        def parts():
            yield self.pb.PutArtefactRequest(header=self.pb.ArtefactHeader(run_id=run_id, name=name, kind=kind,
                                                                           size=size))
            with open(path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield self.pb.PutArtefactRequest(data=chunk)

        a = self.stub.PutArtefact(parts(), timeout=self.UPLOAD_TIMEOUT)
        return {"name": a.name, "kind": a.kind, "size": a.size, "sha256": a.sha256}

    def finish(self, run_id: str, report: dict, out_dir: str = "") -> None:
        self.stub.FinishRun(self.pb.FinishRunRequest(run_id=run_id, report_json=json.dumps(report), out_dir=out_dir),
                            timeout=self.CALL_TIMEOUT)

    def fail(self, run_id: str, reason: str) -> None:
        self.stub.FailRun(self.pb.FailRunRequest(run_id=run_id, reason=reason[:2000]), timeout=self.CALL_TIMEOUT)

    def close(self) -> None:
        """Close the channel (an open gRPC channel can keep a finishing process from exiting)."""
        self.channel.close()


def _pb():
    from feddem.admin.v1 import admin_pb2

    return admin_pb2


def recorder_from_environment(environ: dict | None = None) -> Recorder | None:
    """The recorder that the environment names, or None when it names none (the run is not recorded)."""
    from feddem.server.admin.client import ADDRESS_ENV, CA_ENV, CERT_ENV, KEY_ENV, TOKEN_ENV

    env = os.environ if environ is None else environ
    if env.get(STORE_ENV):
        return LocalRecorder(env[STORE_ENV])
    if env.get(ADDRESS_ENV):
        return RemoteRecorder(env[ADDRESS_ENV], env.get(TOKEN_ENV, ""), env.get(CA_ENV) or None,
                              env.get(CERT_ENV) or None, env.get(KEY_ENV) or None)
    return None


def output_files(out_dir: Path, report: dict, manifest: Manifest | None = None) -> list[tuple[str, str, Path]]:
    """(artefact name, kind, file) of a finished run folder, from its manifest (rebuilt from the folder when the
    run gave none): the merged model's files, the aggregate, the report files and, for a trusted run that kept its
    pool, each site's vector."""
    manifest = manifest or Manifest.of_folder(Path(out_dir))
    files = []
    for output in manifest.recorded():
        if output.kind == KIND_SITE_VECTOR:
            if report.get("aggregation") != "plain":  # only a trusted run's vectors may reach the store
                continue
            name = site_vector_name(Path(output.path).stem)
        else:
            name = output.path
        files.append((name, output.kind, manifest.path(output.path)))
    return files


def record_outputs(recorder: Recorder, run_id: str, out_dir: Path, report: dict,
                   manifest: Manifest | None = None) -> None:
    """Put every output file of the run (those its manifest names), then its report (which marks it finished)."""
    for name, kind, path in output_files(out_dir, report, manifest):
        recorder.put_file(run_id, name, kind, path)
    recorder.finish(run_id, report, str(out_dir))


def _describe(exc: BaseException) -> str:
    import grpc

    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__


def _fail_quietly(recorder: Recorder, run_id: str, reason: str) -> None:
    try:
        recorder.fail(run_id, reason)
    except Exception as exc:  # the store is gone too: a restarted store marks the run interrupted
        log.error("could not mark run %s failed in the store: %s", run_id, _describe(exc))


def recorded(config: dict, flower_run_id: int, run: Callable):
    """Call `run()` (a DEM run returning a RunResult) and record it when the environment names a store or server:
    begun before it starts (an unreachable store stops the run before any training), finished with its outputs,
    or failed with the reason."""
    recorder = recorder_from_environment()
    if recorder is None:
        return run()
    try:
        return _record(recorder, config, flower_run_id, run)
    finally:
        if hasattr(recorder, "close"):
            recorder.close()


def _record(recorder: Recorder, config: dict, flower_run_id: int, run: Callable):
    try:
        run_id = recorder.begin(config, flower_run_id)
    except Exception as exc:
        raise FeddemError(f"cannot record the run in the store ({_where()}): {_describe(exc)}") from None
    log.info("recording the run in the store (%s) as %s", _where(), run_id)
    try:
        result = run()
    except BaseException as exc:
        _fail_quietly(recorder, run_id, _describe(exc))
        raise
    try:
        record_outputs(recorder, run_id, result.out_dir, result.report, getattr(result, "manifest", None))
    except Exception as exc:
        _fail_quietly(recorder, run_id, f"recording the outputs failed: {_describe(exc)}")
        raise FeddemError(f"the run finished ({result.out_dir}) but recording it in the store failed: "
                          f"{_describe(exc)}") from None
    log.info("recorded as run %s", run_id)
    return result


def _where() -> str:
    from feddem.server.admin.client import ADDRESS_ENV

    return os.environ.get(STORE_ENV) or os.environ.get(ADDRESS_ENV, "")
