"""Aggregation behind one interface: an `Aggregator` forms the merge of one round's vectors for given weights and
returns an `AggregationOutcome` (the sum, who is in it, the weights used, the report's section on it).

Three kinds, chosen once per round by `configure_aggregator` (Flower's strategy shape: configure, then aggregate):
- `SecureAggregator` (default): one secure aggregation per call (`server.secure_aggregation`), within the sites'
  budget; the server gets only the sum, and a dropped site's weight is absent from it (not renormalised);
- `PlainAggregator` (`aggregation = plain`): each site sends `w_i * d_i` in the clear, streamed into the sum one
  reply at a time and renormalised over the uploads that arrived;
- `HeldAggregator`: a trusted run (plain, and the server needs the vectors for a search, the pool or ablations)
  fetches each site's d_i once (`HeldAggregator.fetch`) and forms any weighted sum from them.

The run's merge rule (`merge`, `common.merging`) decides what a site uploads: its vector (weighted-sum) or the
rule's parts as one vector (`common.merging.parts`); every aggregator sums the uploads and `combine_upload`s the
sum with the sum of the weights in it, so secure, plain and held runs of a rule agree up to the secure sum's
quantization. A held run keeps each site's parts at weight 1 (every part is linear in the weight, so any weighted
sum of them is a candidate's sum) and recovers each site's vector from its own parts (`combine` at weight 1) for
the cross-domain matrix and the pool.
"""

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

from flwr.serverapp import Grid

from feddem.common import messages as M
from feddem.common.config import RunConfig
from feddem.common.errors import FeddemError
from feddem.common.merging.parts import combine_upload, plain_rule, ring_finer, rule_of, upload_shapes
from feddem.common.vector_records import vector_from_record
from feddem.common.vectors import Vector, add_into, check_vector, weighted_sum
from feddem.common.weighting import strategy
from feddem.server.secure_aggregation import SecureSum, secure_sum

log = logging.getLogger("feddem.server")


@dataclass
class AggregationOutcome:
    """One aggregation: the sum, the nodes whose vectors are in it, the weights used by site name, and the
    report's `secure_aggregation` section (None for a plain sum)."""

    aggregate: Vector
    contributors: list[int]
    weights: dict[str, float]
    details: dict | None = None


class Aggregator(ABC):
    """Forms sum_i w_i d_i of one round's sites. `sites` maps node -> the site's training record (its `site` name
    and `domain`); `vectors` holds the sites' d_i when the server has them (a trusted run), else None."""

    vectors: dict[int, Vector] | None = None

    def __init__(self, stage, sites: dict):
        self.stage, self.sites = stage, sites
        self.names = {n: sites[n]["site"] for n in sites}
        self.aggregations = 0

    def aggregate(self, weights: dict[int, float]) -> AggregationOutcome:
        """The weighted sum over the nodes in `weights`."""
        self.aggregations += 1
        return self._aggregate(weights)

    @abstractmethod
    def _aggregate(self, weights: dict[int, float]) -> AggregationOutcome: ...

    def by_name(self, weights: dict[str, float]) -> dict[int, float]:
        """Weights by site name -> by node."""
        node = {name: n for n, name in self.names.items()}
        return {node[name]: w for name, w in weights.items()}


def fetch_uploads(stage, sites: dict, weights: dict[int, float], base_params: dict):
    """Ask each site for `w_i * d_i` in the clear (plain aggregation); yields (node, checked vector) as they come,
    one reply at a time (the vector is read lazily from its message)."""
    merge_rule = rule_of(stage.cfg)
    for node, content in stage.stream("upload", M.UPLOAD, {n: M.UploadRequest(w).to_record()
                                                           for n, w in weights.items()}):
        vector = vector_from_record(M.UploadReply.from_record(content).vector)
        source = f"upload of {sites[node]['site']}"
        reference = base_params if plain_rule(merge_rule) else _upload_shapes(merge_rule, list(vector), base_params,
                                                                               source)
        check_vector(vector, reference, source, stage.cfg.torch_vector_dtype)
        yield node, vector


def _upload_shapes(merge_rule, layout: list[str], base_params: dict, source: str) -> dict:
    try:
        return upload_shapes(merge_rule, layout, base_params)
    except FeddemError as exc:
        raise FeddemError(f"{source}: {exc}") from None


def plain_aggregate(stage, sites: dict, weights: dict[int, float], base_params: dict):
    """Plain aggregation (`--aggregation plain`): each site sends `w_i * d_i` (or its merge rule's parts, weighted)
    in the clear; the server sums them, renormalises over the uploads that arrived (every part is linear in the
    weight) and combines the sums. Returns (aggregate, contributing nodes, weights used by site)."""
    aggregate: Vector = {}
    arrived = []
    for node, vector in fetch_uploads(stage, sites, weights, base_params):
        add_into(aggregate, vector)
        arrived.append(node)
    used = {sites[n]["site"]: weights[n] for n in arrived}
    if len(arrived) < len(weights):  # renormalise what arrived so the weights keep their sum
        scale = sum(weights.values()) / sum(used.values())
        for t in aggregate.values():
            t.mul_(scale)
        used = {k: w * scale for k, w in used.items()}
        log.warning("%d upload(s) missing: weights renormalised over the others", len(weights) - len(arrived))
    return combine_upload(rule_of(stage.cfg), aggregate, sum(used.values())), arrived, used


