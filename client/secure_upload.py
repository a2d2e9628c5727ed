"""The site's side of secure aggregation: four stages, each one Flower query message (see `common.messages`).

  sa_keys    params + (client id, weight, names) -> guard checks, fresh X25519 keys -> (pk_c, pk_s)
  sa_share   everyone's public keys              -> guard (peers) -> AES-GCM-encrypted Shamir shares, one per peer
  sa_masked  the shares routed to this site      -> guard (peers, budgets left), mark the vector as spent once
                                                    in the site-wide record (`client.ledger`), then w * d
                                                    flattened in sorted-name order, plus this site's part of
                                                    the noise when the run declares it, clipped to [-clip,
                                                    clip], quantized and masked: ring (16/32/64-bit) chunks.
                                                    With `upload-parts` K > 1 the server asks for the vector
                                                    in K messages, each naming its `span` of elements
  sa_unmask  survivors and dropped sites         -> guard (peers) -> shares that remove the masks

The `SecAggClient` and the guard policy live in `context.state` between stages (a ConfigRecord under `secagg`):
in simulation each message may run in another Ray actor. That state holds the round's secrets and stays on the
node. The weight and the policy are fixed at `sa_keys`; later messages of the round cannot change them.
"""

import logging
from collections.abc import Iterator, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from feddem.client.merge_parts import check_declared, upload_layout, upload_vector
from feddem.client.guard import (
    GuardPolicy, GuardRefusal, check_not_aggregated, check_other_weights, check_peers, check_weight, mark_aggregated, vector_digest,
)
from feddem.common.site_context import SiteContext
from feddem.common import messages as M
from feddem.common.errors import FeddemError
from feddem.common.messages import SiteSettings
from feddem.common.secagg import SecAggClient, SecAggError
from feddem.common.secagg.params import round_binding
from feddem.common.secagg.quantize import _fresh_rng
from feddem.common.stored_tensors import flat_chunks

log = logging.getLogger("feddem.site")

STATE = "secagg"  # key of the ConfigRecord in context.state
CHUNK = 1 << 20  # ring elements per Array of the masked upload (4 MiB for uint32)


def vector_layout(site: SiteContext, run_id: int) -> list[str]:
    """Sorted tensor names of what this site's vector uploads (read from the files' headers, not the data): the
    vector's parameter names, or `<part>/<name>` of the merge rule it was trained for (`client.merge_parts`)."""
    return upload_layout(site, run_id)


def weighted_chunks(vector: Mapping, names: list[str], weight: float, clip: float, noise_std: float = 0.0,
                    size: int | None = None, span: tuple[int, int] | None = None
                    ) -> Iterator[tuple[int, np.ndarray, int]]:
    """`weight * vector` flattened in the order of `names` (only elements [lo, hi) for `span=(lo, hi)`), plus
    Gaussian noise of `noise_std` when asked, clipped to [-clip, clip], as consecutive float32 chunks of `size`
    elements: (offset, chunk, elements clipped in it). Streams: one tensor of the (possibly lazy) vector and one
    chunk at a time."""
    if sorted(vector) != list(names):
        raise FeddemError(f"the server's vector layout ({len(names)} names) is not this site's "
                          f"({len(vector)} names)")
    rng = _fresh_rng() if noise_std > 0 else None
    for offset, chunk in flat_chunks(vector, names, size or CHUNK, span):
        chunk *= np.float32(weight)
        if rng is not None:
            chunk += rng.normal(0.0, noise_std, chunk.size).astype(np.float32)
        clipped = int(np.count_nonzero(np.abs(chunk) > clip))
        if clipped:
            np.clip(chunk, -clip, clip, out=chunk)
        yield offset, chunk, clipped


def _pairs(ids: list[int], values: list) -> dict[int, object]:
    if len(ids) != len(values):
        raise FeddemError(f"malformed secure-aggregation message: {len(ids)} ids but {len(values)} values")
    return {int(i): v for i, v in zip(ids, values)}


