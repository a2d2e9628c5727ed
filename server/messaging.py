"""Addressing messages to sites and reading their replies: one implementation for every stage of a run.

Every message goes out in its `common.messages` envelope: this server's protocol version, the site's part of the run
config (`SiteSettings`, not the whole of it) and the base model. A reply is a result only when it carries no error,
no `Failure`, and a protocol version of this server's major."""

import time
from collections.abc import Callable, Iterator

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from feddem.common import messages as M
from feddem.common.config import RunConfig
from feddem.common.errors import FeddemError
from feddem.common.memory import release_memory

POLL_FIRST, POLL_MAX = 0.005, 0.05  # seconds between polls for replies: short, doubling while none arrives


def site_message(cfg: RunConfig, base: ConfigRecord, node: int, message_type: str, content: RecordDict) -> Message:
    """A message to one site: `content` (one request's records, `common.messages`) in the envelope every handler
    needs (the protocol version, the site's settings from `cfg`, the base model of the `base` record)."""
    envelope = M.Envelope(M.SiteSettings.from_run_config(cfg), M.BaseModelRef.from_record(base))
    return Message(envelope.wrap(content), dst_node_id=node, message_type=message_type)


def failure_reason(reply: Message) -> str | None:
    """Why a site's reply is not a result (a Flower error or the site's own refusal), or None when it is one."""
    if reply.has_error():
        lines = [line.strip() for line in str(reply.error.reason).splitlines() if line.strip()]
        return lines[-1][:500] if lines else "unknown error"  # the useful end of a remote traceback
    failure = M.Failure.from_record(reply.content)  # readable whatever the site's version
    if failure is not None:
        return failure.reason
    try:
        M.peer_version(reply.content, "the site", "this server")
    except FeddemError as exc:
        return str(exc)
    return None


def push_each(grid: Grid, cfg: RunConfig, base: ConfigRecord, message_type: str, per_node: dict[int, RecordDict],
              not_sent: Callable[[int], None]) -> dict[str, int]:
    """Send one message per node; returns message id -> node (`not_sent(node)` for each one that could not go)."""
    pending: dict[str, int] = {}
    for node, content in per_node.items():
        ids = list(grid.push_messages([site_message(cfg, base, node, message_type, content)]))
        if ids:
            pending[ids[0]] = node
        else:
            not_sent(node)
    return pending


def pull_one_at_a_time(grid: Grid, pending: dict[str, int], timeout: float) -> Iterator[tuple[int, Message]]:
    """Yield (node, reply) as each reply arrives, pulling them one at a time, until none is pending or `timeout`
    seconds have passed (the nodes still in `pending` then did not answer). A reply that carries arrays may be a
    whole vector: it is let go, and its memory given back, before the next one is pulled, so the caller holds one
    at a time (it must not keep the reply itself)."""
    deadline, delay = time.monotonic() + timeout, POLL_FIRST
    while pending and time.monotonic() < deadline:
        progressed = False
        for message_id in list(pending):
            for reply in grid.pull_messages([message_id]):
                node, progressed = pending.pop(message_id), True
                large = reply.has_content() and len(reply.content.array_records) > 0
                yield node, reply
                del reply
                if large:
                    release_memory(collect=True)
        delay = POLL_FIRST if progressed else min(POLL_MAX, delay * 2)
        if pending and not progressed:
            time.sleep(delay)
