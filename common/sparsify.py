"""Site-side sparsification of a distribution vector before it is stored (`--sparsify none|dare:P|topk:F`).

Each site thins its own vector, tensor by tensor, with no view of the other sites', so it works with every
weighting and with plain and secure uploads alike (the stored vector is what any upload sends):

- `dare:P` (Yu et al., 2024, "drop and rescale"): exactly round(P * n) of each tensor's n entries, chosen at random,
  are set to zero and the others are multiplied by 1/(1 - P), so the expected vector is the original one. The
  randomness is the site's own (a key derived from its secret), never known to the server: with a known mask the
  sum's entries kept by a single site would reveal that site's values.
- `topk:F` (the trim step of TIES): the round(F * n) entries of largest magnitude of each tensor are kept (at least
  one), the others set to zero; no rescaling.

A LoRA vector is the dense update B @ A of each adapted layer under the base weight's name: it is sparsified like
any other tensor (the adapters themselves are not stored).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from feddem.common.errors import FeddemError

if TYPE_CHECKING:  # torch is imported where a vector is sparsified: the config check (`parse_sparsify`) stays light
    import torch

    from feddem.common.vectors import Vector

KINDS = ("none", "dare", "topk")


def parse_sparsify(spec: str) -> tuple[str, float]:
    """'none' -> ('none', 0.0); 'dare:0.9' -> ('dare', 0.9); 'topk:0.2' -> ('topk', 0.2); a FeddemError naming the
    option for anything else (DARE's P in [0, 1), top-k's F in (0, 1])."""
    text = spec.strip().lower()
    if text in ("", "none"):
        return "none", 0.0
    kind, sep, value = text.partition(":")
    if kind not in ("dare", "topk") or not sep:
        raise FeddemError(f"sparsify: '{spec}' is not none, dare:P or topk:F (e.g. --sparsify dare:0.9)")
    try:
        amount = float(value)
    except ValueError:
        raise FeddemError(f"sparsify: '{value}' in '{spec}' is not a number") from None
    if kind == "dare" and not 0 <= amount < 1:
        raise FeddemError(f"sparsify: DARE's drop rate P must be in [0, 1), got {value} (dare:0.9 drops 90%)")
    if kind == "topk" and not 0 < amount <= 1:
        raise FeddemError(f"sparsify: top-k's kept fraction F must be in (0, 1], got {value} (topk:0.2 keeps 20%)")
    return kind, amount


def dare(t: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """`t` with exactly round(p * numel) entries, drawn with `generator`, zeroed and the rest scaled by 1/(1-p)."""
    import torch

    n = t.numel()
    drop = round(p * n)
    if drop == 0:
        return t.clone()
    out = (t.float() / (1.0 - p)).flatten()
    out[torch.randperm(n, generator=generator)[:drop]] = 0.0
    return out.reshape(t.shape).to(t.dtype)


def topk(t: torch.Tensor, fraction: float) -> torch.Tensor:
    """`t` with only its max(1, round(fraction * numel)) entries of largest magnitude kept, the rest zeroed."""
    import torch

    n = t.numel()
    keep = max(1, round(fraction * n))
    if keep >= n:
        return t.clone()
    flat = t.flatten()
    out = torch.zeros_like(flat)
    index = torch.topk(flat.abs().float(), keep, sorted=False).indices
    out[index] = flat[index]
    return out.reshape(t.shape)


def _generator(key: bytes, name: str) -> torch.Generator:
    """One generator per tensor, from the site's key and the tensor's name: reading a lazy vector twice (upload,
    alignment) gives the same mask."""
    import torch

    seed = int.from_bytes(hashlib.sha256(key + b"|" + name.encode()).digest()[:8], "little") >> 1
    return torch.Generator().manual_seed(seed)


def sparsify(vector: Vector, spec: str, key: bytes = b"") -> Vector:
    """The vector sparsified as `spec` says (`parse_sparsify`), lazily, one tensor at a time; the vector itself for
    'none'. `key`: the site's secret randomness for DARE's masks."""
    from feddem.common.vectors import LazyVector, specs_of

    kind, amount = parse_sparsify(spec)
    if kind == "none":
        return vector

    def load(name: str) -> torch.Tensor:
        t = vector[name]
        return dare(t, amount, _generator(key, name)) if kind == "dare" else topk(t, amount)

    return LazyVector(specs_of(vector), load)

