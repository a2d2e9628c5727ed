"""The DEM workflow over Flower's Grid: setup, local training, weighting, aggregation, merge, evaluation, export.

Each stage sends one message per site and waits for the replies. A site that fails or refuses is recorded with
its reason and the run goes on with the others; the run fails loudly when no site is left. The weighted vectors
reach the server through an `Aggregator` (`server.aggregation`): by secure aggregation (`server.secure_aggregation`,
default) or, with `aggregation = plain`, in the clear. `DemRun.start()` is the run loop; it returns a `RunResult`
whose `Manifest` (`server.manifest`) names every file the run wrote, which the recorder reads.
"""

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from feddem.common import messages as M
from feddem.common.config import RunConfig
from feddem.common.data import list_shards
from feddem.common.errors import FeddemError
from feddem.common.merging.parts import rule_of, upload_size
from feddem.common.modeling import load_model, load_tokenizer, model_checksum
from feddem.common.paths import feddem_home
from feddem.common.vector_io import save_vector
from feddem.common.vector_records import vector_to_record
from feddem.common.vectors import Vector, add_into, apply_vector
from feddem.common.weighting import ALIGNMENT, EMBEDDING, SiteReport, compute_weights, strategy
from feddem.common.weighting.weights import clamp, outside_range
from feddem.server.base_ref import resolve_base_ref
from feddem.server.messaging import failure_reason, pull_one_at_a_time, push_each
from feddem.server.cross_domain import NOT_HELD_REASON, federated_matrix, own_loss_differs, withheld
from feddem.server.export import export_model
from feddem.server.model_card import write_model_card
from feddem.server.report import build_report, write_report
from feddem.server.ablation import parse_candidates, rank_candidates, write_ablation
from feddem.server.aggregation import (  # noqa: F401 (fetch_uploads, plain_aggregate: bench/secagg.py's entry)
    AggregationOutcome, Aggregator, configure_aggregator, fetch_uploads, plain_aggregate,
)
from feddem.server.manifest import (
    ABLATION_JSON, ABLATION_PNG, AGGREGATE, KIND_AGGREGATE, KIND_MODEL, KIND_REPORT, KIND_SITE_VECTOR, MODEL, POOL_DIR,
    REPORT_JSON, REPORT_PNG, Manifest,
)
from feddem.common.weighting.search import search_merge
from feddem.common.weighting.dga import target_direction

log = logging.getLogger("feddem.server")


@dataclass
class RunResult:
    """A finished run: its folder, its report, and the manifest of the files it wrote there (None when the run
    happened elsewhere, e.g. in a simulation's own process: the folder is then read as `Manifest.of_folder`)."""

    out_dir: Path
    report: dict = field(default_factory=dict)
    manifest: Manifest | None = None


def preflight(cfg: RunConfig) -> None:
    """Checks that need no site: the data spec provides enough shards for the sites."""
    cfg.validate()
    shards = list_shards(cfg.data)
    if cfg.sites > len(shards):
        raise FeddemError(
            f"--sites {cfg.sites} is more than the {len(shards)} shard(s) that data '{cfg.data}' provides "
            f"({', '.join(shards)}): one site per shard"
        )


def _out_dir(cfg: RunConfig, run_id: int) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir).expanduser().resolve()
    return feddem_home() / "runs" / f"{datetime.now():%Y%m%d-%H%M%S}-{run_id}"


def _wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted:
            return nodes[:wanted]
        if time.monotonic() > deadline:
            raise FeddemError(f"only {len(nodes)} of {wanted} sites connected within {timeout:.0f} s")
        time.sleep(1.0)


