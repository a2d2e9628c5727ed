"""The site's plain upload path: what leaves the site when the server asks for its weighted vector in the clear.

Secure aggregation replaces it; plain aggregation sends `weight * vector` in the run's `vector-dtype` (float32, or a
16-bit float: half the bytes), and only through the privacy guard (`plain_upload`): the site's node config must
allow plain uploads, the run must have declared plain aggregation when the vector was trained, the weight must be
in range, and the vector must never have left the site before; the upload is recorded before it is sent.
What is sent is the upload of the merge rule the vector was trained for (`client.merge_parts`: the vector itself
for weighted-sum, else the rule's parts as one vector). The (possibly lazy) stored vector is scaled and serialised one tensor at a time: the site holds the message and
one tensor, never a second copy of the vector.
"""

import math

import torch
from flwr.app import ArrayRecord

from feddem.client.guard import GuardPolicy, check_plain_upload, vector_digest
from feddem.client.merge_parts import check_declared, upload_vector
from feddem.common.site_context import SiteContext
from feddem.common.errors import FeddemError
from feddem.common.messages import SiteSettings
from feddem.common.vector_records import vector_to_record
from feddem.common.vectors import Vector, cast, scaled


def upload_weighted_vector(vector: Vector, weight: float, dtype: torch.dtype = torch.float32) -> ArrayRecord:
    """`weight * vector` (formed in float32) as an ArrayRecord of `dtype` arrays (Flower chunks it on the wire)."""
    if not math.isfinite(weight):
        raise FeddemError(f"the server asked for a non-finite weight ({weight})")
    return vector_to_record(cast(scaled(vector, weight), dtype))


def plain_upload(site: SiteContext, cfg: SiteSettings, node_config: dict, run_id: int, weight: float) -> ArrayRecord:
    """The guarded plain upload of this run's vector (a GuardRefusal names the rule it breaks)."""
    if not math.isfinite(weight):
        raise FeddemError(f"the server asked for a non-finite weight ({weight})")
    policy = GuardPolicy.for_site(cfg, node_config)
    check_declared(site, run_id, cfg.merge)  # the merge rule the vector was trained for: its parts, all of them
    check_plain_upload(site, cfg, policy, run_id, vector_digest(site, run_id), weight)
    return upload_weighted_vector(upload_vector(site, run_id), weight, cfg.torch_vector_dtype)
