"""DGA (dynamic gradient alignment): lean the merge toward the sites whose update helps a target task.

The server computes the target direction (minus the gradient of the loss on a few target examples, at the model the
round starts from) and sends it with the training request; each site returns the cosine of its vector with it
(`client.site.alignment`). The weights follow an exponentiated-gradient step from the previous round's weights
(uniform in round 1), w_i <- w_i exp(eta a_i / max|a|), normalised, smoothed by an exponential moving average over
rounds (`dga-ema`: the share of the previous weights).
"""

import numpy as np

from feddem.common.errors import FeddemError
from feddem.common.weighting.base import ALIGNMENT, SiteReport, Strategy, normalised

STATE_KEY = "dga-weights"  # site name -> weight of the previous round


def eg_update(previous: np.ndarray, alignments: np.ndarray, eta: float, ema: float) -> np.ndarray:
    a = np.asarray(alignments, dtype=np.float64)
    if not np.isfinite(a).all():
        raise FeddemError("dga: a site reported a non-finite alignment")
    scale = np.abs(a).max()
    step = previous * np.exp(eta * (a / scale if scale > 0 else a))
    step /= step.sum()
    return ema * previous + (1.0 - ema) * step


def dga_weights(sites: list[SiteReport], cfg, state: dict) -> list[float]:
    missing = [s.site for s in sites if ALIGNMENT not in s.extra]
    if missing:
        raise FeddemError(f"dga: no alignment from {', '.join(missing)}")
    before = state.get(STATE_KEY, {})
    previous = np.asarray(normalised([before.get(s.site, 1.0 / len(sites)) for s in sites]))
    weights = eg_update(previous, np.array([float(s.extra[ALIGNMENT]) for s in sites]), cfg.dga_eta, cfg.dga_ema)
    state[STATE_KEY] = {s.site: float(w) for s, w in zip(sites, weights)}
    return [float(w) for w in weights]


STRATEGY = Strategy("dga", "exponentiated-gradient weights from each vector's alignment with a target task",
                    dga_weights, frozenset({ALIGNMENT}))
