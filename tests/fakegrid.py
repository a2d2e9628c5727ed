"""A Grid for in-process tests: the real ClientApp handlers behind Flower's protobuf serialisation both ways."""

import uuid
from contextlib import contextmanager

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from feddem.client.app import app as client_app

RUN_ID = 7


class FakeGrid:
    """get_node_ids / push_messages / pull_messages / send_and_receive over the real ClientApp, in-process.

    `faults[(node, message_type)]`: "error" (the site crashes), "silent" (no reply: a timeout), or a function that
    alters the reply (tampering); or a list of these (None: no fault), one for each such message in turn. `seen` keeps the serialised bytes of every reply the server received."""

    def __init__(self, root, nodes, faults=None, node_config=None):
        self.contexts = {
            node: Context(run_id=RUN_ID, node_id=node, state=RecordDict(), run_config={}, node_config={
                "partition-id": i, "num-partitions": len(nodes), "work-dir": str(root / f"site-{i}"),
                **(node_config or {})})
            for i, node in enumerate(nodes)
        }
        self.faults = dict(faults or {})
        self.replies: dict[str, Message] = {}
        self.seen: list[bytes] = []
        self.sent: list[str] = []
        self.requests: list[tuple[str, list[str]]] = []  # (message type, record names) of every message sent

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            msg = message_from_proto(message_to_proto(msg))  # what a site receives is what went over the wire
            self.sent.append(msg.metadata.message_type)
            self.requests.append((msg.metadata.message_type, sorted(msg.content.keys())))
            reply = self._deliver(msg)
            if reply is not None:
                self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, msg):
        node = msg.metadata.dst_node_id
        fault = self.faults.get((node, msg.metadata.message_type))
        if isinstance(fault, list):
            fault = fault.pop(0) if fault else None
        if fault == "silent":
            return None
        if fault == "error":
            reply = Message(Error(code=1, reason="Traceback...\nRuntimeError: site crashed"), reply_to=msg)
        else:
            reply = client_app(msg, self.contexts[node])
            if callable(fault):
                fault(reply)
        wire = message_to_proto(reply)
        self.seen.append(wire.SerializeToString())
        return message_from_proto(wire)


@contextmanager
def task_identity():
    """Messages created outside a Flower process need the task identity a ServerApp process would have."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, 1
    try:
        yield
    finally:
        TaskIdentity._task_id = TaskIdentity._run_id = TaskIdentity._node_id = None
