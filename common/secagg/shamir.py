"""t-of-n Shamir secret sharing of short byte strings over the prime field GF(2^521 - 1).

A secret s (at most 64 bytes, read big-endian) is the constant term of a random polynomial of degree t-1
whose other coefficients come from os.urandom; share x is (x, f(x)) for a nonzero evaluation point x.
Any t shares give s back by Lagrange interpolation at 0; t-1 shares are independent of s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from .errors import SecAggError, TamperError, ThresholdError

PRIME = (1 << 521) - 1  # a Mersenne prime
SHARE_BYTES = 66  # ceil(521 / 8)


def _random_element() -> int:
    # 528 random bits reduced mod p: the bias is about 2^-520, negligible.
    return int.from_bytes(os.urandom(SHARE_BYTES), "big") % PRIME


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % PRIME
    return acc


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, int]:
    """Shares {x: f(x)} of ``secret`` for the distinct nonzero points ``xs``; any ``threshold`` recover it."""
    if not isinstance(secret, (bytes, bytearray)) or len(secret) > 64:
        raise SecAggError("a Shamir secret must be at most 64 bytes")
    points = [int(x) for x in xs]
    if len(set(points)) != len(points) or any(not 0 < x < PRIME for x in points):
        raise SecAggError("Shamir evaluation points must be distinct and in [1, p)")
    if not 1 <= threshold <= len(points):
        raise SecAggError(f"Shamir threshold {threshold} must be between 1 and the number of shares {len(points)}")
    coefficients = [int.from_bytes(secret, "big")] + [_random_element() for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x) for x in points}


def interpolate_at_zero(points: Sequence[tuple[int, int]]) -> int:
    """f(0) for the polynomial of degree len(points)-1 through ``points`` (Lagrange interpolation mod p)."""
    xs = [x % PRIME for x, _ in points]
    if len(set(xs)) != len(xs):
        raise SecAggError("Shamir shares have duplicate evaluation points")
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def reconstruct(shares: Mapping[int, int], threshold: int, verify: bool = True) -> int:
    """The secret as an int from at least ``threshold`` shares {x: y}.

    With more than ``threshold`` shares and ``verify``, the first t and the last t (by x) are interpolated
    separately; they disagree unless all shares used lie on one polynomial of degree t-1 -> TamperError.
    """
    if len(shares) < threshold:
        raise ThresholdError("reconstruct", len(shares), threshold, "shares")
    points = sorted((int(x), int(y)) for x, y in shares.items())
    secret = interpolate_at_zero(points[:threshold])
    if verify and len(points) > threshold and interpolate_at_zero(points[-threshold:]) != secret:
        raise TamperError("Shamir shares are inconsistent: at least one share is corrupt")
    return secret


def reconstruct_bytes(shares: Mapping[int, int], threshold: int, length: int = 32, verify: bool = True) -> bytes:
    """The secret as ``length`` bytes; a value that does not fit means corrupt shares -> TamperError."""
    secret = reconstruct(shares, threshold, verify)
    if secret >> (8 * length):
        raise TamperError(f"reconstructed secret does not fit {length} bytes: the shares are corrupt")
    return secret.to_bytes(length, "big")


def encode_share(y: int) -> bytes:
    """A share value as SHARE_BYTES big-endian bytes."""
    return int(y).to_bytes(SHARE_BYTES, "big")


def decode_share(blob: bytes) -> int:
    """Inverse of ``encode_share``; rejects wrong lengths and values >= p."""
    if not isinstance(blob, (bytes, bytearray)) or len(blob) != SHARE_BYTES:
        raise SecAggError(f"a Shamir share must be {SHARE_BYTES} bytes")
    y = int.from_bytes(blob, "big")
    if y >= PRIME:
        raise SecAggError("a Shamir share value is out of the field range")
    return y
