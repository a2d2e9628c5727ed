"""Uniform weights: every site counts 1/n (the merge is the average of the fine-tuned models)."""

from feddem.common.weighting.base import SiteReport, WeightingStrategy


def uniform_weights(sites: list[SiteReport], cfg=None, state=None) -> list[float]:
    return [1.0 / len(sites)] * len(sites)


STRATEGY = WeightingStrategy("uniform", "every site 1/n", uniform_weights)
