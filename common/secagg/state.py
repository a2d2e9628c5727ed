"""Serialising a ``SecAggClient`` between the messages of one round (``to_state`` / ``from_state``).

A transport whose handlers may run in different processes (Flower's simulation runs each message in any Ray
actor) keeps the client's state in its own store between stages. The blob holds the round's SECRETS (both X25519
private keys, the self-mask seed, the shares held for peers): it must stay on the client, never be sent to the
server. Format: UTF-8 JSON, bytes as hex, Shamir shares as hex ints; a version field guards against old blobs.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .errors import SecAggError
from .params import SecAggParams
from .quantize import _fresh_rng

if TYPE_CHECKING:
    from .protocol import SecAggClient

VERSION = 1


def _hex_ids(mapping: dict[int, object], encode) -> dict[str, object]:
    return {str(k): encode(v) for k, v in mapping.items()}


def client_to_state(client: SecAggClient) -> bytes:
    """The client's whole state as bytes (secret: keep it on the client)."""
    params = client.params.to_dict()
    params["session"] = params["session"].hex()
    params["server_key"] = params["server_key"].hex()
    key = (lambda k: k.private_bytes_raw().hex() if k is not None else None)
    state = {
        "version": VERSION,
        "params": params,
        "id": client.id,
        "stage": client._stage,
        "c_key": key(client._c_key),
        "s_key": key(client._s_key),
        "keys": _hex_ids(client._keys, lambda pair: [pair[0].hex(), pair[1].hex()]),
        "b_seed": client._b_seed.hex(),
        "held_self": _hex_ids(client._held_self, lambda y: format(y, "x")),
        "held_key": _hex_ids(client._held_key, lambda y: format(y, "x")),
        "pair_seeds": _hex_ids(client._pair_seeds, bytes.hex),
        "coverage": [list(client._coverage.starts), list(client._coverage.ends)],
        "revealed": _hex_ids(client._revealed, bytes.hex),
    }
    return json.dumps(state, separators=(",", ":")).encode()


def client_from_state(blob: bytes) -> SecAggClient:
    """Inverse of ``client_to_state``; a damaged or foreign blob raises SecAggError."""
    from .protocol import SecAggClient, _Coverage

    try:
        state = json.loads(bytes(blob).decode())
        if state.get("version") != VERSION:
            raise SecAggError(f"secure-aggregation client state has version {state.get('version')!r}, "
                              f"expected {VERSION}")
        params = dict(state["params"])
        params["session"] = bytes.fromhex(params["session"])
        params["server_key"] = bytes.fromhex(params.get("server_key", ""))
        client = SecAggClient(SecAggParams.from_dict(params), int(state["id"]), rng=_fresh_rng())
        key = (lambda h: X25519PrivateKey.from_private_bytes(bytes.fromhex(h)) if h is not None else None)
        client._stage = str(state["stage"])
        client._c_key, client._s_key = key(state["c_key"]), key(state["s_key"])
        client._keys = {int(k): (bytes.fromhex(a), bytes.fromhex(b)) for k, (a, b) in state["keys"].items()}
        client._b_seed = bytes.fromhex(state["b_seed"])
        client._held_self = {int(k): int(v, 16) for k, v in state["held_self"].items()}
        client._held_key = {int(k): int(v, 16) for k, v in state["held_key"].items()}
        client._pair_seeds = {int(k): bytes.fromhex(v) for k, v in state["pair_seeds"].items()}
        coverage = _Coverage(client.params.ring_length)
        for start, end in zip(*state["coverage"]):
            coverage.add(int(start), int(end))
        client._coverage = coverage
        client._revealed = {int(k): bytes.fromhex(v) for k, v in state["revealed"].items()}
    except SecAggError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SecAggError(f"secure-aggregation client state is damaged ({type(exc).__name__}: {exc})") from None
    return client