class Stage:
    """Send one message per node, collect the replies, split them into results and failures (keyed by the site's
    name once any reply of that node named it, else `node-<id>`)."""

    def __init__(self, grid: Grid, cfg: RunConfig, base: ConfigRecord):
        self.grid, self.cfg, self.base = grid, cfg, base
        self.failures: dict[str, str] = {}
        self.names: dict[int, str] = {}  # node -> site name, from the replies that carry it

    def label(self, node: int) -> str:
        return self.names.get(node, f"node-{node}")

    def fail(self, node: int, why: str) -> None:
        self.failures[self.label(node)] = why
        log.warning("%s failed: %s", self.label(node), why)

    def _learn_name(self, node: int, content: RecordDict) -> None:
        name = M.site_of(content)
        if name is not None:
            self.names[node] = name

    def run(self, name: str, message_type: str, per_node: dict[int, RecordDict]) -> dict[int, RecordDict]:
        """The contents of the successful replies by node (failures recorded in `failures`; a FeddemError when no
        site succeeded)."""
        return dict(self.stream(name, message_type, per_node))

    def stream(self, name: str, message_type: str, per_node: dict[int, RecordDict]):
        """Send one message per node and yield (node, content) of each successful reply as it arrives, pulling
        replies one at a time, so a stage whose replies are whole vectors (plain uploads) holds one of them at a
        time, not one per site. Failures go to `failures`; a FeddemError at the end when no site succeeded."""
        def not_sent(node):
            self.fail(node, f"{name}: the message could not be sent")

        pending = push_each(self.grid, self.cfg, self.base, message_type, per_node, not_sent)
        log.info("%s: %d site(s)", name, len(pending))
        started, asked = time.perf_counter(), len(pending)
        succeeded = 0
        for node, reply in pull_one_at_a_time(self.grid, pending, self.cfg.timeout):
            reason = failure_reason(reply)
            if not reply.has_error():
                self._learn_name(node, reply.content)
            if reason is not None:
                self.fail(node, f"{name}: {reason}")
                continue
            succeeded += 1
            content = reply.content
            del reply
            yield node, content
            del content
        for node in pending.values():
            self.fail(node, f"{name}: no reply within {self.cfg.timeout:.0f} s")
        log.info("%s: %d of %d site(s) replied in %.1f s", name, succeeded, asked, time.perf_counter() - started)
        if not succeeded:
            raise FeddemError(f"{name}: no site succeeded ({'; '.join(self.failures.values())})")


def _site_record(content: RecordDict) -> dict:
    return M.TrainReply.from_record(content).result


def evaluate_records(stage: Stage, nodes, aggregate: Vector, split: str, name: str) -> dict[int, dict]:
    """Each site's evaluation of base + aggregate on its validation or test split: its whole reply (merged_loss,
    domain, and the generation metrics and samples of instruction data)."""
    record = vector_to_record(aggregate)  # serialised once, sent to every site
    replies = stage.run(name, M.EVALUATE, {n: M.EvaluateRequest(record, split).to_record() for n in nodes})
    return {node: M.EvaluateReply.from_record(content).result for node, content in replies.items()}


def evaluate_merge(stage: Stage, nodes, aggregate: Vector, split: str, name: str) -> dict[int, float]:
    """Each site's loss of base + aggregate on its validation or test split."""
    return {node: float(r["merged_loss"]) for node, r in evaluate_records(stage, nodes, aggregate, split,
                                                                          name).items()}


def _reports(sites: dict, trained: dict, order: list[int]) -> list[SiteReport]:
    reports = []
    for n in order:
        s = sites[n]
        extra = {key: float(s[key]) for key in (ALIGNMENT,) if key in s}
        embedding = M.TrainReply.from_record(trained[n]).embedding
        if embedding is not None:
            extra[EMBEDDING] = embedding
        reports.append(SiteReport(s["site"], s["domain"], int(s["examples"]), int(s["tokens"]),
                                  float(s["train_loss"]), extra))
    return reports


@dataclass
class TrainedRound:
    """One round's local training: the replies by node, the sites' records, and their order (by site name)."""

    trained: dict[int, RecordDict]
    sites: dict[int, dict]
    order: list[int]

    @property
    def names(self) -> dict[int, str]:
        return {n: self.sites[n]["site"] for n in self.order}


@dataclass
class MergedRound:
    """What one round's merge gave: the aggregation's outcome, the search summary (or None), the aggregator (a
    trusted run's holds the sites' vectors for the cross-domain matrix, the pool and ablations)."""

    outcome: AggregationOutcome
    search: dict | None
    aggregator: Aggregator


