"""The feddem ClientApp: Flower message handlers around the site logic in `client.site`.

A site's clean refusal or failure (bad data, wrong checksum, a privacy-guard refusal, ...) comes back as a `failure`
record with the reason, so the server can report it and go on with the other sites. The four `query.sa_*` handlers
are the site's side of secure aggregation (`client.secure_upload`); `train.upload` is the plain path, which
the site's guard allows only where its node config does (`client.upload.plain_upload`).

`client.site` (transformers, datasets) and torch are imported by the handlers that need them, not at module load:
in a deployment every message starts a fresh `flwr-clientapp` process, and the four secure-aggregation stages read
the stored vector with numpy alone (`common.stored_tensors`).
"""

import logging
import time

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from feddem.client import guard, retention, secure_upload
from feddem.common.site_context import SiteContext
from feddem.common import messages as M
from feddem.common.config import RunConfig
from feddem.common.errors import FeddemError
from feddem.common.logsetup import ensure_app_logging
from feddem.common.weighting import EMBEDDING, strategy

log = logging.getLogger("feddem.site")

app = ClientApp()


def _split(result: dict) -> RecordDict:
    """Strings go in the `site` ConfigRecord, numbers in the `metrics` MetricRecord."""
    text = {k: v for k, v in result.items() if isinstance(v, str)}
    numbers = {k: v for k, v in result.items() if not isinstance(v, str)}
    return RecordDict({M.SITE: ConfigRecord(text), M.METRICS: MetricRecord(numbers)})


def _handle(msg: Message, context: Context, work) -> Message:
    ensure_app_logging()  # a no-op where an entry point configured logging
    started = time.perf_counter()
    site = None
    try:
        site = SiteContext.from_node_config(dict(context.node_config))
        cfg = RunConfig.from_record(dict(msg.content.config_records[M.CONFIG]))
        base = msg.content.config_records[M.BASE]
        content = work(msg, site, cfg, str(base["model-ref"]), str(base["model-checksum"]))
    except FeddemError as exc:
        log.error("site refused or failed: %s", exc)
        # the site's name with the reason, so the server's report names the site, not its Flower node id
        named = {"site": site.name} if site is not None else {}
        content = RecordDict({M.FAILURE: ConfigRecord({"reason": str(exc)} | named)})
    log.debug("%s handled in %.2f s", msg.metadata.message_type, time.perf_counter() - started)
    return Message(content, reply_to=msg)


def _optional_vector(content: RecordDict, name: str):
    from feddem.common.vector_records import vector_from_record

    return vector_from_record(content.array_records[name]) if name in content.array_records else None


@app.train()
def train(msg: Message, context: Context) -> Message:
    def work(msg, site, cfg, ref, checksum):
        from feddem.client.site import fine_tune

        node_config = dict(context.node_config)
        guard.check_plain_mode(site, cfg, guard.GuardPolicy.for_site(cfg, node_config))  # before any training
        embed = EMBEDDING in strategy(cfg.strategy_name).needs
        result = fine_tune(cfg, site, ref, checksum, context.run_id, _optional_vector(msg.content, M.START),
                           _optional_vector(msg.content, M.TARGET), embed)
        embedding = result.pop("embedding", None)
        content = _split(result)
        if embedding is not None:
            content[M.EMBEDDING] = ArrayRecord({"embedding": Array(embedding)})
        retention.apply(site, node_config, keep=context.run_id)  # node config keep-runs: older vectors go
        # the vector's parameter names (not its values): the server needs them to lay out a secure sum
        content[M.LAYOUT] = ConfigRecord({"names": secure_upload.vector_layout(site, context.run_id)})
        return content

    return _handle(msg, context, work)


@app.train("upload")
def upload(msg: Message, context: Context) -> Message:
    def work(msg, site, cfg, ref, checksum):
        weight = float(msg.content.config_records[M.WEIGHT]["weight"])
        from feddem.client.upload import plain_upload  # through the guard: a site decides what leaves it

        return RecordDict({M.VECTOR: plain_upload(site, cfg, dict(context.node_config), context.run_id, weight)})

    return _handle(msg, context, work)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    def work(msg, site, cfg, ref, checksum):
        from feddem.client.site import evaluate_merged
        from feddem.common.vector_records import vector_from_record

        aggregate = vector_from_record(msg.content.array_records[M.AGGREGATE])
        split = str(msg.content.config_records[M.EVAL]["split"]) if M.EVAL in msg.content.config_records else "test"
        return _split(evaluate_merged(cfg, site, ref, checksum, aggregate, split))

    return _handle(msg, context, work)


def _secure_stage(msg: Message, context: Context) -> Message:
    """One stage of secure aggregation; the round's secret state stays in `context.state`."""
    stage = secure_upload.STAGES[msg.metadata.message_type]

    def work(msg, site, cfg, ref, checksum):
        return stage(site, cfg, dict(context.node_config), context.run_id, msg.content, context.state)

    return _handle(msg, context, work)


for _message_type in secure_upload.STAGES:  # one handler serves the four stages, routed by message type
    app.query(_message_type.split(".", 1)[1])(_secure_stage)
