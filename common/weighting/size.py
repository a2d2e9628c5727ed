"""Size weights: each site in proportion to its number of training tokens (FedAvg's rule)."""

from feddem.common.errors import FeddemError
from feddem.common.weighting.base import SiteReport, WeightingStrategy


def size_weights(sites: list[SiteReport], cfg=None, state=None) -> list[float]:
    total = sum(s.tokens for s in sites)
    if total <= 0:
        raise FeddemError("size weighting needs token counts, and every site reported 0 tokens")
    return [s.tokens / total for s in sites]


STRATEGY = WeightingStrategy("size", "in proportion to each site's training tokens", size_weights)
