"""Weighting strategies: turn what the sites report into the weights `w_i` of the merge.

One module per strategy, each exporting a `STRATEGY` (`common.weighting.base.Strategy`); this registry maps names
to them, so adding a strategy is adding a module and a line here, and `--weighting` choices come from it.
"""

from feddem.common.errors import FeddemError
from feddem.common.weighting import chameleon, dga, manual, search, size, uniform
from feddem.common.weighting.base import ALIGNMENT, EMBEDDING, SiteReport, Strategy

WEIGHTINGS: dict[str, Strategy] = {m.STRATEGY.name: m.STRATEGY for m in (uniform, size, chameleon, dga, search, manual)}

__all__ = ["ALIGNMENT", "EMBEDDING", "WEIGHTINGS", "SiteReport", "Strategy", "compute_weights", "strategy"]


def strategy(name: str) -> Strategy:
    if name not in WEIGHTINGS:
        raise FeddemError(f"unknown weighting '{name}': choose one of {', '.join(WEIGHTINGS)}")
    return WEIGHTINGS[name]


def compute_weights(name: str, sites: list[SiteReport], cfg=None, state: dict | None = None) -> list[float]:
    """The weights of a report-based strategy, in the order of `sites`."""
    chosen = strategy(name)
    if not sites:
        raise FeddemError("no site reported: nothing to weight")
    if chosen.weigh is None:
        raise FeddemError(f"weighting '{name}' scores candidate merges; it has no weights from reports alone")
    weights = chosen.weigh(sites, cfg, state if state is not None else {})
    if len(weights) != len(sites) or not all(w == w and abs(w) != float("inf") for w in weights):
        raise FeddemError(f"weighting '{name}' gave invalid weights {weights}")
    return [float(w) for w in weights]
