"""Key derivation (X25519 + HKDF-SHA256) and mask expansion (seed -> ring elements via AES-128-CTR).

A 32-byte seed is turned into an AES-128 key with HKDF; the mask is the AES-CTR keystream (counter block
starting at 0, big-endian 128-bit) read as little-endian uint16/uint32/uint64 words. Element i of the stream is
bytes [i*w, (i+1)*w) of the keystream (w = 4 or 8), so the mask for elements [offset, offset+len) starts at
counter block offset*w // 16, skipping offset*w % 16 bytes: any slice is computable without the prefix.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import SecAggError

SEED_BYTES = 32
_PRG_INFO = b"feddem-secagg/v1/prg/aes128-ctr"
_BLOCK = 1 << 17  # elements per cipher call (512 KiB-1 MiB of keystream)
_ZEROS = memoryview(bytes(_BLOCK * 8))
_RING_DTYPES = (np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.uint64))


def hkdf(ikm: bytes, info: bytes, length: int = 32, salt: bytes | None = None) -> bytes:
    """HKDF-SHA256(ikm, salt, info) -> ``length`` bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def agree(private_key: X25519PrivateKey, peer_public: bytes, info: bytes, length: int = 32) -> bytes:
    """X25519 shared secret with ``peer_public`` (raw 32 bytes), expanded by HKDF with ``info``."""
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # wrong length or a low-order point (all-zero shared secret)
        raise SecAggError(f"invalid X25519 public key: {exc}") from None
    return hkdf(shared, info, length)


def _check(seed: bytes, dtype: np.dtype, offset: int) -> None:
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != SEED_BYTES:
        raise SecAggError(f"a mask seed must be {SEED_BYTES} bytes")
    if dtype not in _RING_DTYPES:
        raise SecAggError(f"mask dtype must be uint16, uint32 or uint64, got {dtype}")
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
        raise SecAggError(f"mask offset must be a non-negative int, got {offset!r}")


def _encryptor(seed: bytes, offset: int, itemsize: int):
    key = hkdf(bytes(seed), _PRG_INFO, 16)
    block, skip = divmod(int(offset) * itemsize, 16)
    enc = Cipher(algorithms.AES(key), modes.CTR(block.to_bytes(16, "big"))).encryptor()
    if skip:
        enc.update(bytes(skip))
    return enc


def apply_mask(acc: np.ndarray, seed: bytes, offset: int = 0, sign: int = 1) -> None:
    """In place: acc += sign * PRG(seed)[offset : offset + len(acc)]  (mod 2^k; acc is uint16/uint32/uint64, 1-D)."""
    _check(seed, acc.dtype, offset)
    if acc.ndim != 1:
        raise SecAggError(f"apply_mask expects a 1-D array, got shape {acc.shape}")
    if sign not in (1, -1):
        raise SecAggError(f"sign must be +1 or -1, got {sign!r}")
    itemsize = acc.dtype.itemsize
    stream_dtype = acc.dtype.newbyteorder("<")
    op = np.add if sign > 0 else np.subtract
    enc = _encryptor(seed, offset, itemsize)
    n = acc.shape[0]
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        keystream = enc.update(_ZEROS[: (stop - start) * itemsize])
        view = acc[start:stop]
        op(view, np.frombuffer(keystream, dtype=stream_dtype), out=view)


def mask_stream(seed: bytes, length: int, dtype: np.dtype | type, offset: int = 0) -> np.ndarray:
    """PRG(seed)[offset : offset + length] as a new array of the ring dtype."""
    out = np.zeros(int(length), dtype=np.dtype(dtype))
    apply_mask(out, seed, offset, 1)
    return out