class _Round:
    """This node's state of the current round, restored from and saved to `context.state`."""

    def __init__(self, client: SecAggClient, weight: float, policy: GuardPolicy, digest: str):
        self.client, self.weight, self.policy, self.digest = client, weight, policy, digest

    def save(self, state: RecordDict) -> None:
        state[STATE] = ConfigRecord({
            "client": self.client.to_state(), "session": self.client.params.session, "weight": self.weight,
            "min-peers": self.policy.min_peers, "weight-min": self.policy.weight_min,
            "weight-max": self.policy.weight_max, "budget": self.policy.budget, "noise": self.policy.noise,
            "data-budget": self.policy.data_budget, "digest": self.digest,
        })

    @classmethod
    def load(cls, state: RecordDict, session: bytes, site: SiteContext) -> "_Round":
        if STATE not in state.config_records:
            raise FeddemError(f"{site.name} has no secure-aggregation round in progress (keys were never exchanged "
                              f"with this node)")
        rec = state.config_records[STATE]
        if bytes(rec["session"]) != bytes(session):
            raise FeddemError(f"{site.name}: the message is for secure-aggregation session {bytes(session).hex()[:12]}, "
                              f"this site is in session {bytes(rec['session']).hex()[:12]}")
        policy = GuardPolicy(int(rec["min-peers"]), float(rec["weight-min"]), float(rec["weight-max"]),
                             int(rec["budget"]), float(rec["noise"]), int(rec["data-budget"]))
        return cls(SecAggClient.from_state(bytes(rec["client"])), float(rec["weight"]), policy, str(rec["digest"]))


def sa_keys(site: SiteContext, cfg: SiteSettings, node_config: dict, run_id: int, content: RecordDict,
            state: RecordDict) -> RecordDict:
    """Stage 1: the guard's checks, then fresh key pairs for this round."""
    request = M.KeysRequest.from_record(content)
    params, weight = request.params, request.weight
    policy = GuardPolicy.for_site(cfg, node_config)
    check_peers(policy, site, len(params.client_ids) - 1, "keys")
    check_weight(policy, site, weight)
    me = request.client_id
    if me not in params.client_ids:
        raise FeddemError(f"{site.name}: its client id {me} is not in the round")
    everyone = request.weights
    try:
        binding = round_binding(params, everyone)
    except SecAggError as exc:
        raise FeddemError(f"{site.name}: malformed round: {exc}") from None
    if binding != params.session or everyone[params.client_ids.index(me)] != weight:
        raise FeddemError(f"{site.name}: the round's session does not bind its parameters and weights (or this "
                          f"site's weight differs from its entry in them): refusing a round that may not be the "
                          f"same for every site")
    others = [w for cid, w in zip(params.client_ids, everyone) if cid != me]
    check_other_weights(policy, site, others)
    digest = vector_digest(site, run_id)
    check_not_aggregated(site, run_id, digest, policy)
    names = request.names
    declared = check_declared(site, run_id, cfg.merge)
    if names != vector_layout(site, run_id):
        raise GuardRefusal(site.name, f"the server's vector layout ({len(names)} tensors) is not exactly the "
                                      f"{declared.name} upload of its stored vector: it sends the declared parts, "
                                      f"all of them in one sum, or nothing")
    if params.clip != cfg.clip:
        raise FeddemError(f"{site.name}: the round's clip ({params.clip}) is not the run's ({cfg.clip})")
    client = SecAggClient(params, me)
    pk_c, pk_s = client.advertise_keys()
    _Round(client, weight, policy, digest).save(state)
    log.info("%s: secure aggregation session %s, weight %.4f, %d sites, threshold %d", site.name,
             params.session.hex()[:12], weight, len(params.client_ids), params.threshold)
    return M.KeysReply(pk_c, pk_s).to_record()


def sa_share(site: SiteContext, cfg: SiteSettings, node_config: dict, run_id: int, content: RecordDict,
             state: RecordDict) -> RecordDict:
    """Stage 2: Shamir shares of this round's secrets, encrypted for each peer that advertised keys."""
    request = M.ShareRequest.from_record(content)
    rnd = _Round.load(state, request.session, site)
    keys = {i: (c, s) for i, c, s in zip(request.ids, request.pk_c, request.pk_s)}
    check_peers(rnd.policy, site, len(set(keys) - {rnd.client.id}), "share")
    out = rnd.client.share_keys(keys)
    rnd.save(state)
    return M.ShareReply(list(out), list(out.values())).to_record()


