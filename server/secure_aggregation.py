"""Secure aggregation over Flower's Grid: the server learns sum_i w_i d_i of the surviving sites and nothing else.

`SecureRound` drives the `SecAggServer` of `common.secagg` through four message stages, one method each
(`common.messages`: sa_keys, sa_share, sa_masked, sa_unmask; the site's side is `client.secure_upload`). Flower node ids map to small client ids (0..n-1
in sorted node order). Masked vectors are pulled one reply at a time and added to the server's one ring
accumulator as they are read, so the server's memory is O(vector), not O(sites x vector): the accumulator plus
one reply. `upload-parts` K > 1 asks each site for its masked vector in K messages (K rounds of the masked stage,
each for a `span` of elements), so that a reply is 1/K of a vector; a site lost after its first part then fails
the round, as its partial input cannot be removed from the sum.

Dropouts: a site that errors, refuses (its privacy guard) or does not answer within `timeout` at any stage after
key sharing is dropped; while at least `threshold` sites remain the sum is exact for the survivors (up to the
quantization bound). Below the threshold, or when a share or a masked vector fails its integrity check, this
raises a FeddemError that names the stage and the counts: nothing is merged, there is no plaintext fallback.
A dropped site's weight is simply absent from the sum (renormalising would need a second aggregation, which the
sites' guards refuse): the caller reports the effective weights.
"""

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from feddem.common import messages as M
from feddem.common.errors import FeddemError
from feddem.common.secagg import SecAggError, SecAggParams, SecAggServer, choose_bits, error_bound
from feddem.common.secagg.params import round_binding
from feddem.common.secagg import CIPHERTEXT_BYTES, KEY_BYTES
from feddem.common.vector_records import array_view
from feddem.common.vectors import Vector
from feddem.common.weighting.weights import check_range
from feddem.server.messaging import failure_reason, pull_one_at_a_time, push_each

log = logging.getLogger("feddem.server")

_BLOCK = 1 << 20  # elements unmasked at a time


@dataclass
class SecureSum:
    """The unmasked sum and what the report needs to say about it."""

    aggregate: Vector
    survivors: list[int]  # Flower node ids whose w_i d_i is in the sum
    dropped: dict[int, str] = field(default_factory=dict)  # node id -> "stage: reason"
    error_bound: float = 0.0  # max |secure - exact sum of the clipped inputs| per element
    threshold: int = 0
    bits: int = 32
    clip: float = 1.0
    clipped: dict[int, int] = field(default_factory=dict)  # node id -> elements clipped at the site


class _Round:
    """One secure-aggregation round over the Grid: the exchange helper and the dropout book-keeping."""

    def __init__(self, grid: Grid, cfg, base: ConfigRecord, session: bytes):
        self.grid, self.cfg, self.base, self.session = grid, cfg, base, session
        self.dropped: dict[int, str] = {}

    def exchange(self, stage: str, message_type: str, per_node: dict[int, RecordDict], on_reply) -> set[int]:
        """Send one message per node, then pull replies ONE at a time and hand each to `on_reply(node, content)`
        as it arrives (a FeddemError there drops the node). Returns the nodes that succeeded."""
        def not_sent(node):
            self.dropped[node] = f"{stage}: the message could not be sent"

        pending = push_each(self.grid, self.cfg, self.base, message_type, per_node, not_sent)
        log.info("secure aggregation, %s: %d site(s)", stage, len(pending))
        ok: set[int] = set()
        for node, reply in pull_one_at_a_time(self.grid, pending, self.cfg.timeout):
            self._take(stage, node, reply, on_reply, ok)
            del reply  # a masked upload is a whole vector: held one at a time
        for node in pending.values():
            self.dropped[node] = f"{stage}: no reply within {self.cfg.timeout:.0f} s"
        return ok

    def _take(self, stage: str, node: int, reply: Message, on_reply, ok: set[int]) -> None:
        reason = failure_reason(reply)
        if reason is not None:
            self.dropped[node] = f"{stage}: {reason}"
        else:
            try:
                on_reply(node, reply.content)
                ok.add(node)
            except (FeddemError, KeyError, TypeError, ValueError) as exc:
                self.dropped[node] = f"{stage}: malformed reply ({type(exc).__name__}: {exc})"
        if node in self.dropped:
            log.warning("secure aggregation, %s: node-%d dropped: %s", stage, node, self.dropped[node])


