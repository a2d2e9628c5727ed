"""Secure aggregation (SecAgg+, Bell et al. 2020): the server learns only the sum of the clients' vectors.

Transport-agnostic: ``SecAggClient`` / ``SecAggServer`` are state machines whose stage methods take and
return ints, bytes, dicts and numpy arrays; see ``common.secagg.protocol`` for the call order, the threat
model, and what is and is not detected.
"""

from .errors import RefusalError, SecAggError, TamperError, ThresholdError
from .params import SecAggParams, harary_neighbours
from .prg import apply_mask, mask_stream
from .protocol import CIPHERTEXT_BYTES, KEY_BYTES, SecAggClient, SecAggServer, UnmaskRequest
from .quantize import RingConfig, choose_bits, dequantize, error_bound, quantize

__all__ = [
    "CIPHERTEXT_BYTES",
    "KEY_BYTES",
    "RefusalError",
    "RingConfig",
    "SecAggClient",
    "SecAggError",
    "SecAggParams",
    "SecAggServer",
    "TamperError",
    "ThresholdError",
    "UnmaskRequest",
    "apply_mask",
    "choose_bits",
    "dequantize",
    "error_bound",
    "harary_neighbours",
    "mask_stream",
    "quantize",
]
