"""SecAgg+ (Bell et al. 2020, after Bonawitz et al. 2017) client and server as transport-free state machines.

Each stage is a method that takes and returns plain objects (ints, bytes, dicts, numpy arrays), so any
transport (Flower messages, gRPC, in-process calls) can carry them. Order of calls:

  0. server: ``params = SecAggParams.create(client_ids, vector_length, clip, ...)``; send ``params.to_dict()``;
     each client: ``SecAggClient(SecAggParams.from_dict(d), my_id)``; server: ``SecAggServer(params)``.
  1. client ``advertise_keys() -> (pk_c, pk_s)``; server ``collect_public_keys({id: (pk_c, pk_s)})`` -> broadcast.
  2. client ``share_keys(broadcast) -> {peer: ciphertext}``; server ``route_shares({sender: {...}})``
     -> ``{receiver: {sender: ciphertext}}``.
  3. client ``masked_input(routed[me], vector)`` -> ring array of length vector_length + check_size; or, in
     chunks: ``receive_shares(routed[me])``, ``masked_input_chunk(chunk, offset)`` per chunk, and
     ``masked_check_block()`` (ring offset vector_length). Server: ``verify_tag(id, chunk, offset, tag)`` then
     ``add_masked_chunk(id, chunk, offset)`` per chunk (streaming into its one accumulator: O(vector) memory).
  4. server ``unmask_request() -> (survivors, dropped)``; each survivor ``unmask(survivors, dropped)``
     -> ``{peer: share}``.
  5. server ``recover_masks({responder: {peer: share}})``, then ``unmask_chunk(offset, length)`` per chunk or
     ``unmasked_sum()`` (the whole float32 sum, written over the accumulator, which the server then releases).

Cryptography (all from the ``cryptography`` package): two X25519 key pairs per client and round (c: channel
keys, s: mask keys); HKDF-SHA256 derives the AES-GCM key of each client pair and the pairwise mask seed
s_uv; masks are AES-128-CTR keystreams (``prg``); the self-mask seed b_u and the s secret key are
t-of-n Shamir-shared (``shamir``) among the client's neighbours (all clients by default, or a k-regular
Harary graph, SecAgg+), encrypted with AES-GCM whose associated data binds session, sender and receiver.
Input: y_u = q(x_u) + PRG(b_u) + sum_{v in N(u), v > u} PRG(s_uv) - sum_{v in N(u), v < u} PRG(s_uv) mod 2^k,
followed by ``check_size`` elements whose plaintext is 0, masked the same way.

Threat model. The server is honest-but-curious: it follows the protocol but records everything it sees.
Clients are semi-honest; up to t-1 of them may collude with the server. The server learns the vector length,
the clipping bound, which clients dropped out at each stage, and the sum of the clipped, quantized inputs of
the surviving clients, and nothing else about any single input: a masked vector is uniformly distributed
given the others, shares travel AES-GCM-encrypted, and per peer a client reveals either the self-mask share
(peer survived) or the secret-key share (peer dropped), never both. Not protected against: a malicious
server that tells different clients different dropout sets (the active-security consistency round of
Bonawitz et al. with signatures is not implemented, so within one round the transport must send the same
survivor/dropped lists to all); clients that are not authenticated by the transport (the server could then
simulate clients); malicious clients poisoning their input within the clip range.

Detected (raises): a relayed share that was altered, truncated, or relabelled to another sender/receiver
(AES-GCM fails -> TamperError naming the sender); a reconstructed secret key that does not match the
advertised public key; inconsistent Shamir shares when more than t arrive; any change to a masked vector
inside its check block, and any wrong mask reconstruction or disagreement about who masked with whom (the
unmasked check block is not all zero -> TamperError); fewer than t clients or shares at any stage
(ThresholdError); wrong dtypes, lengths, offsets, unknown ids, calls out of order (SecAggError).
Each masked chunk also carries a Poly1305 tag under a one-time key that the client agrees with the server's round
key (``params.server_key``, X25519 + HKDF over session, client, offset and length): the server checks every chunk
of an upload before adding any of it (``verify_tag``), so a chunk changed, truncated, moved or relabelled on its
way is detected and that upload is left out whole (TamperError naming the client). Untagged rounds (no server
key) cannot see a change outside the check block; feddem's rounds are always tagged. A server that changes its own
sum is outside any aggregation protocol: the sites evaluate the merged model they are sent. A wrong self-mask seed or pairwise key changes the whole mask, so the check
block catches corrupt shares even when exactly t arrive (false-accept probability 2^-(k * check_size)).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.poly1305 import Poly1305

from . import shamir
from .errors import RefusalError, SecAggError, TamperError, ThresholdError
from .params import SecAggParams, _is_int
from .prg import agree, apply_mask
from .quantize import _fresh_rng, dequantize, quantize
from .state import ClientState, decode_state, encode_state

KEY_BYTES = 32
NONCE_BYTES = 12
_DOMAIN = b"feddem-secagg/v1/"
_SHARE_PLAINTEXT = 8 + 8 + 2 * shamir.SHARE_BYTES
CIPHERTEXT_BYTES = NONCE_BYTES + _SHARE_PLAINTEXT + 16
_SELF_TAG, _KEY_TAG = b"B", b"S"
_BLOCK = 1 << 20  # elements per server unmasking block


def _id_bytes(client_id: int) -> bytes:
    return int(client_id).to_bytes(8, "big")


def _x(client_id: int) -> int:
    """Shamir evaluation point of a client (ids may be 0)."""
    return int(client_id) + 1


def _pair_seed(private_key: X25519PrivateKey, peer_public: bytes, session: bytes, a: int, b: int) -> bytes:
    lo, hi = sorted((a, b))
    return agree(private_key, peer_public, _DOMAIN + b"pair-mask/" + session + _id_bytes(lo) + _id_bytes(hi))


def _channel_key(private_key: X25519PrivateKey, peer_public: bytes, session: bytes, a: int, b: int) -> bytes:
    lo, hi = sorted((a, b))
    return agree(private_key, peer_public, _DOMAIN + b"channel/" + session + _id_bytes(lo) + _id_bytes(hi), 16)


def _tag_key(private_key: X25519PrivateKey, peer_public: bytes, session: bytes, client: int, offset: int,
             length: int) -> bytes:
    """The one-time Poly1305 key of one masked chunk: X25519 of the client's channel key and the server's round
    key, expanded with the session, the client and the chunk's place (never reused: each range is masked once)."""
    where = _id_bytes(client) + _id_bytes(offset) + _id_bytes(length)
    return agree(private_key, peer_public, _DOMAIN + b"upload-tag/" + session + where)


