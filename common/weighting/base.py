"""The weighting interface: what a strategy sees of each site, and what a strategy is.

A strategy turns the sites' reports into the weights `w_i` of the merge. Most are a function of the reports
(`weigh`); `needs` names what each site must add to its report for it (a domain embedding for Chameleon, the
alignment of its vector with the target direction for DGA). A `search` strategy instead scores candidate merges on
the sites' validation splits (`server.search`), and runs only where the privacy guard allows more than one
aggregation of the same vectors.
"""

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

EMBEDDING = "embedding"  # site report: mean middle-layer hidden state of the base model over its examples
ALIGNMENT = "alignment"  # site report: cosine of its vector with the target direction (DGA)


@dataclass
class SiteReport:
    site: str
    domain: str
    examples: int
    tokens: int
    train_loss: float = float("nan")
    extra: dict = field(default_factory=dict)  # EMBEDDING -> np.ndarray, ALIGNMENT -> float


WeighFn = Callable[[list[SiteReport], object, dict], list[float]]  # (reports, RunConfig, state across rounds)


@dataclass(frozen=True)
class Strategy:
    name: str
    help: str
    weigh: WeighFn | None = None  # None: a search strategy
    needs: frozenset = frozenset()
    search: bool = False


def normalised(values) -> list[float]:
    """Non-negative values scaled to sum to 1 (uniform when they sum to 0)."""
    v = np.asarray(values, dtype=np.float64)
    total = v.sum()
    return [float(x) for x in (v / total if total > 0 else np.full(len(v), 1.0 / len(v)))]


def softmax(values, temperature: float) -> list[float]:
    z = np.asarray(values, dtype=np.float64) / temperature
    z = np.exp(z - z.max())
    return [float(x) for x in z / z.sum()]
