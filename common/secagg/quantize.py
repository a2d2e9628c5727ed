"""Fixed-point encoding of float vectors into the ring Z_{2^k} (k = 16, 32 or 64) with stochastic rounding.

A value x is clipped to [-c, c] and encoded as q = SR((x + c) * scale), an integer in [0, M], where
M = floor((2^k - 1) / n) for n = ``num_clients`` (for k = 64, M is further rounded down to 53 significant
bits so that it is exact in float64) and scale = M / (2c). A sum of at most n encodings is at most
n * M <= 2^k - 1, so it never wraps around, and ``dequantize`` recovers sum(x) = S / scale - n_summed * c.

SR is stochastic rounding: floor(v) + [u < v - floor(v)] with u ~ U[0, 1), so E[q] = v exactly (unbiased)
and |q - v| < 1 quantum. The rounding noise comes from numpy's Generator seeded from os.urandom; it is not
a secret (the masks that hide q come from the cipher stream in ``prg``).

Error bound (``error_bound``) per element of a sum over n_summed clients, relative to the exact sum of the
clipped inputs: n_summed / scale (stochastic rounding, < 1 quantum per client) + n_summed * c * 2^-48
(float64 arithmetic) + n_summed * c * eps(out_dtype) (rounding of the result to float32 / float64).
Clipping error (|x| > c) is not included: the caller chooses c.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from .errors import SecAggError

_BLOCK = 1 << 16  # elements per block; keeps the float64 work buffers in cache
RING_BITS = (16, 32, 64)


@dataclass(frozen=True)
class RingConfig:
    """Ring Z_{2^bits}, clipping bound ``clip`` and the largest number of clients whose values are summed."""

    bits: int = 32
    clip: float = 1.0
    num_clients: int = 2

    def __post_init__(self) -> None:
        if self.bits not in RING_BITS:
            raise SecAggError(f"ring bits must be 16, 32 or 64, got {self.bits!r}")
        if isinstance(self.num_clients, bool) or not isinstance(self.num_clients, (int, np.integer)):
            raise SecAggError(f"num_clients must be an int, got {self.num_clients!r}")
        if self.num_clients < 1:
            raise SecAggError(f"num_clients must be >= 1, got {self.num_clients}")
        try:
            clip = float(self.clip)
        except (TypeError, ValueError):
            raise SecAggError(f"clip must be a positive number, got {self.clip!r}") from None
        if not math.isfinite(clip) or clip <= 0:
            raise SecAggError(f"clip must be a positive finite number, got {self.clip!r}")
        object.__setattr__(self, "clip", clip)
        object.__setattr__(self, "num_clients", int(self.num_clients))
        if self.num_clients >= (1 << self.bits) // 2:
            raise SecAggError(f"{self.num_clients} clients do not fit a {self.bits}-bit ring")

    @property
    def dtype(self) -> np.dtype:
        """numpy dtype of ring elements (uint16, uint32 or uint64; arithmetic wraps mod 2^bits)."""
        return np.dtype({16: np.uint16, 32: np.uint32, 64: np.uint64}[self.bits])

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def max_per_client(self) -> int:
        """M: the largest encoding of one client's value; num_clients * M < 2^bits."""
        m = ((1 << self.bits) - 1) // self.num_clients
        drop = max(0, m.bit_length() - 53)  # exact in float64
        return (m >> drop) << drop

    @property
    def scale(self) -> float:
        """Ring units per unit of value."""
        return self.max_per_client / (2.0 * self.clip)

    @property
    def quantum(self) -> float:
        """Value of one ring unit (the stochastic-rounding step)."""
        return 1.0 / self.scale


def _fresh_rng() -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(os.urandom(32), "little"))


