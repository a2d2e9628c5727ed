"""Serialising a ``SecAggClient`` between the messages of one round (``to_state`` / ``from_state``).

A transport whose handlers may run in different processes (Flower's simulation runs each message in any Ray
actor) keeps the client's state in its own store between stages. ``ClientState`` is the client's whole state as a
plain dataclass (the client builds it and is rebuilt from it: ``SecAggClient.to_state`` / ``from_state``); this
module only encodes it. The blob holds the round's SECRETS (both X25519 private keys, the self-mask seed, the
shares held for peers): it must stay on the client, never be sent to the server. Format: UTF-8 JSON, bytes as hex,
Shamir shares as hex ints; a version field guards against old blobs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .errors import SecAggError
from .params import SecAggParams

VERSION = 1


@dataclass
class ClientState:
    """Everything a ``SecAggClient`` holds between two stages (secret: keep it on the client)."""

    params: SecAggParams
    id: int
    stage: str = "new"
    c_key: X25519PrivateKey | None = None
    s_key: X25519PrivateKey | None = None
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    b_seed: bytes = b""
    held_self: dict[int, int] = field(default_factory=dict)  # peer -> share of peer's self-mask seed b
    held_key: dict[int, int] = field(default_factory=dict)  # peer -> share of peer's mask secret key s_sk
    pair_seeds: dict[int, bytes] = field(default_factory=dict)
    coverage: tuple[list[int], list[int]] = ([], [])  # the masked ring intervals: (starts, ends)
    revealed: dict[int, bytes] = field(default_factory=dict)  # peer -> which share kind was revealed


def _hex_ids(mapping: dict[int, object], encode) -> dict[str, object]:
    return {str(k): encode(v) for k, v in mapping.items()}


def _key_hex(key: X25519PrivateKey | None) -> str | None:
    return key.private_bytes_raw().hex() if key is not None else None


def _key_of(text: str | None) -> X25519PrivateKey | None:
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(text)) if text is not None else None


def encode_state(state: ClientState) -> bytes:
    """The client's whole state as bytes (secret: keep it on the client)."""
    params = state.params.to_dict()
    params["session"] = params["session"].hex()
    params["server_key"] = params["server_key"].hex()
    record = {
        "version": VERSION,
        "params": params,
        "id": state.id,
        "stage": state.stage,
        "c_key": _key_hex(state.c_key),
        "s_key": _key_hex(state.s_key),
        "keys": _hex_ids(state.keys, lambda pair: [pair[0].hex(), pair[1].hex()]),
        "b_seed": state.b_seed.hex(),
        "held_self": _hex_ids(state.held_self, lambda y: format(y, "x")),
        "held_key": _hex_ids(state.held_key, lambda y: format(y, "x")),
        "pair_seeds": _hex_ids(state.pair_seeds, bytes.hex),
        "coverage": [list(state.coverage[0]), list(state.coverage[1])],
        "revealed": _hex_ids(state.revealed, bytes.hex),
    }
    return json.dumps(record, separators=(",", ":")).encode()


def _decode(record: dict) -> ClientState:
    params = dict(record["params"])
    params["session"] = bytes.fromhex(params["session"])
    params["server_key"] = bytes.fromhex(params.get("server_key", ""))
    starts, ends = record["coverage"]
    return ClientState(
        params=SecAggParams.from_dict(params),
        id=int(record["id"]),
        stage=str(record["stage"]),
        c_key=_key_of(record["c_key"]),
        s_key=_key_of(record["s_key"]),
        keys={int(k): (bytes.fromhex(a), bytes.fromhex(b)) for k, (a, b) in record["keys"].items()},
        b_seed=bytes.fromhex(record["b_seed"]),
        held_self={int(k): int(v, 16) for k, v in record["held_self"].items()},
        held_key={int(k): int(v, 16) for k, v in record["held_key"].items()},
        pair_seeds={int(k): bytes.fromhex(v) for k, v in record["pair_seeds"].items()},
        coverage=([int(s) for s in starts], [int(e) for e in ends]),
        revealed={int(k): bytes.fromhex(v) for k, v in record["revealed"].items()},
    )


def decode_state(blob: bytes) -> ClientState:
    """Inverse of ``encode_state``; a damaged or foreign blob raises SecAggError."""
    try:
        record = json.loads(bytes(blob).decode())
        if record.get("version") != VERSION:
            raise SecAggError(f"secure-aggregation client state has version {record.get('version')!r}, "
                              f"expected {VERSION}")
        return _decode(record)
    except SecAggError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SecAggError(f"secure-aggregation client state is damaged ({type(exc).__name__}: {exc})") from None
