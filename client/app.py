"""The feddem ClientApp: Flower message handlers around the site logic in `client.site`.

Every request is read through `common.messages`: its protocol version first (another major is refused, naming both
versions), then its envelope (the site's settings and the base model) and its own content; a missing or mistyped
field is named. A site's clean refusal or failure (bad data, wrong checksum, a privacy-guard refusal, a version it
cannot speak, ...) comes back as a `Failure` with the reason, so the server can report it and go on with the other
sites. The four `query.sa_*` handlers are the site's side of secure aggregation (`client.secure_upload`);
`train.upload` is the plain path, which the site's guard allows only where its node config does
(`client.upload.plain_upload`).

`client.site` (transformers, datasets) and torch are imported by the handlers that need them, not at module load:
in a deployment every message starts a fresh `flwr-clientapp` process, and the four secure-aggregation stages read
the stored vector with numpy alone (`common.stored_tensors`).
"""

import logging
import time

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from feddem.client import guard, retention, secure_upload
from feddem.common.site_context import SiteContext
from feddem.common import messages as M
from feddem.common.errors import FeddemError
from feddem.common.logsetup import ensure_app_logging

log = logging.getLogger("feddem.site")

app = ClientApp()


def _handle(msg: Message, context: Context, work) -> Message:
    """Run `work(content, site, envelope) -> RecordDict`; a FeddemError becomes the reply's `Failure`. Every reply
    carries this site's protocol version."""
    ensure_app_logging()  # a no-op where an entry point configured logging
    started = time.perf_counter()
    site = None
    try:
        site = SiteContext.from_node_config(dict(context.node_config))
        envelope = M.Envelope.from_record(msg.content)  # the version first: another major is refused here
        content = work(msg.content, site, envelope)
    except FeddemError as exc:
        log.error("site refused or failed: %s", exc)
        # the site's name with the reason, so the server's report names the site, not its Flower node id
        content = M.Failure(str(exc), site.name if site is not None else None).to_record()
    log.debug("%s handled in %.2f s", msg.metadata.message_type, time.perf_counter() - started)
    return Message(M.stamp(content), reply_to=msg)


def _vector(record):
    from feddem.common.vector_records import vector_from_record

    return None if record is None else vector_from_record(record)


@app.train()
def train(msg: Message, context: Context) -> Message:
    def work(content: RecordDict, site: SiteContext, envelope: M.Envelope) -> RecordDict:
        from feddem.client.site import fine_tune

        request = M.TrainRequest.from_record(content)
        cfg, node_config = envelope.settings, dict(context.node_config)
        guard.check_plain_mode(site, cfg, guard.GuardPolicy.for_site(cfg, node_config))  # before any training
        result = fine_tune(cfg, site, envelope.base.ref, envelope.base.checksum, context.run_id,
                           _vector(request.start), _vector(request.target), request.embedding)
        embedding = result.pop("embedding", None)
        retention.apply(site, node_config, keep=context.run_id)  # node config keep-runs: older vectors go
        # the vector's parameter names (not its values): the server needs them to lay out a secure sum
        return M.TrainReply(result, secure_upload.vector_layout(site, context.run_id), embedding).to_record()

    return _handle(msg, context, work)


@app.train("upload")
def upload(msg: Message, context: Context) -> Message:
    def work(content: RecordDict, site: SiteContext, envelope: M.Envelope) -> RecordDict:
        request = M.UploadRequest.from_record(content)
        from feddem.client.upload import plain_upload  # through the guard: a site decides what leaves it

        vector = plain_upload(site, envelope.settings, dict(context.node_config), context.run_id, request.weight)
        return M.UploadReply(vector).to_record()

    return _handle(msg, context, work)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    def work(content: RecordDict, site: SiteContext, envelope: M.Envelope) -> RecordDict:
        from feddem.client.site import evaluate_merged

        request = M.EvaluateRequest.from_record(content)
        result = evaluate_merged(envelope.settings, site, envelope.base.ref, envelope.base.checksum,
                                 _vector(request.aggregate), request.split)
        return M.EvaluateReply(result).to_record()

    return _handle(msg, context, work)


def _secure_stage(msg: Message, context: Context) -> Message:
    """One stage of secure aggregation; the round's secret state stays in `context.state`."""
    stage = secure_upload.STAGES[msg.metadata.message_type]

    def work(content: RecordDict, site: SiteContext, envelope: M.Envelope) -> RecordDict:
        return stage(site, envelope.settings, dict(context.node_config), context.run_id, content, context.state)

    return _handle(msg, context, work)


for _message_type in secure_upload.STAGES:  # one handler serves the four stages, routed by message type
    app.query(_message_type.split(".", 1)[1])(_secure_stage)
