"""Merge rules computed from sums alone: what each site uploads, and what the server makes of the sums.

A rule has two halves. `site_parts` runs at a site: from its own vector d_i, its own statistics and the weight w_i
the server gave it, it returns named parts, each a vector. Every part is summed over the sites separately (by
secure aggregation in a secure run, so the server learns only the sums), and `combine` runs at the server on those
sums and the weights' total s = sum_i w_i. The plain path (`merge_plain`) adds the parts in the clear and calls the
same `combine`, so secure and plain runs of a rule differ only by the secure sum's quantization.

- `weighted-sum` (DEM): one part, w_i d_i; the merge is its sum.
- `fisher` (Matena and Raffel, 2022, Fisher-weighted averaging): parts w_i F_i * d_i and w_i F_i, with F_i the
  site's diagonal Fisher estimate scaled to mean 1 over the vector plus a floor (`FLOOR`); the merge is
  s * sum(w_i F_i d_i) / sum(w_i F_i). Where one site's Fisher dominates, its values win; with equal Fisher it
  is exactly the weighted sum. Reveals to the server: the two sums (the weighted Fisher total per parameter).
- `regmean` (Jin et al., 2023) for linear layers: parts w_i G_i (the input Gram matrix of each linear layer, with
  its off-diagonal entries scaled by RegMean's alpha) and w_i D_i G_i; the merge per layer is
  s * (sum w_i D_i G_i) (sum w_i G_i)^-1, the least-squares layer that reproduces every site's outputs on its own
  inputs. Tensors that are not linear-layer weights (embeddings, norms, biases) take the weighted sum. With equal
  Gram matrices it is exactly the weighted sum. Reveals: the sums of the Gram matrices (second moments of the
  sites' activations, summed) and of D_i G_i.

The statistics come from `common.merging.statistics` (the site computes them on its own train data).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from feddem.common.errors import FeddemError

Vector = Mapping[str, torch.Tensor]
FLOOR = 0.01  # fisher: added to each site's mean-1 Fisher, so no parameter has zero weight at every site
ALPHA = 0.9  # regmean: off-diagonal scale of the Gram matrices (RegMean's alpha; 1 = none, 0 = diagonal only)
GRAM, GRAM_TIMES_DELTA, WEIGHTED, NUMERATOR, DENOMINATOR = "gram", "gram-delta", "weighted", "fisher-num", "fisher-den"


def _scaled(vector: Vector, weight: float) -> dict[str, torch.Tensor]:
    return {name: t.to(torch.float32) * weight for name, t in vector.items()}


def _check_names(vector: Vector, stats: Mapping[str, torch.Tensor], what: str) -> None:
    missing = sorted(set(vector) - set(stats))
    if missing:
        raise FeddemError(f"{what}: no statistics for {len(missing)} tensor(s) of the vector, e.g. '{missing[0]}'")


class WeightedSum:
    """DEM's rule: theta = theta_base + sum_i w_i d_i."""

    name = "weighted-sum"
    parts_names = (WEIGHTED,)

    def site_parts(self, vector: Vector, stats: Mapping[str, torch.Tensor] | None, weight: float) -> dict[str, Vector]:
        return {WEIGHTED: _scaled(vector, weight)}

    def combine(self, sums: Mapping[str, Vector], scale: float) -> dict[str, torch.Tensor]:
        return dict(sums[WEIGHTED])


