"""Fixed-point encoding for secure aggregation: error bound, unbiased rounding, clipping, no wraparound."""

import numpy as np
import pytest

from feddem.common.secagg import RingConfig, SecAggError, choose_bits, dequantize, error_bound, quantize


def _ring_sum(parts, dtype):
    total = np.zeros_like(parts[0], dtype=dtype)
    for p in parts:
        total += p  # uint arithmetic wraps mod 2^k
    return total


@pytest.mark.parametrize("bits", [16, 32, 64])
@pytest.mark.parametrize("n", [1, 3, 10])
def test_round_trip_within_error_bound(bits, n):
    rng = np.random.default_rng(1)
    cfg = RingConfig(bits, 2.0, n)
    xs = [rng.uniform(-2, 2, 5000).astype(np.float32) for _ in range(n)]
    exact = np.sum([x.astype(np.float64) for x in xs], axis=0)
    total = _ring_sum([quantize(x, cfg, rng) for x in xs], cfg.dtype)
    for out_dtype in (np.float32, np.float64):
        got = dequantize(total, cfg, n, out_dtype)
        assert got.dtype == out_dtype
        assert np.abs(got.astype(np.float64) - exact).max() <= error_bound(cfg, n, out_dtype)
    # the bound is tight enough to matter: within a few float32 ulps of the sum (32/64 bits), within the
    # rounding of a 16-bit float upload (16 bits: at most n quanta of 2 * clip * n / 2^16)
    limit = n * 2.0 * 2**-21 if bits > 16 else n * (n * 2 * 2.0 / 2**16) * 1.01 + n * 2.0 * 2**-23
    assert error_bound(cfg, n, np.float32) < limit


def test_single_client_error_is_below_one_quantum_and_nonzero():
    cfg = RingConfig(32, 1.0, 4)
    x = np.random.default_rng(2).uniform(-1, 1, 20000).astype(np.float32)
    err = dequantize(quantize(x, cfg), cfg, 1, np.float64) - x.astype(np.float64)
    assert np.abs(err).max() < cfg.quantum * (1 + 1e-9)
    assert np.abs(err).max() > cfg.quantum / 10  # values really are rounded to the grid


def test_stochastic_rounding_is_unbiased():
    cfg = RingConfig(32, 1e6, 1000)  # coarse: quantum ~0.47, so rounding is visible
    v0 = np.floor(1e6 * cfg.scale)
    x_value = (v0 + 0.3) / cfg.scale - cfg.clip  # 0.3 of a quantum above a grid point
    x = np.full(200_000, x_value, dtype=np.float64)
    err = dequantize(quantize(x, cfg, np.random.default_rng(3)), cfg, 1, np.float64) - x_value
    assert set(np.unique(np.round(err / cfg.quantum, 3))) == {-0.3, 0.7}
    # round-to-nearest would be off by -0.3 quanta (~0.14) on average
    assert abs(err.mean()) < 0.02 * cfg.quantum
    frac_up = np.mean(err > 0)
    assert abs(frac_up - 0.3) < 0.01


def test_clipping():
    cfg = RingConfig(32, 1.0, 3)
    x = np.array([5.0, -5.0, 0.5, 1.0, -1.0, np.float32(1e30)], dtype=np.float32)
    got = dequantize(quantize(x, cfg), cfg, 1, np.float64)
    np.testing.assert_allclose(got, [1.0, -1.0, 0.5, 1.0, -1.0, 1.0], atol=error_bound(cfg, 1, np.float64))


@pytest.mark.parametrize("bits,n", [(16, 2), (16, 10), (16, 1000), (32, 2), (32, 10), (32, 1000), (64, 2),
                                    (64, 10), (64, 1000)])
def test_no_wraparound_at_the_clip_limit(bits, n):
    cfg = RingConfig(bits, 3.0, n)
    assert n * cfg.max_per_client <= (1 << bits) - 1
    for value in (3.0, 1e9, -3.0, -1e9):
        q = quantize(np.full(8, value, dtype=np.float32), cfg)
        assert int(q.max()) <= cfg.max_per_client
        total = _ring_sum([q] * n, cfg.dtype)
        assert int(total[0]) == n * int(q[0])  # no modular reduction happened
        expected = np.clip(value, -3.0, 3.0) * n
        got = dequantize(total, cfg, n, np.float64)
        np.testing.assert_allclose(got, expected, atol=error_bound(cfg, n, np.float64))


def test_top_value_is_exact_in_64_bits():
    cfg = RingConfig(64, 1.0, 1)
    q = quantize(np.array([1.0, -1.0], dtype=np.float32), cfg)
    assert q.dtype == np.uint64
    assert int(q[0]) == cfg.max_per_client and int(q[1]) == 0
    assert cfg.max_per_client > 2**63


def test_choose_bits():
    assert choose_bits(10, 1.0, 1e-6) == 32
    # a coarse target (what a bf16 upload rounds to: clip * 2^-8) admits 16 bits for few sites, not for many
    assert choose_bits(3, 1.0, 2.0**-8) == 16 and 3 / RingConfig(16, 1.0, 3).scale <= 2.0**-8
    assert choose_bits(11, 1.0, 2.0**-8) == 16 and choose_bits(12, 1.0, 2.0**-8) == 32
    assert choose_bits(40_000, 1.0, 1.0) == 32  # 40,000 sites do not fit a 16-bit ring at all
    bits = choose_bits(10, 1.0, 1e-9)
    assert bits == 64
    assert 10 / RingConfig(bits, 1.0, 10).scale <= 1e-9
    assert 10 / RingConfig(32, 1.0, 10).scale > 1e-9
    with pytest.raises(SecAggError, match="64-bit"):
        choose_bits(10, 1.0, 1e-25)
    with pytest.raises(SecAggError, match="target_precision"):
        choose_bits(10, 1.0, 0)


def test_bad_inputs():
    cfg = RingConfig(32, 1.0, 3)
    with pytest.raises(SecAggError, match="non-finite"):
        quantize(np.array([0.0, np.nan], dtype=np.float32), cfg)
    with pytest.raises(SecAggError, match="index 1"):
        quantize(np.array([0.0, np.inf], dtype=np.float32), cfg)
    with pytest.raises(SecAggError, match="1-D"):
        quantize(np.zeros((2, 2), dtype=np.float32), cfg)
    with pytest.raises(SecAggError, match="float"):
        quantize(np.zeros(3, dtype=np.int32), cfg)
    with pytest.raises(SecAggError, match="ring dtype"):
        dequantize(np.zeros(3, dtype=np.uint64), cfg, 1)
    with pytest.raises(SecAggError, match="bits"):
        RingConfig(8, 1.0, 3)
    with pytest.raises(SecAggError, match="do not fit a 16-bit ring"):
        RingConfig(16, 1.0, 1 << 15)
    with pytest.raises(SecAggError, match="clip"):
        RingConfig(32, -1.0, 3)
    with pytest.raises(SecAggError, match="num_summed"):
        dequantize(np.zeros(3, dtype=np.uint32), cfg, 4)