class PlainAggregator(Aggregator):
    """`w_i * d_i` uploaded in the clear and streamed into the sum (`plain_aggregate`)."""

    def __init__(self, stage, sites: dict, base_params: dict):
        super().__init__(stage, sites)
        self.base_params = base_params

    def _aggregate(self, weights: dict[int, float]) -> AggregationOutcome:
        return AggregationOutcome(*plain_aggregate(self.stage, self.sites, weights, self.base_params))


class HeldAggregator(Aggregator):
    """A trusted run's sums, formed from each site's d_i held by the server."""

    def __init__(self, stage, sites: dict, uploads: dict[int, Vector]):
        super().__init__(stage, sites)
        self.rule = rule_of(getattr(stage, "cfg", None))
        self.uploads = uploads  # each site's upload at weight 1: its vector, or its merge rule's parts
        # each site's own vector: its upload, or the rule's merge of its parts alone (weight 1)
        self.vectors = uploads if plain_rule(self.rule) else {n: combine_upload(self.rule, parts, 1.0)
                                                               for n, parts in uploads.items()}

    @classmethod
    def fetch(cls, stage, sites: dict, order: list[int], base_params: dict) -> "HeldAggregator":
        """Ask every site of `order` for its upload once (weight 1) and hold them."""
        return cls(stage, sites, dict(fetch_uploads(stage, sites, dict.fromkeys(order, 1.0), base_params)))

    def _aggregate(self, weights: dict[int, float]) -> AggregationOutcome:
        held = {n: w for n, w in weights.items() if n in self.uploads}
        if not held:
            raise FeddemError("no site's vector reached the server")
        summed = weighted_sum([self.uploads[n] for n in held], list(held.values()))
        aggregate = combine_upload(self.rule, summed, sum(held.values()))
        return AggregationOutcome(aggregate, list(held), {self.names[n]: w for n, w in held.items()})


class SecureAggregator(Aggregator):
    """One secure aggregation per call (`server.secure_aggregation.secure_sum`): the server gets only the sum.
    Dropped sites' weights are absent from it: the weights reported are the effective ones, not renormalised."""

    def __init__(self, grid: Grid, cfg: RunConfig, stage, trained: dict, sites: dict, base_params: dict):
        super().__init__(stage, sites)
        self.grid, self.cfg, self.trained, self.base_params = grid, cfg, trained, base_params

    def _layout(self, weights: dict[int, float]) -> list[str]:
        trained = self.trained
        layouts = {n: M.TrainReply.from_record(trained[n]).layout for n in weights}
        layout = layouts[min(layouts)]
        if any(names != layout for names in layouts.values()):
            raise FeddemError("the sites' vectors cover different parameters (vector layouts differ): check that all "
                              "sites run the same configuration (full vs LoRA)")
        return layout

    def _aggregate(self, weights: dict[int, float]) -> AggregationOutcome:
        layout, merge_rule = self._layout(weights), rule_of(self.cfg)
        shapes = self.base_params if plain_rule(merge_rule) else upload_shapes(merge_rule, layout, self.base_params)
        result = secure_sum(self.grid, self.cfg, self.stage.base, weights, layout, shapes, ring_finer(merge_rule))
        for node, why in result.dropped.items():
            self.stage.fail(node, f"secure aggregation, {why}")
        used = {self.names[n]: weights[n] for n in result.survivors}
        details = secure_details(self.cfg, result, self.names, weights, used)
        if result.dropped:
            log.warning("secure aggregation: %d site(s) dropped, effective weights %s (sum %.4f, not renormalised)",
                        len(result.dropped), used, sum(used.values()))
        # one secure sum of all the parts; the rule's merge of them with the survivors' weights
        aggregate = combine_upload(merge_rule, result.aggregate, sum(used.values()))
        return AggregationOutcome(aggregate, result.survivors, used, details)


def secure_details(cfg: RunConfig, result: SecureSum, name: dict[int, str], weights: dict[int, float],
                   used: dict[str, float]) -> dict:
    """The report's `secure_aggregation` section of one secure sum."""
    clipped = {name[n]: c for n, c in result.clipped.items()}
    if any(clipped.values()):
        log.warning("elements clipped at the sites (|w*d| > clip %g): %s", cfg.clip, clipped)
    return {
        "error_bound": result.error_bound,
        "threshold": result.threshold,
        "ring_bits": result.bits,
        "clip": result.clip,
        "clipped_elements": clipped,
        "noise": cfg.noise,  # std of the distributed Gaussian noise in the sum (with every site in it)
        "aggregation_budget": cfg.aggregation_budget,
        "survivors": sorted(used),
        "dropped": {name[n]: why for n, why in result.dropped.items()},
        "requested_weights": {name[n]: w for n, w in weights.items()},
        "effective_weight_sum": sum(used.values()),
        "note": ("the sum holds exactly the survivors' w_i * d_i; a dropped site's weight is missing from it and "
                 "was not renormalised (that would need a second aggregation, which the sites' guards refuse)"
                 if result.dropped else "every site is in the sum"),
    }


def configure_aggregator(grid: Grid, cfg: RunConfig, stage, trained: dict, sites: dict, order: list[int],
                         base_params: dict) -> Aggregator:
    """The round's aggregator for the run's configuration (a trusted run fetches the sites' vectors here)."""
    if cfg.aggregation == "secure":
        return SecureAggregator(grid, cfg, stage, trained, sites, base_params)
    if strategy(cfg.strategy_name).search or cfg.keep_pool or cfg.ablate:
        return HeldAggregator.fetch(stage, sites, order, base_params)
    return PlainAggregator(stage, sites, base_params)
