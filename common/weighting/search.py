"""DEM's validation search over the weights: coordinate search with a budget of candidate merges.

Start from uniform weights (1/n each); first try all weights scaled together up and down by `search-step` (the
weight scale: the weights need not sum to one, as the DEM paper searches each weight on its own, and the 1/n of a
plain average shrinks every site's vector), then for each site in turn its own weight scaled up and down, every
weight kept inside [weight-min, weight-max]; keep a candidate when it lowers the score (the mean per-domain
validation loss the sites report for the candidate merge); repeat while a pass improves; stop after
`search-budget` candidates. The candidates are proposed here; the
server scores them (`server.search`), so every candidate is one more aggregation of the same vectors: plain runs,
or secure runs whose sites allow that many (distributed noise and an aggregation budget).
"""

from collections.abc import Callable

from feddem.common.weighting.base import Strategy


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


STRATEGY = Strategy("search", "DEM's validation search: coordinate search over the weight scale and each weight, "
                    "scored by the sites' validation loss of each candidate merge", search=True)