def _span(request: M.MaskedRequest, length: int, site: SiteContext) -> tuple[int, int]:
    """The elements [lo, hi) of w * d the server asks for in this message (all of them when it names none)."""
    if request.span is None:
        return 0, length
    span = list(request.span)
    if len(span) != 2 or not 0 <= span[0] < span[1] <= length:
        raise FeddemError(f"{site.name}: malformed upload span {span} for a vector of {length} elements")
    return span[0], span[1]


def sa_masked(site: SiteContext, cfg: SiteSettings, node_config: dict, run_id: int, content: RecordDict,
              state: RecordDict) -> RecordDict:
    """Stage 3: w * d clipped, quantized and masked, in ring chunks with their upload tags; the elements the
    server's `span` names (all by default), the check block with the last ones. The first such message of a round
    carries the peers' shares: the guard checks, and the vector is marked as spent on disk before anything leaves.
    A later part needs that first one (and the masks refuse any element twice)."""
    request = M.MaskedRequest.from_record(content)
    rnd = _Round.load(state, request.session, site)
    client = rnd.client
    length = client.params.vector_length
    lo, hi = _span(request, length, site)
    # the declared rule's upload: the stored vector, lazy (one tensor at a time), or the rule's parts
    vector = upload_vector(site, run_id, lazy_numpy=True)
    if vector_digest(site, run_id) != rnd.digest:
        raise FeddemError(f"{site.name}: the stored vector changed during the secure-aggregation round")
    if client.stage == "shared":  # the first (or only) part
        received = _pairs(request.senders, request.ct)
        check_peers(rnd.policy, site, len(set(received) - {client.id}), "masked")
        check_not_aggregated(site, run_id, rnd.digest, rnd.policy)
        client.receive_shares(received)
        mark_aggregated(site, run_id, rnd.digest, client.params.session, rnd.weight, rnd.policy)
    elif client.stage != "masking":
        raise FeddemError(f"{site.name}: a masked upload was asked for at secure-aggregation stage '{client.stage}'")
    elif request.senders:
        raise FeddemError(f"{site.name}: shares sent again in a later part of the masked upload")
    names = sorted(vector)
    # this site's part of the distributed noise: n equal parts of variance noise^2 / n
    noise_std = rnd.policy.noise / np.sqrt(len(client.params.client_ids))
    arrays, tags, clipped, elements = {}, {}, 0, 0

    def put(start: int, masked: np.ndarray) -> None:  # each chunk with its upload tag (checked by the server)
        arrays[f"{start:012d}"], tags[start] = Array(masked), client.upload_tag(masked, start)

    for start, chunk, over in weighted_chunks(vector, names, rnd.weight, client.params.clip, noise_std,
                                              span=(lo, hi)):
        put(start, client.masked_input_chunk(chunk, start))
        clipped, elements = clipped + over, elements + chunk.size
    if clipped:
        log.warning("%s: %d of %d elements of w*d [%d, %d) exceed clip %g and were clipped", site.name, clipped,
                    elements, lo, hi, client.params.clip)
    if hi == length:
        put(length, client.masked_check_block())
    rnd.save(state)
    return M.MaskedReply(ArrayRecord(arrays), list(tags), list(tags.values()), clipped, elements).to_record()


def sa_unmask(site: SiteContext, cfg: SiteSettings, node_config: dict, run_id: int, content: RecordDict,
              state: RecordDict) -> RecordDict:
    """Stage 4: shares that remove the masks (self-mask shares of survivors, key shares of dropped peers)."""
    request = M.UnmaskRequest.from_record(content)
    rnd = _Round.load(state, request.session, site)
    survivors, dropped = request.survivors, request.dropped
    check_peers(rnd.policy, site, len(set(survivors) - {rnd.client.id}), "unmask")
    shares = rnd.client.unmask(survivors, dropped)
    rnd.save(state)
    return M.UnmaskReply(list(shares), list(shares.values())).to_record()


STAGES = {M.SA_KEYS: sa_keys, M.SA_SHARE: sa_share, M.SA_MASKED: sa_masked, M.SA_UNMASK: sa_unmask}
