"""Weights given by hand: `--weights site-0=0.5,site-1=0.25,...` (every site that trained, by its name)."""

from feddem.common.errors import FeddemError
from feddem.common.weighting.base import Parameter, SiteReport, WeightingStrategy
from feddem.common.weighting.weights import check_range, parse_weights

WEIGHTS = Parameter("weights", str, "", "weights by hand, SITE=W,... for every site (implies --weighting manual)")


def manual_weights(sites: list[SiteReport], cfg, state=None) -> list[float]:
    given = parse_weights(cfg.weights)
    names = [s.site for s in sites]
    unknown = sorted(set(given) - set(names))
    missing = [n for n in names if n not in given]
    if unknown or missing:
        raise FeddemError(f"weights: unknown site(s) {unknown}, missing site(s) {missing}; the sites that trained "
                          f"are {', '.join(names)}")
    return [given[n] for n in names]


def check_manual(cfg) -> None:
    """Weights given by hand parse, stand alone (no other strategy) and, in a secure run, lie in the sites' range."""
    if not cfg.weights:
        raise FeddemError("--weighting manual needs --weights SITE=W,...")
    given = parse_weights(cfg.weights)
    if cfg.aggregation == "secure":
        check_range(given, cfg.weight_min, cfg.weight_max, "the sites would refuse them in secure aggregation")
    if cfg.weighting not in ("uniform", "manual"):
        raise FeddemError(f"--weights gives the weights by hand; it cannot be combined with --weighting "
                          f"{cfg.weighting}")


STRATEGY = WeightingStrategy("manual", "the weights given with --weights SITE=W,...", manual_weights, params=(WEIGHTS,),
                             check=check_manual)
