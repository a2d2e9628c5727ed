"""Weights given by hand: `--weights site-0=0.5,site-1=0.25,...` (every site that trained, by its name)."""

import math

from feddem.common.errors import FeddemError
from feddem.common.weighting.base import SiteReport, Strategy


def parse_weights(text: str) -> dict[str, float]:
    """'a=0.5,b=0.25' -> {'a': 0.5, 'b': 0.25}, with errors that name the bad part."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise FeddemError(f"weights: '{part}' is not SITE=WEIGHT (e.g. --weights site-0=0.5,site-1=0.5)")
        try:
            w = float(value)
        except ValueError:
            raise FeddemError(f"weights: '{value}' (for {name.strip()}) is not a number") from None
        if not math.isfinite(w):
            raise FeddemError(f"weights: the weight of {name.strip()} is not finite ({value})")
        if name.strip() in weights:
            raise FeddemError(f"weights: {name.strip()} is given twice")
        weights[name.strip()] = w
    if not weights:
        raise FeddemError("weights: none given (expected SITE=WEIGHT,...)")
    return weights


def manual_weights(sites: list[SiteReport], cfg, state=None) -> list[float]:
    given = parse_weights(cfg.weights)
    names = [s.site for s in sites]
    unknown = sorted(set(given) - set(names))
    missing = [n for n in names if n not in given]
    if unknown or missing:
        raise FeddemError(f"weights: unknown site(s) {unknown}, missing site(s) {missing}; the sites that trained "
                          f"are {', '.join(names)}")
    return [given[n] for n in names]


STRATEGY = Strategy("manual", "the weights given with --weights SITE=W,...", manual_weights)
