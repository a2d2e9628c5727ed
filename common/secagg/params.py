"""Public parameters of one secure-aggregation round (``SecAggParams``) and the SecAgg+ neighbour graph."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import SecAggError
from .quantize import RingConfig, choose_bits

MAX_CLIENT_ID = (1 << 64) - 1


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def harary_neighbours(client_ids: Sequence[int], degree: int) -> dict[int, tuple[int, ...]]:
    """A random k-regular Harary graph (SecAgg+): clients on a randomly permuted ring, each linked to its
    degree/2 nearest on either side. ``degree`` must be even; degree >= n-1 gives all pairs."""
    ids = sorted(int(c) for c in client_ids)
    n = len(ids)
    if not _is_int(degree) or degree < 2 or degree % 2:
        raise SecAggError(f"neighbour degree must be an even int >= 2, got {degree!r}")
    if degree >= n - 1:
        return {c: tuple(v for v in ids if v != c) for c in ids}
    order = list(ids)
    for i in range(n - 1, 0, -1):  # Fisher-Yates with os.urandom (public randomness chosen by the server)
        j = int.from_bytes(os.urandom(8), "big") % (i + 1)
        order[i], order[j] = order[j], order[i]
    graph: dict[int, set[int]] = {c: set() for c in ids}
    for pos, c in enumerate(order):
        for step in range(1, degree // 2 + 1):
            for other in (order[(pos + step) % n], order[(pos - step) % n]):
                graph[c].add(other)
                graph[other].add(c)
    return {c: tuple(sorted(graph[c])) for c in ids}


@dataclass(frozen=True, eq=True)
class SecAggParams:
    """Public parameters of one round; ``to_dict``/``from_dict`` give a dict of ints, floats, bytes, lists
    of ints and bools (fits a Flower ConfigRecord when client ids fit in int64)."""

    session: bytes
    client_ids: tuple[int, ...]
    threshold: int
    bits: int
    clip: float
    vector_length: int
    neighbours: Mapping[int, tuple[int, ...]] = field(repr=False)
    check_size: int = 16
    # The server's X25519 public key of this round (raw 32 bytes): clients tag each masked chunk under a key
    # agreed with it, and the server checks the tags before adding anything. Empty: uploads are not tagged.
    server_key: bytes = b""

    def __post_init__(self) -> None:
        if not isinstance(self.session, (bytes, bytearray)) or not 8 <= len(self.session) <= 64:
            raise SecAggError("session must be 8 to 64 bytes")
        object.__setattr__(self, "session", bytes(self.session))
        if not isinstance(self.server_key, (bytes, bytearray)) or len(self.server_key) not in (0, 32):
            raise SecAggError("server_key must be empty or a raw 32-byte X25519 public key")
        object.__setattr__(self, "server_key", bytes(self.server_key))
        ids = list(self.client_ids)
        if not all(_is_int(c) and 0 <= c <= MAX_CLIENT_ID for c in ids):
            raise SecAggError(f"client ids must be ints in [0, 2^64), got {ids!r}")
        ids = sorted(int(c) for c in ids)
        if len(set(ids)) != len(ids):
            raise SecAggError("client ids must be distinct")
        if len(ids) < 2:
            raise SecAggError(f"secure aggregation needs at least 2 clients, got {len(ids)}")
        object.__setattr__(self, "client_ids", tuple(ids))
        known = set(ids)
        graph: dict[int, tuple[int, ...]] = {}
        for c in ids:
            if c not in self.neighbours:
                raise SecAggError(f"neighbour sets lack client {c}")
            nbrs = sorted(int(v) for v in self.neighbours[c])
            unknown = [v for v in nbrs if v not in known]
            if unknown:
                raise SecAggError(f"neighbours of client {c} include unknown client ids {unknown}")
            if c in nbrs or len(set(nbrs)) != len(nbrs):
                raise SecAggError(f"neighbours of client {c} must be distinct other clients")
            graph[c] = tuple(nbrs)
        extra = set(int(k) for k in self.neighbours) - known
        if extra:
            raise SecAggError(f"neighbour sets name unknown client ids {sorted(extra)}")
        holder_sets = {c: frozenset(nbrs) | {c} for c, nbrs in graph.items()}
        for c, nbrs in graph.items():
            for v in nbrs:
                if c not in holder_sets[v]:
                    raise SecAggError(f"neighbour sets must be symmetric: {v} is a neighbour of {c} but not vice versa")
        object.__setattr__(self, "neighbours", graph)
        object.__setattr__(self, "_holder_sets", holder_sets)
        smallest = min(len(n) for n in graph.values()) + 1
        if not _is_int(self.threshold) or not 2 <= self.threshold <= smallest:
            raise SecAggError(
                f"threshold must be an int in [2, {smallest}] (smallest neighbourhood incl. the client), "
                f"got {self.threshold!r}"
            )
        if not _is_int(self.vector_length) or self.vector_length < 1:
            raise SecAggError(f"vector_length must be an int >= 1, got {self.vector_length!r}")
        if not _is_int(self.check_size) or self.check_size < 1:
            raise SecAggError(f"check_size must be an int >= 1, got {self.check_size!r}")
        for name in ("threshold", "vector_length", "check_size", "bits"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "clip", self.ring.clip)  # validates bits and clip

    @property
    def ring(self) -> RingConfig:
        return RingConfig(self.bits, self.clip, len(self.client_ids))

    @property
    def ring_length(self) -> int:
        """Length of a masked vector: the data followed by the check block."""
        return self.vector_length + self.check_size

    @property
    def all_pairs(self) -> bool:
        return all(len(n) == len(self.client_ids) - 1 for n in self.neighbours.values())

    def holders(self, client_id: int) -> frozenset[int]:
        """Clients that receive a share of ``client_id``'s secrets: its neighbours and itself."""
        return self._holder_sets[client_id]

    @classmethod
    def create(
        cls,
        client_ids: Iterable[int],
        vector_length: int,
        clip: float,
        *,
        threshold: int | None = None,
        bits: int | None = None,
        target_precision: float | None = None,
        neighbours: int | Mapping[int, Iterable[int]] | None = None,
        check_size: int = 16,
        session: bytes | None = None,
    ) -> SecAggParams:
        """Server-side setup. ``neighbours``: None = all pairs, an even int k = random k-regular graph, or a
        mapping id -> neighbour ids. ``threshold`` defaults to a majority of the smallest neighbourhood
        (incl. the client itself), at least 2. ``bits`` defaults to ``choose_bits`` for ``target_precision``
        when given, else 32."""
        ids = sorted({int(c) for c in client_ids}) if client_ids is not None else []
        if len(ids) < 2:
            raise SecAggError(f"secure aggregation needs at least 2 clients, got {len(ids)}")
        if neighbours is None:
            graph = {c: tuple(v for v in ids if v != c) for c in ids}
        elif _is_int(neighbours):
            graph = harary_neighbours(ids, int(neighbours))
        else:
            graph = {int(c): tuple(int(v) for v in vs) for c, vs in neighbours.items()}
        if threshold is None:
            smallest = min(len(graph.get(c, ())) for c in ids) + 1
            threshold = max(2, smallest // 2 + 1)
        if bits is None:
            bits = choose_bits(len(ids), clip, target_precision) if target_precision is not None else 32
        return cls(
            session=os.urandom(16) if session is None else session,
            client_ids=tuple(ids),
            threshold=threshold,
            bits=bits,
            clip=clip,
            vector_length=vector_length,
            neighbours=graph,
            check_size=check_size,
        )

    def to_dict(self) -> dict:
        """Primitive-only form: bytes, ints, a float, a bool and flat lists of ints."""
        all_pairs = self.all_pairs
        return {
            "session": self.session,
            "client_ids": list(self.client_ids),
            "threshold": self.threshold,
            "bits": self.bits,
            "clip": float(self.clip),
            "vector_length": self.vector_length,
            "check_size": self.check_size,
            "all_pairs": all_pairs,
            # CSR layout aligned with client_ids (empty when all_pairs)
            "neighbour_counts": [] if all_pairs else [len(self.neighbours[c]) for c in self.client_ids],
            "neighbour_ids": [] if all_pairs else [v for c in self.client_ids for v in self.neighbours[c]],
            "server_key": self.server_key,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> SecAggParams:
        """Inverse of ``to_dict``; missing or mistyped fields raise SecAggError naming the field."""
        if not isinstance(data, Mapping):
            raise SecAggError(f"SecAgg parameters must be a mapping, got {type(data).__name__}")
        required = {
            "session": (bytes, bytearray),
            "client_ids": (list, tuple),
            "threshold": (int,),
            "bits": (int,),
            "clip": (int, float),
            "vector_length": (int,),
            "check_size": (int,),
            "all_pairs": (bool,),
            "neighbour_counts": (list, tuple),
            "neighbour_ids": (list, tuple),
        }
        for name, types in required.items():
            if name not in data:
                raise SecAggError(f"SecAgg parameters lack the field '{name}'")
            if not isinstance(data[name], types):
                raise SecAggError(f"SecAgg parameter '{name}' has type {type(data[name]).__name__}")
        if not isinstance(data.get("server_key", b""), (bytes, bytearray)):
            raise SecAggError(f"SecAgg parameter 'server_key' has type {type(data['server_key']).__name__}")
        ids = [int(c) for c in data["client_ids"]]
        if data["all_pairs"]:
            graph = {c: tuple(v for v in ids if v != c) for c in ids}
        else:
            counts = [int(k) for k in data["neighbour_counts"]]
            flat = [int(v) for v in data["neighbour_ids"]]
            if len(counts) != len(ids) or sum(counts) != len(flat) or min(counts, default=0) < 0:
                raise SecAggError("SecAgg parameters 'neighbour_counts'/'neighbour_ids' do not match 'client_ids'")
            graph, pos = {}, 0
            for c, k in zip(ids, counts):
                graph[c] = tuple(flat[pos : pos + k])
                pos += k
        return cls(
            session=bytes(data["session"]),
            client_ids=tuple(ids),
            threshold=data["threshold"],
            bits=data["bits"],
            clip=float(data["clip"]),
            vector_length=data["vector_length"],
            neighbours=graph,
            check_size=data["check_size"],
            server_key=bytes(data.get("server_key", b"")),
        )


def round_binding(params: SecAggParams, weights: Sequence[float]) -> bytes:
    """The session of a round bound to everything its clients must agree on: the public parameters (except the
    session itself) and every client's weight, in client-id order. A server that tells two clients different
    parameters or weights gives them different sessions, and their pairwise keys and encrypted shares no longer
    match, so the round fails instead of leaking."""
    import hashlib
    import json

    if len(weights) != len(params.client_ids):
        raise SecAggError(f"{len(weights)} weights for {len(params.client_ids)} clients")
    public = {k: (v.hex() if isinstance(v, (bytes, bytearray)) else v) for k, v in params.to_dict().items()
              if k != "session"}
    blob = json.dumps({"params": public, "weights": [float(w).hex() for w in weights]}, sort_keys=True)
    return hashlib.sha256(b"feddem-secagg/v1/round|" + blob.encode()).digest()
