"""Chameleon (Xie, Tonin, Cevher): domain weights from kernel ridge leverage scores of domain embeddings.

Each site sends one embedding of its domain (the mean middle-layer hidden state of the base model over a sample of
its examples; `client.site.domain_embedding`). The server normalises the embeddings, forms the centred linear kernel
K, the leverage scores S = diag(K (K + lambda k I)^-1) (k domains), normalises them to sum to 1 and weights by
softmax(S / tau): domains unlike the others score high. `chameleon-inverse` uses 1/S instead (the paper's
pre-training variant, which favours the common domains).
"""

import numpy as np

from feddem.common.errors import FeddemError
from feddem.common.weighting.base import EMBEDDING, Parameter, SiteReport, WeightingStrategy, normalised, softmax

LAMBDA = Parameter("chameleon-lambda", float, 0.1, "chameleon: ridge of the leverage scores (times the number of domains)",
                   low=0.0, open_low=True)
TAU = Parameter("chameleon-tau", float, 0.1, "chameleon: softmax temperature of the normalised leverage scores", low=0.0,
                open_low=True)
INVERSE = Parameter("chameleon-inverse", bool, False, "chameleon: weight by inverse scores (the pre-training variant)")


def leverage_scores(embeddings: np.ndarray, lam: float) -> np.ndarray:
    """Kernel ridge leverage scores of the rows of `embeddings` under the centred linear kernel."""
    e = np.asarray(embeddings, dtype=np.float64)
    if e.ndim != 2 or e.shape[0] < 2:
        raise FeddemError(f"chameleon needs one embedding per site and at least 2 sites, got shape {e.shape}")
    if not np.isfinite(e).all():
        raise FeddemError("chameleon: a domain embedding has non-finite values")
    norms = np.linalg.norm(e, axis=1, keepdims=True)
    e = e / np.where(norms > 0, norms, 1.0)
    e = e - e.mean(axis=0, keepdims=True)
    k = e @ e.T
    n = k.shape[0]
    return np.diag(k @ np.linalg.inv(k + lam * n * np.eye(n)))


def chameleon_weights(sites: list[SiteReport], cfg, state=None) -> list[float]:
    missing = [s.site for s in sites if EMBEDDING not in s.extra]
    if missing:
        raise FeddemError(f"chameleon: no domain embedding from {', '.join(missing)}")
    scores = np.asarray(normalised(leverage_scores(np.stack([s.extra[EMBEDDING] for s in sites]),
                                                   cfg.chameleon_lambda)))
    if cfg.chameleon_inverse:
        scores = np.asarray(normalised(1.0 / np.maximum(scores, 1e-12)))
    return softmax(scores, cfg.chameleon_tau)


STRATEGY = WeightingStrategy("chameleon", "softmax of kernel ridge leverage scores of the sites' domain embeddings",
                             chameleon_weights, frozenset({EMBEDDING}), params=(LAMBDA, TAU, INVERSE))
