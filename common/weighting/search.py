"""DEM's validation search over the weights: coordinate search with a budget of candidate merges.

Start from uniform weights (1/n each); first try all weights scaled together up and down by `search-step` (the
weight scale: the weights need not sum to one, as the DEM paper searches each weight on its own, and the 1/n of a
plain average shrinks every site's vector), then for each site in turn its own weight scaled up and down, every
weight kept inside [weight-min, weight-max]; keep a candidate when it lowers the score (the mean per-domain
validation loss the sites report for the candidate merge); repeat while a pass improves; stop after
`search-budget` candidates (`coordinate_search`).

The server scores each candidate (`search_merge`): one merge of the sites' vectors, scored by the mean of the sites'
validation losses of that merge. How a candidate merge is formed is the caller's (`aggregate_for`): in a plain
(trusted) run the server sums the vectors it holds; in a secure run every candidate is one more secure
aggregation, which the sites' guards allow only up to their aggregation budget (with distributed noise). When a
candidate cannot be formed (a guard refuses, a round fails), the search stops there and keeps the best merge so
far, and says why.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from feddem.common.errors import FeddemError
from feddem.common.weighting.base import Parameter, WeightingStrategy

if TYPE_CHECKING:
    from feddem.common.config import RunConfig
    from feddem.common.vectors import Vector

log = logging.getLogger("feddem.server")

BUDGET = Parameter("search-budget", int, 8, "search: candidate merges to score (each is one more aggregation)", low=1)
STEP = Parameter("search-step", float, 0.5, "search: relative change of one weight (or of all together: the scale) per "
                 "candidate", low=0.0, open_low=True)


def coordinate_search(n: int, score: Callable[[list[float]], float], budget: int, step: float,
                      low: float, high: float, scale: bool = True
                      ) -> tuple[list[float], float, list[tuple[list[float], float]]]:
    """Minimise `score` over weight vectors; returns (best weights, best score, every (candidate, score)).
    The coordinates are the scale of all weights together (`scale`), then each weight on its own."""
    def clamp(w: float) -> float:
        return min(max(w, low), high)

    best = [clamp(1.0 / n)] * n
    best_score = score(best)
    history = [(list(best), best_score)]
    improved = True
    coordinates = ([None] if scale and n > 1 else []) + list(range(n))  # None: every weight at once
    while improved and len(history) < budget:
        improved = False
        for i in coordinates:
            for factor in (1.0 + step, 1.0 - step):
                if len(history) >= budget:
                    return best, best_score, history
                if i is None:
                    candidate = [clamp(w * factor) for w in best]
                else:
                    candidate = list(best)
                    candidate[i] = clamp(best[i] * factor)
                if candidate == best or any(candidate == c for c, _ in history):
                    continue
                value = score(candidate)
                history.append((candidate, value))
                if value < best_score:
                    best, best_score, improved = candidate, value, True
                    break
    return best, best_score, history


@dataclass
class SearchResult:
    weights: dict[int, float]
    aggregate: Vector
    score: float
    history: list[dict] = field(default_factory=list)  # every candidate: weights by site and its score
    stopped: str = ""  # why the search ended early, if it did


def search_merge(cfg: RunConfig, nodes: list[int], names: dict[int, str],
                 aggregate_for: Callable[[dict[int, float]], Vector],
                 validation_loss: Callable[[Vector], dict[int, float]]) -> SearchResult:
    """Coordinate search over the weights of `nodes` and their scale (their sum need not be 1); returns the best
    candidate and its merge."""
    best: dict = {"score": math.inf}
    stopped: list[str] = []

    def score(candidate: list[float]) -> float:
        if stopped:
            return math.inf
        weights = dict(zip(nodes, candidate))
        try:
            aggregate = aggregate_for(weights)
            losses = validation_loss(aggregate)
        except FeddemError as exc:
            stopped.append(str(exc))
            log.warning("search stopped: %s", exc)
            return math.inf
        value = sum(losses.values()) / len(losses)
        log.info("search candidate %s: mean validation loss %.4f",
                 {names[n]: round(w, 4) for n, w in weights.items()}, value)
        if value < best["score"]:
            best.update(score=value, weights=weights, aggregate=aggregate)
        return value

    _, _, history = coordinate_search(len(nodes), score, cfg.search_budget, cfg.search_step, cfg.weight_min,
                                      cfg.weight_max)
    if "aggregate" not in best:
        raise FeddemError(f"search: no candidate merge could be scored ({stopped[0] if stopped else 'no candidate'})")
    log.info("search: best of %d candidate(s), mean validation loss %.4f, weight scale (sum of weights) %.4f",
             len(history), best["score"], sum(best["weights"].values()))
    return SearchResult(best["weights"], best["aggregate"], best["score"],
                        [{"weights": {names[n]: w for n, w in zip(nodes, c)}, "validation_loss": s}
                         for c, s in history if math.isfinite(s)],
                        stopped[0] if stopped else "")


def check_search(cfg) -> None:
    """In a secure run every candidate is one more aggregation: the sites' guards must allow them all."""
    if cfg.aggregation != "secure":
        return
    if cfg.aggregation_budget < 2:
        raise FeddemError("--weighting search scores several merges of the same vectors: with secure "
                          "aggregation the sites' guards allow that only with --noise > 0 and "
                          "--aggregation-budget > 1 (or use --aggregation plain, a trusted run)")
    if cfg.search_budget > cfg.aggregation_budget:
        raise FeddemError(f"search-budget {cfg.search_budget} is more than aggregation-budget "
                          f"{cfg.aggregation_budget}: every candidate is one secure aggregation")


STRATEGY = WeightingStrategy("search", "DEM's validation search: coordinate search over the weight scale and each "
                             "weight, scored by the sites' validation loss of each candidate merge", search=True,
                             params=(BUDGET, STEP), check=check_search,
                             aggregations_per_merge=lambda cfg: cfg.search_budget)
