"""DEM's validation search over the weights: coordinate search with a budget of candidate merges.

Start from uniform weights; for each site in turn, try its weight scaled up and down by `search-step` (kept inside
[weight-min, weight-max]) and keep a candidate when it lowers the score (the mean per-domain validation loss the
sites report for the candidate merge); stop after `search-budget` candidates. The candidates are proposed here; the
server scores them (`server.search`), so every candidate is one more aggregation of the same vectors: plain runs,
or secure runs whose sites allow that many (distributed noise and an aggregation budget).
"""

from collections.abc import Callable

from feddem.common.weighting.base import Strategy


def coordinate_search(n: int, score: Callable[[list[float]], float], budget: int, step: float,
                      low: float, high: float) -> tuple[list[float], float, list[tuple[list[float], float]]]:
    """Minimise `score` over weight vectors; returns (best weights, best score, every (candidate, score))."""
    best = [min(max(1.0 / n, low), high)] * n
    best_score = score(best)
    history = [(list(best), best_score)]
    improved = True
    while improved and len(history) < budget:
        improved = False
        for i in range(n):
            for factor in (1.0 + step, 1.0 - step):
                if len(history) >= budget:
                    return best, best_score, history
                candidate = list(best)
                candidate[i] = min(max(best[i] * factor, low), high)
                if candidate[i] == best[i] or any(candidate == c for c, _ in history):
                    continue
                value = score(candidate)
                history.append((candidate, value))
                if value < best_score:
                    best, best_score, improved = candidate, value, True
                    break
    return best, best_score, history


STRATEGY = Strategy("search", "DEM's validation search: coordinate search over the weights, scored by the sites' "
                    "validation loss of each candidate merge", search=True)
