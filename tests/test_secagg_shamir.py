"""Shamir t-of-n sharing of 32-byte secrets over GF(2^521 - 1)."""

import itertools
import os

import pytest

from feddem.common.secagg import SecAggError, TamperError, ThresholdError
from feddem.common.secagg import shamir


def test_any_t_shares_reconstruct_the_secret():
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5])
    for subset in itertools.combinations(shares.items(), 3):
        assert shamir.reconstruct_bytes(dict(subset), 3) == secret
    assert shamir.reconstruct_bytes(shares, 3) == secret  # all 5, consistency-checked


def test_fewer_than_t_shares_give_a_wrong_value_or_refuse():
    secret = os.urandom(32)
    value = int.from_bytes(secret, "big")
    shares = shamir.split(secret, 4, [10, 20, 30, 40, 50, 60])
    for subset in itertools.combinations(shares.items(), 3):
        assert shamir.interpolate_at_zero(list(subset)) != value
    with pytest.raises(ThresholdError, match="3 shares"):
        shamir.reconstruct(dict(list(shares.items())[:3]), 4)


def test_a_tampered_share_gives_a_wrong_value_or_is_detected():
    secret = os.urandom(32)
    value = int.from_bytes(secret, "big")
    shares = shamir.split(secret, 3, [1, 2, 3, 4])
    bad = dict(shares)
    bad[2] = (bad[2] + 1) % shamir.PRIME
    exactly_t = {x: bad[x] for x in (1, 2, 3)}
    # f(0) moves by the Lagrange weight of x=2 among {1, 2, 3}, which is -3
    assert shamir.reconstruct(exactly_t, 3) == (value - 3) % shamir.PRIME
    with pytest.raises(TamperError, match="inconsistent"):
        shamir.reconstruct(bad, 3)  # more than t shares: checked
    garbled = dict(exactly_t)
    garbled[2] = int.from_bytes(os.urandom(64), "big")
    with pytest.raises(TamperError, match="does not fit"):
        shamir.reconstruct_bytes(garbled, 3)  # a random value almost surely exceeds 32 bytes


def test_share_encoding():
    y = shamir.PRIME - 1
    assert shamir.decode_share(shamir.encode_share(y)) == y
    with pytest.raises(SecAggError, match="66 bytes"):
        shamir.decode_share(b"\x00" * 65)
    with pytest.raises(SecAggError, match="field"):
        shamir.decode_share(b"\xff" * 66)


def test_bad_split_arguments():
    with pytest.raises(SecAggError, match="distinct"):
        shamir.split(os.urandom(32), 2, [1, 1, 2])
    with pytest.raises(SecAggError, match="distinct"):
        shamir.split(os.urandom(32), 2, [0, 1, 2])
    with pytest.raises(SecAggError, match="threshold"):
        shamir.split(os.urandom(32), 4, [1, 2, 3])
