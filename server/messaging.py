"""Addressing messages to sites and reading their replies: one implementation for every stage of a run."""

from flwr.app import ConfigRecord, Message, RecordDict

from common import messages as M
from common.config import RunConfig


def site_message(cfg: RunConfig, base: ConfigRecord, node: int, message_type: str, content: RecordDict) -> Message:
    """A message to one site, carrying the run config and the base-model reference every handler needs."""
    content[M.CONFIG] = ConfigRecord(cfg.to_record())
    content[M.BASE] = base
    return Message(content, dst_node_id=node, message_type=message_type)


def failure_reason(reply: Message) -> str | None:
    """Why a site's reply is not a result (a Flower error or the site's own refusal), or None when it is one."""
    if reply.has_error():
        lines = [line.strip() for line in str(reply.error.reason).splitlines() if line.strip()]
        return lines[-1][:500] if lines else "unknown error"  # the useful end of a remote traceback
    if M.FAILURE in reply.content.config_records:
        return str(reply.content.config_records[M.FAILURE]["reason"])
    return None
