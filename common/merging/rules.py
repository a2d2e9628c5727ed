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
  inputs. Tensors that are not linear-layer weights (embeddings, norms, biases) take the Fisher rule above (their
  own diagonal Fisher, computed by the site for them alone; `rest="weighted"`: the weighted sum). With equal
  Gram matrices (and equal Fisher) it is exactly the weighted sum. Reveals: the sums of the Gram matrices (second
  moments of the sites' activations, summed) and of D_i G_i, and for the other tensors the two Fisher sums.
  alpha = 0.999 (`ALPHA`): on the embedded default (4 sites x 100 steps, `bench/merge_rules.py`), the mean test
  loss of the uniform merge is 2.04 at alpha 0, 1.64 at 0.5, 1.45 at 0.9, 1.34 at 0.999 and 1.98 at 1 (the
  unregularised solve overfits the few examples' Grams); the Fisher rule for the other tensors takes it to 1.26.
The statistics come from `common.merging.statistics` (the site computes them on its own train data).

Every part is linear in the weight (`site_parts(d, stats, w) = w * site_parts(d, stats, 1)`), so a site can form
its parts at weight 1 and the secure sum's usual `w_i *` does the rest (`common.merging.parts`).

Quantization (secure runs clip every element of w_i * part to [-clip, clip], clip 1 by default, weights <= 1):
each rule bounds its parts and declares a per-part factor (`part_scale`) that the site multiplies the part by
before the sum and the server divides it out after, so that a part fits the clip wherever the vector itself does:
- `fisher`: the site's normalised Fisher is capped at `FISHER_CAP` (1e4 x the mean: a parameter far above the
  rest gets the cap, still dominating; on the embedded model the largest is ~9e3, so the cap changes nothing there)
  before the floor, and both parts are scaled by 1 / (cap + floor), so the denominator part is at most w_i and the
  numerator part at most w_i |d_i|;
- `regmean`: a site's regularised Gram matrix of a layer whose largest diagonal entry exceeds `GRAM_CAP` is scaled
  down to that diagonal (|G_jk| <= max diagonal, so every entry is then within the cap); this changes that site's
  relative weight in that layer only (RegMean is invariant to one common scale of all Grams, not to one site's),
  and never happens for inputs of normalised layers of ordinary size. Both Gram parts are scaled by 1 / GRAM_CAP:
  the Gram part is then at most w_i, the D_i G_i part at most w_i sum_k |D_jk| |G_kl| / GRAM_CAP, which is not
  bounded a priori by |d_i|: an element beyond the clip is clipped, counted and reported (`clipped_elements`) as
  for any vector (on the embedded model the largest is ~0.007 of the clip).
Scaled-down parts need a finer ring to keep their precision: a secure sum of a rule's parts uses the 64-bit ring
(`common.merging.parts.ring_finer`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from feddem.common.errors import FeddemError

Vector = Mapping[str, torch.Tensor]
FLOOR = 0.01  # fisher: added to each site's mean-1 Fisher, so no parameter has zero weight at every site
FISHER_CAP = 1e4  # fisher: the largest normalised Fisher value a site uses (before the floor)
GRAM_CAP = 16.0  # regmean: the largest diagonal entry of a site's Gram matrix as it is summed; parts scaled by 1/cap
ALPHA = 0.999  # regmean: off-diagonal scale of the Gram matrices (RegMean's alpha; 1 = none, 0 = diagonal only)
REST_RULES = ("fisher", "weighted")  # regmean: the rule of the tensors that are not linear-layer weights
FISHER_KEY = "fisher/"  # regmean: the statistics key of a non-linear tensor's Fisher (its Gram: the name alone)
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
    statistics = None  # what the site computes for it: None, "fisher" or "gram"

    def parameters(self) -> dict:
        return {}

    def reveals(self) -> str:
        """What the server learns of the sites' vectors under the rule (the report's `merge.reveals`)."""
        return "sum_i w_i d_i"

    def part_scale(self, part: str) -> float:
        return 1.0

    def part_shape(self, part: str, base_shape: tuple) -> tuple:
        return tuple(base_shape)

    def parts_of(self, name: str, shape: tuple, stats_shapes: Mapping[str, tuple]) -> tuple[str, ...]:
        """The parts a tensor of the vector goes to (`shape`: its shape; `stats_shapes`: the statistics' shapes by
        key): the one decision `site_parts` and the upload's layout (`common.merging.parts.layout`) share."""
        return (WEIGHTED,)

    def compute_statistics(self, model, data, names: list[str], examples: int, device) -> dict[str, torch.Tensor]:
        """The site's statistics for the rule, of its fine-tuned dense `model` on its train `data` (nothing here)."""
        return {}

    def site_parts(self, vector: Vector, stats: Mapping[str, torch.Tensor] | None, weight: float) -> dict[str, Vector]:
        return {WEIGHTED: _scaled(vector, weight)}

    def combine(self, sums: Mapping[str, Vector], scale: float) -> dict[str, torch.Tensor]:
        return dict(sums[WEIGHTED])


class FisherMerge:
    """Fisher-weighted averaging from two sums; `stats` maps each tensor's name to the site's diagonal Fisher."""

    name = "fisher"
    parts_names = (NUMERATOR, DENOMINATOR)
    statistics = "fisher"

    def __init__(self, floor: float = FLOOR, cap: float = FISHER_CAP) -> None:
        if not (floor > 0 and floor < float("inf")):
            raise FeddemError(f"fisher: the floor must be a positive number, got {floor}")
        if not (cap >= 1 and cap < float("inf")):
            raise FeddemError(f"fisher: the cap must be a finite number of at least 1, got {cap}")
        self.floor, self.cap = floor, cap

    def parameters(self) -> dict:
        return {"floor": self.floor, "cap": self.cap}

    def reveals(self) -> str:
        return "sum_i w_i F_i d_i and sum_i w_i F_i (F_i: the site's normalised diagonal Fisher)"

    def part_scale(self, part: str) -> float:
        """Both parts are divided by the largest value a site's Fisher can take (cap + floor) before the sum."""
        return 1.0 / (self.cap + self.floor)

    def part_shape(self, part: str, base_shape: tuple) -> tuple:
        return tuple(base_shape)

    def parts_of(self, name: str, shape: tuple, stats_shapes: Mapping[str, tuple]) -> tuple[str, ...]:
        return (NUMERATOR, DENOMINATOR)

    def compute_statistics(self, model, data, names: list[str], examples: int, device) -> dict[str, torch.Tensor]:
        from feddem.common.merging.statistics import diagonal_fisher

        return diagonal_fisher(model, data, names, examples, device)

    def normalised(self, fisher: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The site's Fisher scaled to mean 1 over all its entries, capped at `cap`, plus the floor (a zero Fisher:
        the floor alone)."""
        total = sum(float(f.double().sum()) for f in fisher.values())
        count = sum(f.numel() for f in fisher.values())
        mean = total / count if count else 0.0
        scale = 1.0 / mean if mean > 0 else 0.0
        return {name: (f.to(torch.float32) * scale).clamp_max(self.cap) + self.floor for name, f in fisher.items()}

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


def _is_gram(shape: tuple, gram_shape: tuple | None) -> bool:
    """Whether `gram_shape` is the [in, in] Gram matrix of a [out, in] weight of `shape`."""
    return len(shape) == 2 and gram_shape is not None and tuple(gram_shape) == (shape[1], shape[1])


class RegMeanMerge:
    """RegMean for the tensors that have a Gram matrix in `stats` under their own name (linear layers' weights,
    [out, in] with a Gram of [in, in]); every other tensor of the vector takes the Fisher rule where `stats` has its
    Fisher under `FISHER_KEY + name`, else the weighted sum."""

    name = "regmean"
    statistics = "gram"

    def __init__(self, alpha: float = ALPHA, cap: float = GRAM_CAP, rest: str = "fisher") -> None:
        if not 0.0 <= alpha <= 1.0:
            raise FeddemError(f"regmean: alpha must be in [0, 1], got {alpha}")
        if not (cap > 0 and cap < float("inf")):
            raise FeddemError(f"regmean: the Gram cap must be a positive finite number, got {cap}")
        if rest not in REST_RULES:
            raise FeddemError(f"regmean: rest must be one of {', '.join(REST_RULES)}, got {rest!r}")
        self.alpha, self.cap, self.rest = alpha, cap, rest
        self.fisher = FisherMerge()
        self.parts_names = (GRAM, GRAM_TIMES_DELTA, WEIGHTED) + ((NUMERATOR, DENOMINATOR) if rest == "fisher" else ())

    def parameters(self) -> dict:
        return {"alpha": self.alpha, "cap": self.cap, "rest": self.rest}

    def reveals(self) -> str:
        rest = ("sum_i w_i F_i d_i and sum_i w_i F_i of the other tensors (F_i: the site's normalised diagonal "
                "Fisher of them)" if self.rest == "fisher" else "sum_i w_i d_i of the other tensors")
        return f"per linear layer sum_i w_i G_i and sum_i w_i d_i G_i (G_i: the site's input Gram matrix), and {rest}"

    def part_scale(self, part: str) -> float:
        """The Gram parts are divided by the cap on a Gram's diagonal before the sum, the Fisher parts as the Fisher
        rule's; the weighted part is not."""
        if part in (NUMERATOR, DENOMINATOR):
            return self.fisher.part_scale(part)
        return 1.0 / self.cap if part in (GRAM, GRAM_TIMES_DELTA) else 1.0

    def part_shape(self, part: str, base_shape: tuple) -> tuple:
        """A Gram part of a [out, in] weight is [in, in]; the other parts have the weight's shape."""
        if part == GRAM:
            if len(base_shape) != 2:
                raise FeddemError(f"regmean: a Gram part for a tensor of shape {tuple(base_shape)} (not a matrix)")
            return (base_shape[1], base_shape[1])
        return tuple(base_shape)

    def parts_of(self, name: str, shape: tuple, stats_shapes: Mapping[str, tuple]) -> tuple[str, ...]:
        if _is_gram(tuple(shape), stats_shapes.get(name)):
            return (GRAM, GRAM_TIMES_DELTA)
        if self.rest == "fisher" and tuple(stats_shapes.get(FISHER_KEY + name, ())) == tuple(shape):
            return (NUMERATOR, DENOMINATOR)
        return (WEIGHTED,)

    def compute_statistics(self, model, data, names: list[str], examples: int, device) -> dict[str, torch.Tensor]:
        """The input Grams of the named linear layers, and (rest="fisher") the diagonal Fisher of the other named
        tensors under `FISHER_KEY + name` (no backward pass when every named tensor is a linear weight: LoRA)."""
        from feddem.common.merging.statistics import diagonal_fisher, input_grams

        stats = input_grams(model, data, names, examples, device=device)
        rest = [n for n in names if n not in stats]
        if self.rest == "fisher" and rest:
            stats |= {FISHER_KEY + n: f for n, f in diagonal_fisher(model, data, rest, examples, device).items()}
        return stats

    def regularised(self, gram: torch.Tensor) -> torch.Tensor:
        """RegMean's regularisation (the off-diagonal entries scaled by alpha), scaled down to the cap when its
        largest diagonal entry exceeds it."""
        gram = gram.to(torch.float32)
        diagonal = torch.diag(torch.diagonal(gram))
        regular = diagonal + self.alpha * (gram - diagonal)
        largest = float(torch.diagonal(gram).max()) if gram.numel() else 0.0
        return regular * (self.cap / largest) if largest > self.cap else regular

    def site_parts(self, vector: Vector, stats: Mapping[str, torch.Tensor] | None, weight: float) -> dict[str, Vector]:
        stats = stats or {}
        shapes = {key: tuple(t.shape) for key, t in stats.items()}
        parts: dict[str, dict] = {part: {} for part in self.parts_names}
        rest = {}
        for name, delta in vector.items():
            kind = self.parts_of(name, tuple(delta.shape), shapes)
            if kind == (GRAM, GRAM_TIMES_DELTA):
                g = self.regularised(stats[name]) * weight
                parts[GRAM][name] = g
                parts[GRAM_TIMES_DELTA][name] = delta.to(torch.float32) @ g
            elif kind == (NUMERATOR, DENOMINATOR):
                rest[name] = delta
            else:
                parts[WEIGHTED][name] = delta.to(torch.float32) * weight
        if rest:  # the Fisher rule over the other tensors, normalised over them alone
            parts |= self.fisher.site_parts(rest, {n: stats[FISHER_KEY + n] for n in rest}, weight)
        return parts

    def combine(self, sums: Mapping[str, Vector], scale: float) -> dict[str, torch.Tensor]:
        merged = dict(sums[WEIGHTED])
        if sums.get(NUMERATOR):
            merged |= self.fisher.combine(sums, scale)
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