def _ring_bytes(chunk: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(chunk)).cast("B")


def _associated_data(session: bytes, sender: int, receiver: int) -> bytes:
    return _DOMAIN + b"share/" + session + _id_bytes(sender) + _id_bytes(receiver)


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


class UnmaskRequest(NamedTuple):
    """What the server sends every survivor at the unmasking stage."""

    survivors: list[int]
    dropped: list[int]


class _Coverage:
    """Disjoint half-open intervals of a vector that were already processed."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.covered = 0

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start)
        return (i > 0 and self.ends[i - 1] > start) or (i < len(self.starts) and self.starts[i] < end)

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_right(self.starts, start)
        self.starts.insert(i, start)
        self.ends.insert(i, end)
        self.covered += end - start

    @property
    def complete(self) -> bool:
        return self.covered == self.total

    def first_gap(self) -> tuple[int, int]:
        pos = 0
        for s, e in zip(self.starts, self.ends):
            if s > pos:
                return pos, s
            pos = e
        return pos, self.total


def _check_id(client_id: object, params: SecAggParams, what: str) -> int:
    if not _is_int(client_id) or int(client_id) not in params.neighbours:
        raise SecAggError(f"{what}: unknown client id {client_id!r}")
    return int(client_id)


def _check_offset(offset: object, length: int, total: int, what: str) -> int:
    if not _is_int(offset) or offset < 0:
        raise SecAggError(f"{what}: offset must be a non-negative int, got {offset!r}")
    if offset + length > total:
        raise SecAggError(f"{what}: elements [{offset}, {offset + length}) run past the end ({total})")
    return int(offset)


def _validate_public_keys(keys: object, params: SecAggParams, what: str) -> dict[int, tuple[bytes, bytes]]:
    if not isinstance(keys, Mapping):
        raise SecAggError(f"{what}: public keys must be a mapping id -> (pk_c, pk_s)")
    out: dict[int, tuple[bytes, bytes]] = {}
    seen: dict[bytes, int] = {}
    for cid, pair in keys.items():
        cid = _check_id(cid, params, what)
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise SecAggError(f"{what}: keys of client {cid} must be a pair (pk_c, pk_s)")
        pk_c, pk_s = pair
        for pk in (pk_c, pk_s):
            if not isinstance(pk, (bytes, bytearray)) or len(pk) != KEY_BYTES:
                raise SecAggError(f"{what}: public keys of client {cid} must be {KEY_BYTES} bytes each")
            if bytes(pk) in seen:
                raise SecAggError(f"{what}: client {cid} reuses a public key of client {seen[bytes(pk)]}")
            seen[bytes(pk)] = cid
        out[cid] = (bytes(pk_c), bytes(pk_s))
    return out


def _id_set(values: object, params: SecAggParams, what: str) -> set[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise SecAggError(f"{what} must be a list of client ids")
    out = set()
    for v in values:
        v = _check_id(v, params, what)
        if v in out:
            raise SecAggError(f"{what} lists client {v} twice")
        out.add(v)
    return out


class SecAggClient:
    """One client's side of a round. Keys and masks are fresh per instance: use one instance per round."""

    def __init__(self, params: SecAggParams, client_id: int, rng: np.random.Generator | None = None) -> None:
        if not isinstance(params, SecAggParams):
            raise SecAggError(f"params must be SecAggParams, got {type(params).__name__}")
        self.params = params
        self.id = _check_id(client_id, params, "SecAggClient")
        self._rng = rng if rng is not None else _fresh_rng()
        self._stage = "new"
        self._c_key: X25519PrivateKey | None = None
        self._s_key: X25519PrivateKey | None = None
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._b_seed = b""
        self._held_self: dict[int, int] = {}  # peer -> share of peer's self-mask seed b
        self._held_key: dict[int, int] = {}  # peer -> share of peer's mask secret key s_sk
        self._pair_seeds: dict[int, bytes] = {}
        self._coverage = _Coverage(params.ring_length)
        self._revealed: dict[int, bytes] = {}  # peer -> which share kind was revealed

    def _expect(self, allowed: tuple[str, ...], call: str) -> None:
        if self._stage not in allowed:
            raise SecAggError(f"client {self.id}: {call} called at stage '{self._stage}' (expected {allowed})")

    @property
    def stage(self) -> str:
        """Where the client is: new, advertised, shared, masking (shares received: masking chunks) or unmasked."""
        return self._stage

    def to_state(self) -> bytes:
        """The client's state (SECRET: private keys, seeds, held shares) as bytes, for ``from_state`` later."""
        return encode_state(ClientState(
            self.params, self.id, self._stage, self._c_key, self._s_key, self._keys, self._b_seed, self._held_self,
            self._held_key, self._pair_seeds, (list(self._coverage.starts), list(self._coverage.ends)),
            self._revealed))

    @classmethod
    def from_state(cls, blob: bytes) -> "SecAggClient":
        """A client restored from ``to_state`` (the rounding generator is fresh), ready for its next stage; a
        damaged or foreign blob raises SecAggError."""
        state = decode_state(blob)
        client = cls(state.params, state.id, rng=_fresh_rng())
        client._stage, client._c_key, client._s_key = state.stage, state.c_key, state.s_key
        client._keys, client._b_seed = state.keys, state.b_seed
        client._held_self, client._held_key, client._pair_seeds = state.held_self, state.held_key, state.pair_seeds
        for start, end in zip(*state.coverage):
            client._coverage.add(start, end)
        client._revealed = state.revealed
        return client

    # stage 1
    def advertise_keys(self) -> tuple[bytes, bytes]:
        """Fresh X25519 key pairs; returns (pk_c, pk_s), 32 raw bytes each."""
        self._expect(("new",), "advertise_keys")
        self._c_key = X25519PrivateKey.generate()
        self._s_key = X25519PrivateKey.generate()
        self._stage = "advertised"
        return _public_bytes(self._c_key), _public_bytes(self._s_key)

    # stage 2
    def share_keys(self, public_keys: Mapping[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Shamir-shares b_u and s_sk among neighbours that advertised keys; returns {peer: AES-GCM ciphertext}."""
        self._expect(("advertised",), "share_keys")
        p = self.params
        keys = _validate_public_keys(public_keys, p, f"share_keys (client {self.id})")
        mine = (_public_bytes(self._c_key), _public_bytes(self._s_key))
        if keys.get(self.id) != mine:
            raise SecAggError(f"share_keys: the broadcast keys of client {self.id} are not the ones it advertised")
        holders = sorted(v for v in p.holders(self.id) if v in keys)
        if len(holders) < p.threshold:
            raise ThresholdError("share_keys", len(holders), p.threshold, f"clients (neighbourhood of {self.id})")
        self._keys = {v: keys[v] for v in holders}
        self._b_seed = os.urandom(32)
        self_shares = shamir.split(self._b_seed, p.threshold, [_x(v) for v in holders])
        key_shares = shamir.split(self._s_key.private_bytes_raw(), p.threshold, [_x(v) for v in holders])
        self._held_self[self.id] = self_shares[_x(self.id)]
        self._held_key[self.id] = key_shares[_x(self.id)]
        out = {}
        for v in holders:
            if v == self.id:
                continue
            plaintext = (
                _id_bytes(self.id)
                + _id_bytes(v)
                + shamir.encode_share(self_shares[_x(v)])
                + shamir.encode_share(key_shares[_x(v)])
            )
            aead = AESGCM(_channel_key(self._c_key, keys[v][0], p.session, self.id, v))
            nonce = os.urandom(NONCE_BYTES)
            out[v] = nonce + aead.encrypt(nonce, plaintext, _associated_data(p.session, self.id, v))
        self._stage = "shared"
        return out

    # stage 3
    def receive_shares(self, received: Mapping[int, bytes]) -> None:
        """Decrypts the shares routed to this client and derives the pairwise mask seeds."""
        self._expect(("shared",), "receive_shares")
        p = self.params
        if not isinstance(received, Mapping):
            raise SecAggError("masked_input: received shares must be a mapping sender -> ciphertext")
        held_self, held_key = {}, {}
        for sender, ct in received.items():
            sender = _check_id(sender, p, f"masked_input (client {self.id})")
            if sender == self.id or sender not in self._keys:
                raise SecAggError(
                    f"masked_input: client {self.id} got a share from client {sender}, which is not a neighbour "
                    f"that advertised keys"
                )
            if not isinstance(ct, (bytes, bytearray)):
                raise SecAggError(f"masked_input: the share from client {sender} is not bytes")
            aead = AESGCM(_channel_key(self._c_key, self._keys[sender][0], p.session, self.id, sender))
            try:
                plaintext = aead.decrypt(
                    bytes(ct[:NONCE_BYTES]), bytes(ct[NONCE_BYTES:]), _associated_data(p.session, sender, self.id)
                )
            except (InvalidTag, ValueError):
                raise TamperError(
                    f"the encrypted share from client {sender} to client {self.id} failed authentication "
                    f"(altered, truncated or relabelled)",
                    sender=sender,
                ) from None
            if len(plaintext) != _SHARE_PLAINTEXT or plaintext[:16] != _id_bytes(sender) + _id_bytes(self.id):
                raise SecAggError(f"masked_input: the share from client {sender} is malformed")
            s = shamir.SHARE_BYTES
            held_self[sender] = shamir.decode_share(plaintext[16 : 16 + s])
            held_key[sender] = shamir.decode_share(plaintext[16 + s :])
        if len(held_self) + 1 < p.threshold:
            raise ThresholdError(
                "masked_input", len(held_self) + 1, p.threshold, f"clients (neighbourhood of {self.id})"
            )
        self._held_self.update(held_self)
        self._held_key.update(held_key)
        self._pair_seeds = {
            v: _pair_seed(self._s_key, self._keys[v][1], p.session, self.id, v) for v in sorted(held_self)
        }
        self._stage = "masking"

    def _mask(self, ring: np.ndarray, offset: int) -> np.ndarray:
        self._coverage.add(offset, offset + ring.shape[0])
        apply_mask(ring, self._b_seed, offset, 1)
        for v, seed in self._pair_seeds.items():
            apply_mask(ring, seed, offset, 1 if v > self.id else -1)
        return ring

    def _check_vector(self, vector: object, what: str) -> np.ndarray:
        if not isinstance(vector, np.ndarray):
            raise SecAggError(f"{what}: the input must be a numpy float32 array, got {type(vector).__name__}")
        if vector.dtype != np.float32:
            raise SecAggError(f"{what}: the input must have dtype float32, got {vector.dtype}")
        if vector.ndim != 1:
            raise SecAggError(f"{what}: the input must be 1-D (flatten it first), got shape {vector.shape}")
        return vector

    def masked_input_chunk(self, vector_chunk: np.ndarray, offset: int) -> np.ndarray:
        """Masked ring elements for input elements [offset, offset + len(chunk)); each range at most once."""
        self._expect(("masking",), "masked_input_chunk")
        chunk = self._check_vector(vector_chunk, "masked_input_chunk")
        offset = _check_offset(offset, chunk.shape[0], self.params.vector_length, "masked_input_chunk")
        if self._coverage.overlaps(offset, offset + chunk.shape[0]):
            raise SecAggError(
                f"masked_input_chunk: elements [{offset}, {offset + chunk.shape[0]}) were already masked; "
                f"masking them again would reuse the one-time mask"
            )
        return self._mask(quantize(chunk, self.params.ring, self._rng), offset)

    def masked_check_block(self) -> np.ndarray:
        """The masked check block (plaintext zeros) for ring elements [vector_length, ring_length)."""
        self._expect(("masking",), "masked_check_block")
        p = self.params
        if self._coverage.overlaps(p.vector_length, p.ring_length):
            raise SecAggError("masked_check_block: the check block was already masked")
        return self._mask(np.zeros(p.check_size, dtype=p.ring.dtype), p.vector_length)

    def upload_tag(self, masked_chunk: np.ndarray, offset: int) -> bytes:
        """The 16-byte Poly1305 tag of a masked chunk at ring ``offset``, under a one-time key agreed with the
        server's round key (``params.server_key``): the server checks it before adding the chunk, so a chunk
        changed, truncated or moved on its way is detected."""
        self._expect(("masking",), "upload_tag")
        if not self.params.server_key:
            raise SecAggError("upload_tag: the round has no server key (params.server_key is empty)")
        if not isinstance(masked_chunk, np.ndarray) or masked_chunk.dtype != self.params.ring.dtype:
            raise SecAggError(f"upload_tag: the masked chunk must be a {self.params.ring.dtype} numpy array")
        key = _tag_key(self._c_key, self.params.server_key, self.params.session, self.id, int(offset),
                       masked_chunk.shape[0])
        return Poly1305.generate_tag(key, _ring_bytes(masked_chunk))

    def masked_input(self, received: Mapping[int, bytes], vector: np.ndarray) -> np.ndarray:
        """Stage 3 in one call: y = q(vector) + masks, followed by the masked check block (ring dtype)."""
        vector = self._check_vector(vector, "masked_input")
        p = self.params
        if vector.shape[0] != p.vector_length:
            raise SecAggError(f"masked_input: the input has length {vector.shape[0]}, expected {p.vector_length}")
        self.receive_shares(received)
        out = np.empty(p.ring_length, dtype=p.ring.dtype)
        quantize(vector, p.ring, self._rng, out=out[: p.vector_length])
        out[p.vector_length :] = 0
        return self._mask(out, 0)

    # stage 4
    def unmask(self, survivors: Iterable[int], dropped: Iterable[int]) -> dict[int, bytes]:
        """Shares of b_v for surviving neighbours v and of s_sk_v for dropped ones: {peer: tag + share}.

        Refuses (RefusalError) when a peer is listed as both, or when this client already revealed the other
        kind of share for a peer in an earlier call of the same round."""
        self._expect(("masking", "unmasked"), "unmask")
        p = self.params
        if not self._coverage.complete:
            lo, hi = self._coverage.first_gap()
            raise SecAggError(f"unmask: client {self.id} has not masked its whole input yet (elements [{lo}, {hi}))")
        alive = _id_set(survivors, p, f"unmask (client {self.id}): survivors")
        gone = _id_set(dropped, p, f"unmask (client {self.id}): dropped")
        both = alive & gone
        if both:
            raise RefusalError(
                f"client {self.id} refuses to unmask: clients {sorted(both)} are listed as both survived and dropped"
            )
        if self.id not in alive:
            raise SecAggError(f"unmask: client {self.id} is not in the survivor list it was sent")
        mine = p.holders(self.id)
        count = len(alive & mine)
        if count < p.threshold:
            raise ThresholdError("unmask", count, p.threshold, f"surviving clients (neighbourhood of {self.id})")
        plan: dict[int, bytes] = {}
        for peer_set, tag, held in ((alive, _SELF_TAG, self._held_self), (gone, _KEY_TAG, self._held_key)):
            for v in sorted(peer_set & mine):
                if v not in held:
                    raise SecAggError(
                        f"unmask: client {v} is listed as {'survived' if tag == _SELF_TAG else 'dropped'} but "
                        f"client {self.id} holds no share from it (it did not share keys)"
                    )
                if self._revealed.get(v, tag) != tag:
                    raise RefusalError(
                        f"client {self.id} refuses to reveal both share kinds for client {v}: it already revealed "
                        f"the {'self-mask' if tag == _KEY_TAG else 'secret-key'} share"
                    )
                plan[v] = tag
        self._revealed.update(plan)
        self._stage = "unmasked"
        return {
            v: tag + shamir.encode_share((self._held_self if tag == _SELF_TAG else self._held_key)[v])
            for v, tag in plan.items()
        }


class SecAggServer:
    """The server's side of a round: routes shares, sums masked vectors as they arrive, removes the masks."""

    def __init__(self, params: SecAggParams, server_key: X25519PrivateKey | None = None) -> None:
        """``server_key``: the private half of ``params.server_key`` (required when the round tags uploads; see
        ``with_server_key``)."""
        if not isinstance(params, SecAggParams):
            raise SecAggError(f"params must be SecAggParams, got {type(params).__name__}")
        if bool(params.server_key) != (server_key is not None) or (
                server_key is not None and _public_bytes(server_key) != params.server_key):
            raise SecAggError("SecAggServer: server_key must be the private key of params.server_key (or both absent)")
        self.params = params
        self._server_key = server_key
        self._verified: dict[int, set[tuple[int, int]]] = {}
        self._stage = "keys"
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._u2: set[int] = set()
        self._acc: np.ndarray | None = None
        self._coverage: dict[int, _Coverage] = {}
        self._survivors: list[int] = []
        self._dropped: list[int] = []
        self._corrections: list[tuple[bytes, int]] | None = None

    @property
    def survivors(self) -> list[int]:
        """The clients whose whole masked input is in the sum (set by ``unmask_request``)."""
        return list(self._survivors)

    @property
    def dropped(self) -> list[int]:
        """The clients that shared keys but whose masked input is not in the sum (set by ``unmask_request``)."""
        return list(self._dropped)

    def _expect(self, allowed: tuple[str, ...], call: str) -> None:
        if self._stage not in allowed:
            raise SecAggError(f"server: {call} called at stage '{self._stage}' (expected {allowed})")

    # stage 1
    def collect_public_keys(self, public_keys: Mapping[int, tuple[bytes, bytes]]) -> dict[int, tuple[bytes, bytes]]:
        """Records the clients that advertised keys (U1); returns the mapping to broadcast to all of them."""
        self._expect(("keys",), "collect_public_keys")
        keys = _validate_public_keys(public_keys, self.params, "collect_public_keys")
        if len(keys) < self.params.threshold:
            raise ThresholdError("advertise_keys", len(keys), self.params.threshold)
        self._keys = keys
        self._stage = "share"
        return dict(keys)

    # stage 2
    def route_shares(self, shares: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """{sender: {receiver: ct}} -> {receiver: {sender: ct}} for the clients that shared keys (U2)."""
        self._expect(("share",), "route_shares")
        p = self.params
        if not isinstance(shares, Mapping):
            raise SecAggError("route_shares: shares must be a mapping sender -> {receiver: ciphertext}")
        u2 = set()
        for sender, per in shares.items():
            sender = _check_id(sender, p, "route_shares")
            if sender not in self._keys:
                raise SecAggError(f"route_shares: client {sender} sent shares but did not advertise keys")
            if not isinstance(per, Mapping):
                raise SecAggError(f"route_shares: the shares of client {sender} must be a mapping")
            expected = {v for v in p.neighbours[sender] if v in self._keys}
            got = set()
            for receiver, ct in per.items():
                got.add(_check_id(receiver, p, f"route_shares (sender {sender})"))
                if not isinstance(ct, (bytes, bytearray)) or len(ct) != CIPHERTEXT_BYTES:
                    raise SecAggError(
                        f"route_shares: the share from client {sender} to client {receiver} must be "
                        f"{CIPHERTEXT_BYTES} bytes"
                    )
            if got != expected:
                raise SecAggError(
                    f"route_shares: client {sender} sent shares to {sorted(got)}, expected {sorted(expected)} "
                    f"(missing {sorted(expected - got)}, unexpected {sorted(got - expected)})"
                )
            u2.add(sender)
        for u in sorted(u2):
            count = len(p.holders(u) & u2)
            if count < p.threshold:
                raise ThresholdError("share_keys", count, p.threshold, f"clients (neighbourhood of {u})")
        routed: dict[int, dict[int, bytes]] = {r: {} for r in sorted(u2)}
        for sender, per in shares.items():
            for receiver, ct in per.items():
                if int(receiver) in u2:
                    routed[int(receiver)][int(sender)] = bytes(ct)
        self._u2 = u2
        self._acc = np.zeros(p.ring_length, dtype=p.ring.dtype)
        self._coverage = {u: _Coverage(p.ring_length) for u in u2}
        self._stage = "collect"
        return routed

    # stage 3
    def _check_chunk(self, client_id: object, chunk: object, offset: object) -> tuple[int, int]:
        p = self.params
        cid = _check_id(client_id, p, "add_masked")
        if cid not in self._u2:
            raise SecAggError(f"add_masked: client {cid} did not share keys in this round; its input cannot be unmasked")
        if not isinstance(chunk, np.ndarray):
            raise SecAggError(f"add_masked: the masked vector of client {cid} must be a numpy array")
        if chunk.dtype != p.ring.dtype:
            raise SecAggError(
                f"add_masked: the masked vector of client {cid} has dtype {chunk.dtype}, expected {p.ring.dtype}"
            )
        if chunk.ndim != 1:
            raise SecAggError(f"add_masked: the masked vector of client {cid} must be 1-D, got shape {chunk.shape}")
        offset = _check_offset(offset, chunk.shape[0], p.ring_length, f"add_masked (client {cid})")
        if self._coverage[cid].overlaps(offset, offset + chunk.shape[0]):
            raise SecAggError(f"add_masked: client {cid} sent elements [{offset}, {offset + chunk.shape[0]}) twice")
        return cid, offset

    @staticmethod
    def with_server_key(params: SecAggParams) -> tuple[SecAggParams, X25519PrivateKey]:
        """``params`` with a fresh server round key (uploads will be tagged), and its private half."""
        from dataclasses import replace

        key = X25519PrivateKey.generate()
        return replace(params, server_key=_public_bytes(key)), key

    def verify_tag(self, client_id: int, chunk: np.ndarray, offset: int, tag: bytes) -> None:
        """Check a masked chunk's upload tag (TamperError naming the client when it fails). In a tagged round
        every chunk must pass this before ``add_masked_chunk`` takes it: check a whole upload first, then add."""
        self._expect(("collect",), "verify_tag")
        cid, offset = self._check_chunk(client_id, chunk, offset)
        if self._server_key is None:
            raise SecAggError("verify_tag: this round does not tag uploads (params.server_key is empty)")
        if not isinstance(tag, (bytes, bytearray)) or len(tag) != 16:
            raise TamperError(f"the masked chunk at offset {offset} of client {cid} has no valid 16-byte tag", cid)
        key = _tag_key(self._server_key, self._keys[cid][0], self.params.session, cid, offset, chunk.shape[0])
        try:
            Poly1305.verify_tag(key, _ring_bytes(chunk), bytes(tag))
        except InvalidSignature:
            raise TamperError(f"the masked chunk at offset {offset} of client {cid} fails its upload tag: it was "
                              f"changed on its way (or not sent by that client)", cid) from None
        self._verified.setdefault(cid, set()).add((offset, chunk.shape[0]))

    def _add(self, cid: int, chunk: np.ndarray, offset: int) -> None:
        if self._server_key is not None and (offset, chunk.shape[0]) not in self._verified.get(cid, ()):
            raise SecAggError(f"add_masked: the chunk at offset {offset} of client {cid} was not checked with "
                              f"verify_tag (this round tags uploads)")
        self._coverage[cid].add(offset, offset + chunk.shape[0])
        view = self._acc[offset : offset + chunk.shape[0]]
        np.add(view, chunk, out=view)

    def add_masked_chunk(self, client_id: int, chunk: np.ndarray, offset: int) -> None:
        """Adds ring elements [offset, offset + len(chunk)) of a client's masked vector to the running sum
        (ring offsets: the check block starts at vector_length)."""
        self._expect(("collect",), "add_masked_chunk")
        cid, offset = self._check_chunk(client_id, chunk, offset)
        self._add(cid, chunk, offset)

    # stage 4
    def unmask_request(self) -> UnmaskRequest:
        """Closes input collection: survivors (U3) = clients whose whole masked vector arrived, dropped = U2 - U3."""
        self._expect(("collect",), "unmask_request")
        p = self.params
        started = {u for u, c in self._coverage.items() if c.covered}
        partial = sorted(u for u in started if not self._coverage[u].complete)
        if partial:
            lo, hi = self._coverage[partial[0]].first_gap()
            raise SecAggError(
                f"unmask_request: the masked inputs of clients {partial} arrived only in part (client "
                f"{partial[0]} lacks elements [{lo}, {hi})); a partial input cannot be removed from the sum"
            )
        if len(started) < p.threshold:
            raise ThresholdError("masked_input", len(started), p.threshold, "clients with masked inputs")
        for u in sorted(self._u2):
            count = len(p.holders(u) & started)
            if count < p.threshold:
                raise ThresholdError("masked_input", count, p.threshold, f"surviving holders of client {u}'s shares")
        self._survivors = sorted(started)
        self._dropped = sorted(self._u2 - started)
        self._stage = "unmask"
        return UnmaskRequest(list(self._survivors), list(self._dropped))

    # stage 5
    def recover_masks(self, shares: Mapping[int, Mapping[int, bytes]]) -> None:
        """Reconstructs b_u of every survivor and s_sk_v of every dropped client from the survivors' shares,
        and verifies the check block of the sum; afterwards ``unmask_chunk`` (or ``unmasked_sum``) gives the
        result."""
        self._expect(("unmask",), "recover_masks")
        if self._acc is None or not all(self._coverage[u].complete for u in self._survivors):
            raise SecAggError("recover_masks: the masked vectors of the survivors have not all been added")
        collected = self._collect_unmask_shares(shares)
        self._corrections = self._self_mask_corrections(collected) + self._dropped_corrections(collected)
        check = self._unmasked_ring(self.params.vector_length, self.params.check_size)
        bad = int(np.count_nonzero(check))
        if bad:
            self._corrections = None
            raise TamperError(
                f"aggregate: the check block of the unmasked sum has {bad} of {self.params.check_size} nonzero "
                f"elements: a masked vector was altered or a mask could not be removed correctly; the sum is "
                f"discarded"
            )
        self._stage = "done"

    def _collect_unmask_shares(self, shares: object) -> dict[int, dict[int, int]]:
        """The survivors' unmasking shares checked and decoded: {peer: {Shamir x of responder: share}}."""
        p = self.params
        if not isinstance(shares, Mapping):
            raise SecAggError("aggregate: shares must be a mapping responder -> {peer: share}")
        survivors = set(self._survivors)
        collected: dict[int, dict[int, int]] = {u: {} for u in self._u2}
        for responder, per in shares.items():
            responder = _check_id(responder, p, "aggregate: shares")
            if responder not in survivors:
                raise SecAggError(f"aggregate: client {responder} sent unmasking shares but is not a survivor")
            if not isinstance(per, Mapping):
                raise SecAggError(f"aggregate: the shares of client {responder} must be a mapping")
            for peer, blob in per.items():
                peer = _check_id(peer, p, f"aggregate: shares from client {responder}")
                if peer not in self._u2 or responder not in p.holders(peer):
                    raise SecAggError(f"aggregate: client {responder} cannot hold a share of client {peer}")
                tag = _SELF_TAG if peer in survivors else _KEY_TAG
                if not isinstance(blob, (bytes, bytearray)) or blob[:1] != tag:
                    raise SecAggError(
                        f"aggregate: client {responder} sent the wrong kind of share for client {peer} "
                        f"(expected the {'self-mask' if tag == _SELF_TAG else 'secret-key'} share)"
                    )
                collected[peer][_x(responder)] = shamir.decode_share(bytes(blob[1:]))
        return collected

    def _reconstruct(self, got: dict[int, int], what: str, client: int) -> bytes:
        if len(got) < self.params.threshold:
            raise ThresholdError("unmask", len(got), self.params.threshold, what)
        try:
            return shamir.reconstruct_bytes(got, self.params.threshold, 32)
        except TamperError as exc:
            raise TamperError(f"aggregate: {what}: {exc}", sender=client) from None

    def _self_mask_corrections(self, collected: dict[int, dict[int, int]]) -> list[tuple[bytes, int]]:
        """Each survivor's self-mask seed b_u, to subtract its PRG stream."""
        return [(self._reconstruct(collected[u], f"shares of client {u}'s self-mask seed", u), -1)
                for u in self._survivors]

    def _dropped_corrections(self, collected: dict[int, dict[int, int]]) -> list[tuple[bytes, int]]:
        """For each dropped client v, its secret key (checked against its public key) and so the pairwise seeds
        its surviving neighbours masked with, each with the sign that undoes that neighbour's mask."""
        p, survivors, corrections = self.params, set(self._survivors), []
        for v in self._dropped:
            raw = self._reconstruct(collected[v], f"shares of dropped client {v}'s secret key", v)
            key = X25519PrivateKey.from_private_bytes(raw)
            if _public_bytes(key) != self._keys[v][1]:
                raise TamperError(
                    f"aggregate: the secret key reconstructed for dropped client {v} does not match its public key; "
                    f"a share is corrupt",
                    sender=v,
                )
            for w in p.neighbours[v]:
                if w in survivors:
                    # w added +PRG(s_wv) if v > w, else -PRG(s_wv): undo it
                    corrections.append((_pair_seed(key, self._keys[w][1], p.session, v, w), -1 if v > w else 1))
        return corrections

    def _unmasked_ring(self, offset: int, length: int) -> np.ndarray:
        out = self._acc[offset : offset + length].copy()
        for seed, sign in self._corrections:
            apply_mask(out, seed, offset, sign)
        return out

    def unmask_chunk(self, offset: int, length: int, out_dtype: type = np.float32) -> np.ndarray:
        """The aggregate for input elements [offset, offset + length) (after ``recover_masks``)."""
        self._expect(("done",), "unmask_chunk")
        if not _is_int(length) or length < 0:
            raise SecAggError(f"unmask_chunk: length must be a non-negative int, got {length!r}")
        offset = _check_offset(offset, length, self.params.vector_length, "unmask_chunk")
        ring = self._unmasked_ring(offset, int(length))
        return dequantize(ring, self.params.ring, len(self._survivors), out_dtype)

    def unmasked_sum(self, block: int = _BLOCK) -> np.ndarray:
        """The whole aggregate as float32 (after ``recover_masks``), written block by block over the ring
        accumulator itself (each block is read before it is overwritten; a float32 element is no larger than a 32-
        or 64-bit ring element), so it takes no memory beyond the accumulator's: the result is a view of it. A
        16-bit ring's accumulator is half a float32 vector: the sum gets its own array. The server is done after
        this (its accumulator is handed over)."""
        self._expect(("done",), "unmasked_sum")
        acc, length = self._acc, self.params.vector_length
        values = acc.view(np.float32) if acc.itemsize >= 4 else np.empty(length, dtype=np.float32)
        for start in range(0, length, block):
            size = min(block, length - start)
            values[start:start + size] = self.unmask_chunk(start, size)
        self._acc, self._stage = None, "released"
        return values[:length]