def strategy_weights(cfg: RunConfig, round_: TrainedRound, state: dict) -> dict[int, float]:
    """The weighting strategy's weights by node, within [weight-min, weight-max] (clamped, or refused when given
    by hand)."""
    chosen = strategy(cfg.strategy_name)
    order, names = round_.order, round_.names
    weights = dict(zip(order, compute_weights(chosen.name, _reports(round_.sites, round_.trained, order), cfg,
                                              state)))
    outside = {names[n]: w for n, w in outside_range(weights, cfg.weight_min, cfg.weight_max).items()}
    if outside and chosen.name == "manual":
        raise FeddemError(f"--weights {outside} are outside [weight-min, weight-max] = [{cfg.weight_min}, "
                          f"{cfg.weight_max}]")
    if outside:  # a strategy's weights are clamped to the configured range (the sites' guards check it)
        log.warning("weights %s clamped to [%g, %g]", outside, cfg.weight_min, cfg.weight_max)
        weights = clamp(weights, cfg.weight_min, cfg.weight_max)
    log.info("weights (%s): %s", chosen.name, {names[n]: round(w, 4) for n, w in weights.items()})
    return weights


def searched_merge(cfg: RunConfig, round_: TrainedRound, aggregator: Aggregator) -> MergedRound:
    """A search strategy's merge: candidates aggregated and scored on the sites' validation splits."""
    outcomes: dict = {}

    def candidate(weights):
        outcome = aggregator.aggregate(weights)
        aggregate, outcome.aggregate = outcome.aggregate, {}
        outcomes[tuple(weights.values())] = outcome  # who contributed, weights used, details: not the vector
        return aggregate

    order = round_.order
    result = search_merge(cfg, order, round_.names, candidate,
                          lambda aggregate: evaluate_merge(aggregator.stage, order, aggregate, "validation", "search"))
    summary = {"candidates": result.history, "best_validation_loss": result.score, "stopped": result.stopped,
               "aggregations": len(result.history) if cfg.aggregation == "secure" else 1}
    best = outcomes[tuple(result.weights.values())]
    best.aggregate = result.aggregate
    return MergedRound(best, summary, aggregator)


def merge_round(cfg: RunConfig, round_: TrainedRound, aggregator: Aggregator, state: dict) -> MergedRound:
    """Weighting and aggregation of one round."""
    if strategy(cfg.strategy_name).search:
        return searched_merge(cfg, round_, aggregator)
    return MergedRound(aggregator.aggregate(strategy_weights(cfg, round_, state)), None, aggregator)


def _ablation(aggregator: Aggregator, cfg: RunConfig, order: list[int], manifest: Manifest) -> list[dict]:
    """Rank the candidate mixtures of `cfg.ablate` by the test loss of their merges; writes ablation.json/png."""
    names = [aggregator.names[n] for n in order]
    min_size = cfg.min_peers + 1 if cfg.aggregation == "secure" else 1
    candidates = parse_candidates(cfg.ablate, names, min_size)
    domain = {aggregator.sites[n]["site"]: aggregator.sites[n]["domain"] for n in order}

    def merge_loss(weights: dict[str, float]) -> dict[str, float]:
        aggregate = aggregator.aggregate(aggregator.by_name(weights)).aggregate
        losses = evaluate_merge(aggregator.stage, order, aggregate, "test", "ablation")
        return {domain[aggregator.names[n]]: loss for n, loss in losses.items()}

    rows = rank_candidates(candidates, names, merge_loss)
    write_ablation(rows, manifest.out_dir)
    manifest.add(ABLATION_JSON, KIND_REPORT)
    manifest.add(ABLATION_PNG)
    return rows


def _record_round_merge(entry: dict, losses: dict[int, float], sites: dict) -> None:
    """A round's entry in the report gets its merge's test loss per domain and their mean."""
    entry["merged_loss"] = {sites[n]["domain"]: loss for n, loss in losses.items()}
    entry["mean_merged_loss"] = sum(losses.values()) / len(losses) if losses else None


