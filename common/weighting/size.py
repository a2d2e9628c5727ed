"""Size weights: each site in proportion to its number of training tokens (FedAvg's rule)."""

from common.errors import FeddemError
from common.weighting.base import SiteReport


def size_weights(sites: list[SiteReport]) -> list[float]:
    total = sum(s.tokens for s in sites)
    if total <= 0:
        raise FeddemError("size weighting needs token counts, and every site reported 0 tokens")
    return [s.tokens / total for s in sites]