def _fail(stage: str, exc: Exception, total: int, alive: int, threshold: int, dropped: dict[int, str]) -> FeddemError:
    why = "; ".join(f"node-{n}: {r}" for n, r in sorted(dropped.items())) or "none dropped"
    return FeddemError(
        f"secure aggregation failed at stage '{stage}': {exc} ({alive} of {total} sites left, threshold "
        f"{threshold}; dropped: {why}). Nothing was merged and nothing was sent in the clear."
    )


def upload_spans(length: int, parts: int) -> list[tuple[int, int]]:
    """The elements [lo, hi) of a vector of `length` elements that each of `parts` masked-upload messages carries:
    consecutive, as equal as can be (never empty: at most `length` parts)."""
    parts = max(1, min(parts, length))
    bounds = [length * k // parts for k in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _check_masked(record, tags: M.MaskedReply, params: SecAggParams, server: SecAggServer,
                  client_id: int, span: tuple[int, int]) -> list[tuple[int, np.ndarray]]:
    """The chunks of one masked upload message, checked whole BEFORE any is added (a partial input cannot be
    removed): dtype, shape, coverage of the ring elements of `span` (with the check block when it ends the
    vector), and each chunk's upload tag (a changed chunk raises TamperError)."""
    chunks = []
    for name, array in record.items():
        data = array_view(array)  # a view of the message's bytes: the upload is not copied
        if data.dtype != params.ring.dtype or data.ndim != 1:
            raise FeddemError(f"masked chunk '{name}' has dtype {data.dtype} and shape {data.shape}, "
                              f"expected a 1-D {params.ring.dtype} array")
        chunks.append((int(name), data))
    chunks.sort(key=lambda c: c[0])
    position, end = span[0], params.ring_length if span[1] == params.vector_length else span[1]
    for offset, data in chunks:
        if offset != position:
            raise FeddemError(f"masked upload has a gap or overlap at ring offset {position} (next chunk at {offset})")
        position += data.shape[0]
    if position != end:
        raise FeddemError(f"masked upload covers ring elements [{span[0]}, {position}), expected "
                          f"[{span[0]}, {end})")
    tag_of = dict(zip(tags.offsets, tags.tags, strict=True))
    for offset, data in chunks:
        server.verify_tag(client_id, data, offset, tag_of.get(offset, b""))
    return chunks


def _unflatten(flat: np.ndarray, layout: list[str], shapes: dict[str, torch.Size]) -> Vector:
    """The flat float32 sum as tensors by parameter name (views of `flat`: no copy)."""
    values = torch.from_numpy(flat)
    vector: Vector = {}
    offset = 0
    for name in layout:
        count = int(torch.Size(shapes[name]).numel())
        vector[name] = values[offset:offset + count].view(shapes[name])
        offset += count
    return vector


def _check_round(cfg, weights: dict[int, float], layout: list[str], shapes: dict[str, torch.Size]) -> int:
    """The round's threshold, after the checks that need no site (enough sites, weights the guards accept, a layout
    the base has)."""
    n = len(weights)
    threshold = cfg.threshold_for(n)
    if n - 1 < cfg.min_peers or n < threshold:
        raise FeddemError(f"secure aggregation needs at least {max(threshold, cfg.min_peers + 1)} sites "
                          f"(threshold {threshold}, min-peers {cfg.min_peers}); only {n} finished training. "
                          f"Nothing was merged.")
    check_range(weights, cfg.weight_min, cfg.weight_max, "the sites' privacy guards would refuse them")
    unknown = [name for name in layout if name not in shapes]
    if unknown or not layout:
        raise FeddemError(f"the sites' vector layout names parameters the base model lacks: {unknown[:5]}")
    return threshold