class FisherMerge:
    """Fisher-weighted averaging from two sums; `stats` maps each tensor's name to the site's diagonal Fisher."""

    name = "fisher"
    parts_names = (NUMERATOR, DENOMINATOR)

    def __init__(self, floor: float = FLOOR) -> None:
        if not (floor > 0 and floor < float("inf")):
            raise FeddemError(f"fisher: the floor must be a positive number, got {floor}")
        self.floor = floor

    def normalised(self, fisher: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The site's Fisher scaled to mean 1 over all its entries, plus the floor (a zero Fisher: the floor alone)."""
        total = sum(float(f.double().sum()) for f in fisher.values())
        count = sum(f.numel() for f in fisher.values())
        mean = total / count if count else 0.0
        scale = 1.0 / mean if mean > 0 else 0.0
        return {name: f.to(torch.float32) * scale + self.floor for name, f in fisher.items()}

    def site_parts(self, vector: Vector, stats: Mapping[str, torch.Tensor] | None, weight: float) -> dict[str, Vector]:
        _check_names(vector, stats or {}, "fisher")
        fisher = self.normalised({name: stats[name] for name in vector})
        return {NUMERATOR: {n: fisher[n] * vector[n].to(torch.float32) * weight for n in vector},
                DENOMINATOR: {n: fisher[n] * weight for n in vector}}

    def combine(self, sums: Mapping[str, Vector], scale: float) -> dict[str, torch.Tensor]:
        num, den = sums[NUMERATOR], sums[DENOMINATOR]
        # den > 0 wherever a site with a positive weight took part (floor > 0); elsewhere nothing was learned
        return {n: torch.where(den[n] > 0, num[n] / den[n].clamp_min(1e-30), torch.zeros_like(num[n])) * scale
                for n in num}


class RegMeanMerge:
    """RegMean for the tensors that have a Gram matrix in `stats` (linear layers' weights, [out, in] with a Gram of
    [in, in]); every other tensor of the vector takes the weighted sum."""

    name = "regmean"
    parts_names = (GRAM, GRAM_TIMES_DELTA, WEIGHTED)

    def __init__(self, alpha: float = ALPHA) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise FeddemError(f"regmean: alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha

    def regularised(self, gram: torch.Tensor) -> torch.Tensor:
        """RegMean's regularisation: the off-diagonal entries scaled by alpha."""
        diagonal = torch.diag(torch.diagonal(gram))
        return diagonal + self.alpha * (gram.to(torch.float32) - diagonal)

    def site_parts(self, vector: Vector, stats: Mapping[str, torch.Tensor] | None, weight: float) -> dict[str, Vector]:
        stats = stats or {}
        grams, products, rest = {}, {}, {}
        for name, delta in vector.items():
            gram = stats.get(name)
            if gram is None or delta.dim() != 2 or tuple(gram.shape) != (delta.shape[1], delta.shape[1]):
                rest[name] = delta.to(torch.float32) * weight
                continue
            g = self.regularised(gram) * weight
            grams[name] = g
            products[name] = delta.to(torch.float32) @ g
        return {GRAM: grams, GRAM_TIMES_DELTA: products, WEIGHTED: rest}

    def combine(self, sums: Mapping[str, Vector], scale: float) -> dict[str, torch.Tensor]:
        merged = dict(sums[WEIGHTED])
        for name, product in sums[GRAM_TIMES_DELTA].items():
            gram = sums[GRAM][name].to(torch.float64)
            # a ridge of 1e-6 of the mean diagonal keeps input directions no site saw (zero rows) solvable: they get 0
            ridge = 1e-6 * float(torch.diagonal(gram).mean().clamp_min(1e-12))
            gram = gram + ridge * torch.eye(gram.shape[0], dtype=torch.float64)
            solved = torch.linalg.solve(gram, product.to(torch.float64).T).T  # (sum D_i G_i) (sum G_i)^-1
            merged[name] = (solved * scale).to(torch.float32)
        return merged


RULES = {"weighted-sum": WeightedSum, "fisher": FisherMerge, "regmean": RegMeanMerge}


def rule(name: str, **parameters):
    """The merge rule called `name`, with its parameters (a FeddemError naming the rules for anything else)."""
    if name not in RULES:
        raise FeddemError(f"merge: '{name}' is not one of {', '.join(RULES)}")
    return RULES[name](**parameters)


def add_parts(total: dict[str, dict[str, torch.Tensor]], parts: Mapping[str, Vector]) -> None:
    """total += parts, part by part and tensor by tensor (what a secure sum computes, in the clear)."""
    for part, vector in parts.items():
        into = total.setdefault(part, {})
        for name, t in vector.items():
            into[name] = into[name] + t if name in into else t.clone()


def merge_plain(merge_rule, vectors: list[Vector], stats: list[Mapping[str, torch.Tensor] | None],
                weights: list[float]) -> dict[str, torch.Tensor]:
    """The rule's merge with every part summed in the clear (a trusted run, the benchmarks, the tests)."""
    if not (len(vectors) == len(stats) == len(weights)):
        raise FeddemError(f"{len(vectors)} vectors, {len(stats)} statistics and {len(weights)} weights")
    sums: dict[str, dict[str, torch.Tensor]] = {name: {} for name in merge_rule.parts_names}
    for vector, site_stats, weight in zip(vectors, stats, weights):
        add_parts(sums, merge_rule.site_parts(vector, site_stats, weight))
    return merge_rule.combine(sums, float(sum(weights)))
