"""The site's upload path: what leaves the site when the server asks for its weighted vector.

This is the one function that secure aggregation replaces: plain aggregation sends `weight * vector` in the run's
`vector-dtype` (float32, or a 16-bit float: half the bytes).
The (possibly lazy) stored vector is scaled and serialised one tensor at a time: the site holds the message and
one tensor, never a second copy of the vector.
"""

import math

import torch
from flwr.app import ArrayRecord

from feddem.common.errors import FeddemError
from feddem.common.vectors import Vector, cast, scaled, vector_to_record


def upload_weighted_vector(vector: Vector, weight: float, dtype: torch.dtype = torch.float32) -> ArrayRecord:
    """`weight * vector` (formed in float32) as an ArrayRecord of `dtype` arrays (Flower chunks it on the wire)."""
    if not math.isfinite(weight):
        raise FeddemError(f"the server asked for a non-finite weight ({weight})")
    return vector_to_record(cast(scaled(vector, weight), dtype))