def _cross_domain(cfg: RunConfig, stage: Stage, aggregator: Aggregator, nodes: list[int],
                  start: Vector | None, sites: dict | None = None) -> dict:
    """The report's cross-domain matrix (`server.cross_domain`). A secure run withholds it: the server never asks
    for a site's vector. A plain run that holds the sites' vectors (search, pool, ablation) forms each site's local
    model from its vector (from `start`, where the last round started) and has every site evaluate it, but for the
    diagonal, which is each site's own evaluation of its local model in `sites` (the last round's records) where
    that is the same quantity (`own_loss_differs`); one that streamed them into the sum withholds it too (asking a
    second time would be refused: a site sends a vector in the clear once)."""
    if cfg.aggregation == "secure":
        return withheld()
    if aggregator.vectors is None:
        return withheld(NOT_HELD_REASON)

    def vector_of(node: int) -> Vector:
        if node not in aggregator.vectors:
            raise FeddemError(f"{aggregator.names[node]}'s vector did not reach the server")
        return aggregator.vectors[node]

    def evaluate(vector: Vector, ask: list[int]) -> dict[int, tuple[str, float]]:
        records = evaluate_records(stage, ask, vector, "test", "cross-domain evaluation")
        return {n: (str(r["domain"]), float(r["merged_loss"])) for n, r in records.items()}

    differs = own_loss_differs(cfg, exact_start=True)  # `start`: the merge the sites' last round was sent
    own = {} if differs or not sites else {n: (str(sites[n]["domain"]), float(sites[n]["local_loss"]))
                                           for n in nodes if n in sites}
    try:
        return federated_matrix({n: aggregator.names[n] for n in nodes}, vector_of, evaluate, start, own,
                                differs if differs else "")
    except FeddemError as exc:
        log.warning("cross-domain matrix not formed: %s", exc)
        return {"status": "failed", "reason": str(exc)}


def merge_section(cfg: RunConfig, round_: TrainedRound, base_shapes: dict) -> dict:
    """The report's `merge` section: the rule, its parameters, each site's upload size relative to its vector
    (from the layouts the sites reported: their tensor names, not their values) and, for a rule with statistics,
    how many train examples each site computed them on (`merge-examples`, or all of a smaller site's)."""
    merge_rule = rule_of(cfg)
    sizes = {}
    for n in round_.order:
        layout = M.TrainReply.from_record(round_.trained[n]).layout
        try:
            sizes[round_.sites[n]["site"]] = round(upload_size(merge_rule, layout, base_shapes), 4)
        except FeddemError as exc:  # a layout the base does not fit: the aggregation said so already
            log.warning("merge: upload size of %s not known: %s", round_.sites[n]["site"], exc)
    section = {"rule": merge_rule.name, "parameters": merge_rule.parameters(), "upload_size_relative": sizes,
               "reveals": merge_rule.reveals()}
    if merge_rule.statistics is not None:
        section["statistics_examples"] = {round_.sites[n]["site"]: int(round_.sites[n]["merge_stats_examples"])
                                          for n in round_.order if "merge_stats_examples" in round_.sites[n]}
    return section


class Timings:
    """Seconds spent per part of the run (`lap(name)` adds the time since the previous lap)."""

    def __init__(self):
        self.started = self.tick = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self.tick, 3)
        self.tick = now

    def total(self) -> float:
        self.seconds["total"] = round(time.perf_counter() - self.started, 3)
        return self.seconds["total"]


@dataclass
class Base:
    """The base model as the server keeps it: its reference, checksum and parameter shapes (not the weights: the
    merge and the export stream them from the base's files, `common.modeling.export_merged`)."""

    ref: str
    checksum: str
    shapes: dict
    info: dict

    @classmethod
    def load(cls, cfg: RunConfig) -> "Base":
        ref = resolve_base_ref(cfg)
        model = load_model(ref)
        checksum = model_checksum(model)
        shapes = {name: p.shape for name, p in model.named_parameters()}
        return cls(ref, checksum, shapes,
                   {"ref": ref, "checksum": checksum, "parameters": sum(p.numel() for p in model.parameters())})