class SecureRound:
    """One secure sum over the Grid, one method per stage (keys, share, masked, unmask) and `run()` that calls them
    in turn. The `SecAggServer` holds the protocol's state and its accumulator; this object holds the transport's:
    node <-> client ids, the masked stage's spans, the elements clipped at each site and the dropouts."""

    def __init__(self, grid: Grid, cfg, base: ConfigRecord, weights: dict[int, float], layout: list[str],
                 shapes: dict[str, torch.Size], finer: float = 1.0):
        self.cfg, self.weights, self.layout, self.shapes = cfg, weights, layout, shapes
        self.nodes = sorted(weights)
        self.threshold = _check_round(cfg, weights, layout, shapes)
        self.cid = {node: i for i, node in enumerate(self.nodes)}
        self.node_of = {i: node for node, i in self.cid.items()}
        n = len(self.nodes)
        # the ring's rounding error of the sum may be what the run's vector dtype would round a value at the clip to
        # (float32: a finer 2^-20, so 32 or 64 bits; a 16-bit float: 16 bits where n allows); `finer` divides it (a
        # merge rule whose parts are scaled down to fit the clip: `common.merging.parts.ring_finer`)
        self.bits = choose_bits(n, cfg.clip, cfg.clip * max(torch.finfo(cfg.torch_vector_dtype).eps / 2, 2.0**-20)
                                / finer)
        self.length = sum(int(torch.Size(shapes[name]).numel()) for name in layout)
        params = SecAggParams.create(self.cid.values(), self.length, cfg.clip, threshold=self.threshold,
                                     bits=self.bits)
        self.all_weights = [float(weights[self.node_of[i]]) for i in params.client_ids]
        params, server_key = SecAggServer.with_server_key(params)  # the sites tag their uploads for this key
        # the sites check the binding (client.secure_upload)
        self.params = replace(params, session=round_binding(params, self.all_weights))
        self.server = SecAggServer(self.params, server_key)
        self.exchange = _Round(grid, cfg, base, self.params.session)
        self.clipped: dict[int, int] = {}
        self.stage = "keys"

    def run(self) -> SecureSum:
        """All four stages, then the unmasked sum; a protocol failure raises a FeddemError naming the stage."""
        try:
            broadcast = self.keys()
            routed = self.share(broadcast)
            self.masked(routed)
            request = self.unmask()
        except SecAggError as exc:
            n = len(self.nodes)
            raise _fail(self.stage, exc, n, n - len(self.exchange.dropped), self.threshold,
                        self.exchange.dropped) from None
        return self.result(request)

    def keys(self) -> dict[int, tuple[bytes, bytes]]:
        """Stage 1: each site's two public keys; returns the broadcast of the sites that advertised."""
        self.stage = "keys"
        params, cid, weights, layout, all_weights = (self.params, self.cid, self.weights, self.layout,
                                                     self.all_weights)
        keys: dict[int, tuple[bytes, bytes]] = {}

        def on_keys(node, content):
            reply = M.KeysReply.from_record(content)
            pk_c, pk_s = reply.pk_c, reply.pk_s
            if len(pk_c) != KEY_BYTES or len(pk_s) != KEY_BYTES:
                raise FeddemError(f"public keys must be {KEY_BYTES} bytes")
            keys[cid[node]] = (pk_c, pk_s)

        self.exchange.exchange(self.stage, M.SA_KEYS, {node: M.KeysRequest(
            params, cid[node], float(weights[node]), all_weights, list(layout)).to_record() for node in self.nodes},
            on_keys)
        return self.server.collect_public_keys(keys)

    def share(self, broadcast: dict[int, tuple[bytes, bytes]]) -> dict[int, dict[int, bytes]]:
        """Stage 2: each site's encrypted shares for its neighbours; returns them routed by receiver."""
        self.stage = "share"
        params, cid, node_of = self.params, self.cid, self.node_of
        shares: dict[int, dict[int, bytes]] = {}

        def on_share(node, content):
            reply = M.ShareReply.from_record(content)
            out = dict(zip(reply.to, reply.ct, strict=True))
            expected = {v for v in params.neighbours[cid[node]] if v in broadcast}
            if set(out) != expected or any(len(ct) != CIPHERTEXT_BYTES for ct in out.values()):
                raise FeddemError(f"shares addressed to {sorted(out)}, expected {sorted(expected)}")
            shares[cid[node]] = out

        ids = sorted(broadcast)
        self.exchange.exchange(self.stage, M.SA_SHARE, {node_of[i]: M.ShareRequest(
            params.session, ids, [broadcast[i][0] for i in ids], [broadcast[i][1] for i in ids]).to_record()
            for i in ids}, on_share)
        return self.server.route_shares(shares)

    def masked(self, routed: dict[int, dict[int, bytes]]) -> None:
        """Stage 3: each site's masked vector, in `upload-parts` messages, each checked whole and added to the
        server's accumulator as it is read. A site lost after its first part fails the round."""
        spans = upload_spans(self.length, self.cfg.upload_parts)
        senders = set(routed)
        for part, span in enumerate(spans):
            self.stage = "masked" if len(spans) == 1 else f"masked, part {part + 1} of {len(spans)}"
            senders = self._masked_part(routed, part, span, senders)

    def _masked_part(self, routed: dict[int, dict[int, bytes]], part: int, span: tuple[int, int],
                     senders: set[int]) -> set[int]:
        """One part of the masked stage; returns the client ids whose part arrived."""
        params, server, cid, node_of = self.params, self.server, self.cid, self.node_of
        clipped = self.clipped

        def on_masked(node, content, span=span):
            reply = M.MaskedReply.from_record(content)
            chunks = _check_masked(reply.masked, reply, params, server, cid[node], span)
            for offset, data in chunks:
                server.add_masked_chunk(cid[node], data, offset)
            clipped[node] = clipped.get(node, 0) + reply.clipped

        shares = {i: (list(routed[i]), list(routed[i].values())) if part == 0 else ([], []) for i in senders}
        done = self.exchange.exchange(self.stage, M.SA_MASKED, {node_of[i]: M.MaskedRequest(
            params.session, span, *shares[i]).to_record() for i in sorted(senders)}, on_masked)
        lost = sorted(node_of[i] for i in senders if node_of[i] not in done)
        if part > 0 and lost:
            raise SecAggError(
                f"{', '.join(f'node-{node}' for node in lost)} dropped after uploading part of its masked "
                f"vector: a partial masked input cannot be removed from the sum (--upload-parts 1 tolerates a "
                f"dropout at any stage)")
        return {cid[node] for node in done}

    def unmask(self):
        """Stage 4: the survivors' shares of the self-masks and of the dropped sites' keys; the server removes the
        masks (and checks the sum's check block)."""
        request = self.server.unmask_request()
        self.stage = "unmask"
        cid, node_of = self.cid, self.node_of
        unmask_shares: dict[int, dict[int, bytes]] = {}

        def on_unmask(node, content):
            reply = M.UnmaskReply.from_record(content)
            unmask_shares[cid[node]] = dict(zip(reply.peers, reply.shares, strict=True))

        self.exchange.exchange(self.stage, M.SA_UNMASK, {node_of[i]: M.UnmaskRequest(
            self.params.session, list(request.survivors), list(request.dropped)).to_record()
            for i in request.survivors}, on_unmask)
        self.server.recover_masks(unmask_shares)
        return request

    def result(self, request) -> SecureSum:
        """The unmasked sum as tensors (views of the server's accumulator) and what the report says of it."""
        survivors = [self.node_of[i] for i in request.survivors]
        aggregate = _unflatten(self.server.unmasked_sum(_BLOCK), self.layout, self.shapes)
        bound = error_bound(self.params.ring, len(survivors), np.float32)
        dropped = {node: why for node, why in self.exchange.dropped.items() if node not in survivors}
        log.info("secure aggregation: %d of %d sites in the sum, error bound %.3g per element, threshold %d",
                 len(survivors), len(self.nodes), bound, self.threshold)
        return SecureSum(aggregate, survivors, dropped, bound, self.threshold, self.bits, float(self.params.clip),
                         {node: self.clipped.get(node, 0) for node in survivors})


def secure_sum(grid: Grid, cfg, base: ConfigRecord, weights: dict[int, float], layout: list[str],
               shapes: dict[str, torch.Size], finer: float = 1.0) -> SecureSum:
    """sum_i w_i d_i over the nodes in `weights` by secure aggregation (`SecureRound`); `layout` is the sorted
    parameter names of the sites' vectors and `shapes` their shapes (from the base model); `finer` > 1 asks for a
    ring that much finer than the run's vector dtype needs."""
    return SecureRound(grid, cfg, base, weights, layout, shapes, finer).run()
