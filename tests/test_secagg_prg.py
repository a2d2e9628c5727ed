"""Mask expansion: AES-128-CTR keystream as ring elements, with random access at any element offset."""

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from feddem.common.secagg import SecAggError, apply_mask, mask_stream
from feddem.common.secagg import prg


def test_deterministic_per_seed_and_seeds_differ():
    seed = bytes(range(32))
    a = mask_stream(seed, 4000, np.uint32)
    assert np.array_equal(a, mask_stream(seed, 4000, np.uint32))
    b = mask_stream(bytes(31) + b"\x01", 4000, np.uint32)
    assert np.mean(a == b) < 0.01


def test_is_the_aes_ctr_keystream_of_the_hkdf_key():
    seed = os.urandom(32)
    key = prg.hkdf(seed, b"feddem-secagg/v1/prg/aes128-ctr", 16)
    keystream = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(64))
    assert mask_stream(seed, 16, np.uint32).tobytes() == keystream
    assert mask_stream(seed, 8, np.uint64).tobytes() == keystream


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_output_is_the_ring_dtype_and_roughly_uniform(dtype):
    m = mask_stream(os.urandom(32), 100_000, dtype)
    assert m.dtype == np.dtype(dtype) and m.shape == (100_000,)
    top = np.iinfo(dtype).max
    assert abs(m.astype(np.float64).mean() / top - 0.5) < 0.01


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_chunk_at_offset_equals_slice_of_full_stream(dtype):
    seed = os.urandom(32)
    full = mask_stream(seed, 5000, dtype)
    for offset in (0, 1, 2, 3, 4, 5, 7, 15, 16, 17, 33, 1001, 4990):
        for length in (1, 3, 10):
            chunk = mask_stream(seed, length, dtype, offset)
            assert np.array_equal(chunk, full[offset : offset + length]), (offset, length)


def test_chunk_across_internal_cipher_blocks():
    seed = os.urandom(32)
    block = prg._BLOCK
    full = mask_stream(seed, 2 * block + 50, np.uint32)
    for offset, length in ((block - 3, 50), (block - 1, block + 7), (3, 2 * block + 40)):
        assert np.array_equal(mask_stream(seed, length, np.uint32, offset), full[offset : offset + length])


def test_uint64_stream_is_the_same_bytes_as_uint32():
    seed = os.urandom(32)
    assert mask_stream(seed, 100, np.uint64, 7).tobytes() == mask_stream(seed, 200, np.uint32, 14).tobytes()


def test_apply_mask_adds_and_subtracts_mod_2k():
    seed = os.urandom(32)
    x = np.arange(1000, dtype=np.uint32)
    y = x.copy()
    apply_mask(y, seed, 123, 1)
    assert np.mean(y == x) < 0.01
    assert np.array_equal(y, x + mask_stream(seed, 1000, np.uint32, 123))
    apply_mask(y, seed, 123, -1)
    assert np.array_equal(y, x)


def test_bad_arguments():
    with pytest.raises(SecAggError, match="32 bytes"):
        mask_stream(b"short", 4, np.uint32)
    with pytest.raises(SecAggError, match="uint32 or uint64"):
        mask_stream(os.urandom(32), 4, np.int32)
    with pytest.raises(SecAggError, match="offset"):
        mask_stream(os.urandom(32), 4, np.uint32, -1)
    with pytest.raises(SecAggError, match="sign"):
        apply_mask(np.zeros(4, np.uint32), os.urandom(32), 0, 2)
