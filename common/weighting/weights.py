"""Weights given by name, one home for their syntax and their range: `SITE=W,...` as `--weights` (`feddem simulate`,
the run config) and `feddem-admin models remerge --weights` take it, and the [weight-min, weight-max] check that the
run config, the server (manual weights, secure aggregation), the admin server's re-merge and each site's privacy
guard apply.

The parser is strict: every part is SITE=NUMBER, a site is named once, and a weight is a finite number (no `inf`,
no `nan`). A weight is in range when it is finite and weight-min <= w <= weight-max.
"""

import math
from collections.abc import Mapping
from typing import TypeVar

from feddem.common.errors import FeddemError

OPTION = "--weights"
EXAMPLE = "--weights site-0=0.5,site-1=0.5"
K = TypeVar("K")


def parse_weights(text: str) -> dict[str, float]:
    """'a=0.5,b=0.25' -> {'a': 0.5, 'b': 0.25}; a FeddemError naming the bad part for anything else (a part that is
    not SITE=WEIGHT, a weight that is not a number or not finite, a site given twice, nothing given)."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise FeddemError(f"{OPTION}: '{part}' is not SITE=WEIGHT (e.g. {EXAMPLE})")
        try:
            w = float(value)
        except ValueError:
            raise FeddemError(f"{OPTION}: '{value.strip()}' (for {name}) is not a number") from None
        if not math.isfinite(w):
            raise FeddemError(f"{OPTION}: the weight of {name} is not finite ({value.strip()})")
        if name in weights:
            raise FeddemError(f"{OPTION}: {name} is given twice")
        weights[name] = w
    if not weights:
        raise FeddemError(f"{OPTION}: none given (expected SITE=WEIGHT,..., e.g. {EXAMPLE})")
    return weights


def in_range(weight: float, low: float, high: float) -> bool:
    """A weight the sites accept: finite and within [low, high] (false for nan and for an infinite weight)."""
    return math.isfinite(weight) and low <= weight <= high


def outside_range(weights: Mapping[K, float], low: float, high: float) -> dict[K, float]:
    """The weights not `in_range`, by their key."""
    return {key: w for key, w in weights.items() if not in_range(w, low, high)}


def range_text(low: float, high: float) -> str:
    return f"[weight-min, weight-max] = [{low}, {high}]"


def check_range(weights: Mapping, low: float, high: float, consequence: str = "", error=FeddemError) -> None:
    """Raise `error` (a FeddemError by default) naming every weight outside [low, high]; `consequence` says what
    would happen to them (e.g. that the sites' guards would refuse them)."""
    outside = outside_range(weights, low, high)
    if outside:
        raise error(f"weights {outside} are outside {range_text(low, high)}{': ' + consequence if consequence else ''}")


def clamp(weights: Mapping[K, float], low: float, high: float) -> dict[K, float]:
    """Every weight moved into [low, high] (a strategy's weights are clamped; weights given by hand are refused)."""
    return {key: min(max(w, low), high) for key, w in weights.items()}