def quantize(
    x: np.ndarray, config: RingConfig, rng: np.random.Generator | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """Encode a 1-D float array into ring elements (config.dtype): clip, shift by c, scale, round stochastically.

    ``out``: optional preallocated 1-D array of the ring dtype and the same length to write into."""
    x = np.asarray(x)
    if x.ndim != 1:
        raise SecAggError(f"quantize expects a 1-D array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise SecAggError(f"quantize expects a float array, got dtype {x.dtype}")
    rng = rng if rng is not None else _fresh_rng()
    n = x.shape[0]
    if out is None:
        out = np.empty(n, dtype=config.dtype)
    elif out.shape != (n,) or out.dtype != config.dtype:
        raise SecAggError(f"quantize: out must have shape ({n},) and dtype {config.dtype}")
    scale = config.scale
    shift = config.clip * scale
    top = float(config.max_per_client)
    size = min(n, _BLOCK)
    value, noise = np.empty(size), np.empty(size)  # float64 work buffers
    for start in range(0, n, _BLOCK):
        stop = min(n, start + _BLOCK)
        k = stop - start
        v, u = value[:k], noise[:k]
        chunk = x[start:stop]
        if not np.isfinite(chunk).all():
            bad = start + int(np.flatnonzero(~np.isfinite(chunk))[0])
            raise SecAggError(f"input has a non-finite value ({x[bad]}) at index {bad}; it cannot be aggregated")
        np.multiply(chunk, scale, out=v, dtype=np.float64)
        v += shift  # (x + c) * scale
        np.clip(v, 0.0, top, out=v)  # the same as clipping x to [-c, c]
        rng.random(out=u)
        v += u  # floor(v + u), u ~ U[0, 1): rounds up with probability = the fractional part of v
        np.floor(v, out=v)
        out[start:stop] = v
    return out


def dequantize(
    total: np.ndarray, config: RingConfig, num_summed: int, out_dtype: np.dtype | type = np.float32
) -> np.ndarray:
    """Decode a ring array holding the sum of ``num_summed`` encodings back to floats (sum of clipped inputs)."""
    total = np.asarray(total)
    if total.dtype != config.dtype:
        raise SecAggError(f"dequantize expects ring dtype {config.dtype}, got {total.dtype}")
    if not 1 <= num_summed <= config.num_clients:
        raise SecAggError(f"num_summed must be in [1, {config.num_clients}], got {num_summed}")
    v = total.astype(np.float64)
    v /= config.scale
    v -= num_summed * config.clip
    return v.astype(out_dtype, copy=False)


def error_bound(
    config: RingConfig, num_summed: int | None = None, out_dtype: np.dtype | type = np.float32
) -> float:
    """Largest |dequantized sum - exact sum of the clipped inputs| per element (see the module docstring)."""
    n = config.num_clients if num_summed is None else int(num_summed)
    eps = float(np.finfo(out_dtype).eps)
    return n / config.scale + n * config.clip * 2.0**-48 + n * config.clip * eps


def choose_bits(num_clients: int, clip: float, target_precision: float) -> int:
    """The smallest ring (16, 32 or 64 bits) whose quantization error of the sum (num_clients / scale) is
    <= target_precision. (A 16-bit ring halves the upload against float32; its error is clip * 2^-15 at best,
    so only a coarse target, e.g. what bf16 or fp16 uploads would round to, admits it.)

    ``target_precision`` is the largest acceptable error per element of the aggregated sum caused by the
    fixed-point encoding (the float32 rounding of the result, clip * num_clients * 2^-23, comes on top).
    Raises SecAggError when even 64 bits is too coarse.
    """
    if not (isinstance(target_precision, (int, float)) and target_precision > 0):
        raise SecAggError(f"target_precision must be a positive number, got {target_precision!r}")
    errors = {}
    for bits in RING_BITS:
        if num_clients >= (1 << bits) // 2:
            continue
        cfg = RingConfig(bits, clip, num_clients)
        errors[bits] = num_clients / cfg.scale
        if errors[bits] <= target_precision:
            return bits
    raise SecAggError(
        f"target precision {target_precision:g} is finer than a 64-bit ring allows for {num_clients} clients "
        f"with clip {clip:g} (quantization error {errors[64]:.3g}); raise the target or lower the clip"
    )
