"""Weighting strategies: turn what the sites report into the weights `w_i` of the merge.

A strategy is a function `(sites: list[SiteReport]) -> list[float]`, registered by name in `WEIGHTINGS`; adding
one is adding a module and a line here. `--weighting` choices come from this registry.
"""

from common.weighting.base import SiteReport, WeightingFn
from common.weighting.size import size_weights
from common.weighting.uniform import uniform_weights

WEIGHTINGS: dict[str, WeightingFn] = {
    "uniform": uniform_weights,
    "size": size_weights,
}

__all__ = ["WEIGHTINGS", "SiteReport", "WeightingFn", "compute_weights"]


def compute_weights(name: str, sites: list[SiteReport]) -> list[float]:
    from common.errors import FeddemError

    if name not in WEIGHTINGS:
        raise FeddemError(f"unknown weighting '{name}': choose one of {', '.join(WEIGHTINGS)}")
    if not sites:
        raise FeddemError("no site reported: nothing to weight")
    return WEIGHTINGS[name](sites)
