"""DEM's validation search, run by the server: each candidate weighting is one merge of the sites' vectors, scored
by the mean of the sites' validation losses of that merge (`common.weighting.search` proposes the candidates).

How a candidate merge is formed is the caller's (`aggregate_for`): in a plain (trusted) run the server sums the
vectors it holds; in a secure run every candidate is one more secure aggregation, which the sites' guards allow only
up to their aggregation budget (with distributed noise). When a candidate cannot be formed (a guard refuses, a
round fails), the search stops there and keeps the best merge so far, and says why.
"""

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from feddem.common.config import RunConfig
from feddem.common.errors import FeddemError
from feddem.common.vectors import Vector
from feddem.common.weighting.search import coordinate_search

log = logging.getLogger("feddem.server")


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
