"""Uniform weights: every site counts 1/n (the merge is the average of the fine-tuned models)."""

from common.weighting.base import SiteReport


def uniform_weights(sites: list[SiteReport]) -> list[float]:
    return [1.0 / len(sites)] * len(sites)