class DemRun:
    """A DEM run over Flower's Grid, in the shape of Flower's strategies: `start()` sets up, then per round
    configures the training request, trains, aggregates (an `Aggregator`) and evaluates, then finishes (the trusted
    run's extras, the export, the report). Every output file goes through the run's `Manifest`."""

    def __init__(self, grid: Grid, cfg: RunConfig, run_id: int):
        self.grid, self.cfg, self.run_id = grid, cfg, run_id
        self.chosen = strategy(cfg.strategy_name)
        self.timings = Timings()
        self.merged: Vector | None = None  # sum of the rounds' aggregates: the merged model is base + this
        self.state: dict = {}  # the weighting strategy's memory across rounds (DGA's moving average)
        self.rounds: list[dict] = []  # the report's entry of each round
        self.first_sites: dict = {}  # round 1's site records (their base loss is the base's)
        self.last_start: Vector | None = None  # the merge the last round started from (rounds > 1, plain, held)

    def start(self) -> RunResult:
        """The whole run; returns its folder, report and manifest."""
        self.setup()
        for r in range(1, self.cfg.rounds + 1):
            self.run_round(r)
        return self.finish()

    def setup(self) -> None:
        preflight(self.cfg)
        self.manifest = Manifest(_out_dir(self.cfg, self.run_id))
        self.manifest.out_dir.mkdir(parents=True, exist_ok=True)
        log.info("run folder: %s", self.manifest.out_dir)
        self.base = Base.load(self.cfg)
        self.timings.lap("setup")
        self.nodes = _wait_for_nodes(self.grid, self.cfg.sites, self.cfg.timeout)
        self.stage = Stage(self.grid, self.cfg, M.BaseModelRef(self.base.ref, self.base.checksum).to_record())

    def configure_train(self) -> M.TrainRequest:
        """The training request of a round: where to start (the merge so far) and, for DGA, the target."""
        model_ref, cfg, merged_so_far = self.base.ref, self.cfg, self.merged
        request = M.TrainRequest(embedding=EMBEDDING in self.chosen.needs)
        if merged_so_far is not None:
            request.start = vector_to_record(merged_so_far)
        if ALIGNMENT in self.chosen.needs:
            current = load_model(model_ref)
            if merged_so_far is not None:
                apply_vector(current, merged_so_far)
            request.target = vector_to_record(target_direction(current, load_tokenizer(model_ref), cfg))
            del current
        return request

    def train(self, label: str) -> TrainedRound:
        request, nodes = self.configure_train(), self.nodes
        trained = self.stage.run(f"{label}local fine-tuning", M.TRAIN, {n: request.to_record() for n in nodes})
        sites = {node: _site_record(content) for node, content in trained.items()}
        self.first_sites = self.first_sites or sites
        for s in sites.values():
            log.info("%s%s (%s): base loss %.4f -> local %.4f", label, s["site"], s["domain"], s["base_loss"],
                     s["local_loss"])
        self.timings.lap("train")
        return TrainedRound(trained, sites, sorted(sites, key=lambda n: sites[n]["site"]))

    def run_round(self, r: int) -> None:
        """Round r: train, aggregate, add to the merge, and (but for the last round) evaluate the merge so far."""
        cfg = self.cfg
        label = f"round {r}/{cfg.rounds}: " if cfg.rounds > 1 else ""
        self.trained = trained = self.train(label)
        aggregator = configure_aggregator(self.grid, cfg, self.stage, trained.trained, trained.sites, trained.order,
                                          self.base.shapes)
        self.last = merged = merge_round(cfg, trained, aggregator, self.state)
        self.timings.lap("aggregate")
        if r == cfg.rounds and r > 1 and aggregator.vectors is not None and cfg.aggregation != "secure":
            # the cross-domain matrix's start: exactly the merge this round's sites started from (`extras`)
            self.last_start = {name: t.clone() for name, t in self.merged.items()}
        if self.merged is None:
            self.merged = merged.outcome.aggregate
        else:
            add_into(self.merged, merged.outcome.aggregate)
        sites, order = trained.sites, trained.order
        self.rounds.append({"round": r, "weights": dict(sorted(merged.outcome.weights.items())),
                            "local_loss": {sites[n]["domain"]: float(sites[n]["local_loss"]) for n in order}}
                           | ({"search": merged.search} if merged.search else {}))
        self.nodes = sorted(merged.outcome.contributors)  # a site that dropped out does not come back later
        if r < cfg.rounds:  # the merge of every round is judged too (the last one in `finish`)
            _record_round_merge(self.rounds[-1], evaluate_merge(self.stage, self.nodes, self.merged, "test",
                                                                f"round {r}/{cfg.rounds}: evaluation"), sites)
            self.timings.lap("evaluate")

    def finish(self) -> RunResult:
        """The last evaluation, the trusted run's extras, the export and the report."""
        merged_records = evaluate_records(self.stage, self.nodes, self.merged, "test", "evaluation")
        _record_round_merge(self.rounds[-1], {n: float(r["merged_loss"]) for n, r in merged_records.items()},
                            self.trained.sites)
        self.timings.lap("evaluate")
        extra = self.extras()
        model_dir = self.export()
        self.timings.total()
        report = self.report(merged_records, extra)
        write_report(report, self.manifest.out_dir)
        self.manifest.add(REPORT_JSON, KIND_REPORT)
        self.manifest.add(REPORT_PNG, KIND_REPORT)
        write_model_card(model_dir, report)
        self.manifest.add_folder(MODEL, KIND_MODEL)
        self.log_summary(report)
        return RunResult(self.manifest.out_dir, report, self.manifest)

    def extras(self) -> dict:
        """The cross-domain matrix, and a trusted run's pool and ablation."""
        cfg, aggregator, sites = self.cfg, self.last.aggregator, self.trained.sites
        start = self.last_start  # where the last round started from (kept in `run_round` where the matrix needs it)
        self.last_start = None
        extra = {"cross_domain": _cross_domain(cfg, self.stage, aggregator, self.nodes, start, sites)}
        del start
        self.timings.lap("cross_domain")
        if aggregator.vectors is not None and cfg.keep_pool:  # a trusted run keeps the last round's vectors
            for n, vector in aggregator.vectors.items():
                name = f"{POOL_DIR}/{aggregator.names[n]}.safetensors"
                save_vector(vector, self.manifest.add(name, KIND_SITE_VECTOR),
                            metadata={"site": aggregator.names[n], "domain": sites[n]["domain"]})
            extra["pool"] = sorted(aggregator.names[n] for n in aggregator.vectors)
        if cfg.ablate:
            extra["ablation"] = _ablation(aggregator, cfg, self.trained.order, self.manifest)
            self.timings.lap("ablation")
        return extra

    def export(self) -> Path:
        """The merged model (its folder is recorded once its card is written) and the merge's vector."""
        model_dir = export_model(self.base.ref, self.merged, self.manifest.path(MODEL), self.cfg.max_shard_bytes)
        save_vector(self.merged, self.manifest.add(AGGREGATE, KIND_AGGREGATE),
                    metadata={"weights": str(self.last.outcome.weights)})
        self.timings.lap("export")
        return model_dir

    def report(self, merged_records: dict, extra: dict) -> dict:
        sites, cfg = self.trained.sites, self.cfg
        merged = {sites[n]["site"]: float(r["merged_loss"]) for n, r in merged_records.items()}
        # base loss from round 1 (the base itself), local loss from the last round
        self.trained_sites = [sites[n] | {"base_loss": self.first_sites.get(n, sites[n])["base_loss"]}
                              for n in sorted(sites, key=lambda n: sites[n]["site"])]
        self.merged_losses = merged
        return build_report(cfg.to_record(), self.base.info, self.trained_sites, self.last.outcome.weights, merged,
                            dict(self.stage.failures), self.timings.seconds, aggregation=cfg.aggregation,
                            aggregation_details=self.last.outcome.details,
                            extra={"flower_run_id": self.run_id, "weighting": self.chosen.name,
                                   "merge": merge_section(cfg, self.trained, self.base.shapes),
                                   "rounds": self.rounds} | extra,
                            merged_records={sites[n]["site"]: r for n, r in merged_records.items()})

    def log_summary(self, report: dict) -> None:
        for warning in report["judgement"]["warnings"]:
            log.warning("report: %s", warning)
        merged = self.merged_losses
        for s in self.trained_sites:
            if s["site"] in merged:
                log.info("%-10s base %.4f  local %.4f  merged %.4f (nats/token)", s["domain"], s["base_loss"],
                         s["local_loss"], merged[s["site"]])
        log.info("done in %.1f s: %s", self.timings.seconds["total"], self.manifest.out_dir)


def run_dem(grid: Grid, cfg: RunConfig, run_id: int) -> RunResult:
    """A DEM run of `cfg.rounds` rounds (`DemRun`); writes the merged model, report.json and report.png to the run
    folder and returns them with the run's manifest."""
    return DemRun(grid, cfg, run_id).start()
