"""Weighting strategies: turn what the sites report into the weights `w_i` of the merge.

One module per strategy, each exporting a `STRATEGY` (`common.weighting.base.WeightingStrategy`) that owns its
parameters (`parameters()`) and checks (`validate`); this registry maps names to them, so adding a strategy is adding
a module and a line here, and `--weighting` choices come from it (docs/architecture.md, "Adding a weighting
strategy"). `common.weighting.weights` is the one home of `--weights` parsing and the weight-range check.
"""

from feddem.common.errors import FeddemError
from feddem.common.weighting import chameleon, dga, manual, search, size, uniform
from feddem.common.weighting.base import ALIGNMENT, EMBEDDING, Parameter, SiteReport, WeightingStrategy

WEIGHTINGS: dict[str, WeightingStrategy] = {m.STRATEGY.name: m.STRATEGY
                                            for m in (uniform, size, chameleon, dga, search, manual)}

__all__ = ["ALIGNMENT", "EMBEDDING", "WEIGHTINGS", "Parameter", "SiteReport", "WeightingStrategy", "compute_weights",
           "parameter", "strategy"]


def strategy(name: str) -> WeightingStrategy:
    if name not in WEIGHTINGS:
        raise FeddemError(f"unknown weighting '{name}': choose one of {', '.join(WEIGHTINGS)}")
    return WEIGHTINGS[name]


def parameter(name: str) -> Parameter:
    """The strategy parameter whose run-config key is `name` (e.g. `dga-eta`)."""
    found = [p for s in WEIGHTINGS.values() for p in s.parameters() if p.name == name]
    if len(found) != 1:
        raise FeddemError(f"{len(found)} weighting strategies declare parameter '{name}' (expected exactly one)")
    return found[0]


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
