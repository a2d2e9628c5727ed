"""The DEM workflow over Flower's Grid: setup, local training, weighting, aggregation, merge, evaluation, export.

Each stage sends one message per site and waits for the replies. A site that fails or refuses is recorded with
its reason and the run goes on with the others; the run fails loudly when no site is left. The weighted vectors
reach the server by secure aggregation (`server.secure_aggregation`, default) or, with `aggregation = plain`, in
the clear (`plain_aggregate`).
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
from feddem.common.modeling import load_model, load_tokenizer, model_checksum
from feddem.common.paths import feddem_home
from feddem.common.vectors import (
    Vector, add_into, apply_vector, check_vector, save_vector, vector_from_record, vector_to_record,
    weighted_sum,
)
from feddem.common.weighting import ALIGNMENT, EMBEDDING, SiteReport, compute_weights, strategy
from feddem.server.base import resolve_base_ref
from feddem.server.messaging import failure_reason, pull_one_at_a_time, push_each
from feddem.server.cross_domain import NOT_HELD_REASON, federated_matrix, withheld
from feddem.server.export import export_model
from feddem.server.model_card import write_model_card
from feddem.server.report import build_report, write_report
from feddem.server.ablation import POOL, parse_candidates, rank_candidates, write_ablation
from feddem.server.search import search_merge
from feddem.server.secure_aggregation import secure_sum
from feddem.server.target import target_direction

log = logging.getLogger("feddem.server")


@dataclass
class RunResult:
    out_dir: Path
    report: dict = field(default_factory=dict)


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


def fetch_uploads(stage: Stage, sites: dict, weights: dict[int, float], base_params: dict):
    """Ask each site for `w_i * d_i` in the clear (plain aggregation); yields (node, checked vector) as they come,
    one reply at a time (the vector is read lazily from its message)."""
    for node, content in stage.stream("upload", M.UPLOAD, {n: M.UploadRequest(w).to_record()
                                                           for n, w in weights.items()}):
        vector = vector_from_record(M.UploadReply.from_record(content).vector)
        check_vector(vector, base_params, f"upload of {sites[node]['site']}", stage.cfg.torch_vector_dtype)
        yield node, vector


def plain_aggregate(stage: Stage, sites: dict, weights: dict[int, float], base_params: dict):
    """Plain aggregation (`--aggregation plain`): each site sends `w_i * d_i` in the clear; the server sums them and
    renormalises over the uploads that arrived. Returns (aggregate, contributing nodes, weights used by site)."""
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
    return aggregate, arrived, used


def _secure_aggregate(grid: Grid, cfg: RunConfig, stage: Stage, trained: dict, sites: dict,
                      weights: dict[int, float], base_params: dict):
    """Secure aggregation (default): the server gets only the sum. Dropped sites' weights are absent from it:
    the weights reported are the effective ones, not renormalised. Returns what `plain_aggregate` does, plus the
    report's `secure_aggregation` section."""
    layouts = {n: M.TrainReply.from_record(trained[n]).layout for n in weights}
    layout = layouts[min(layouts)]
    if any(names != layout for names in layouts.values()):
        raise FeddemError("the sites' vectors cover different parameters (vector layouts differ): check that all "
                          "sites run the same configuration (full vs LoRA)")
    result = secure_sum(grid, cfg, stage.base, weights, layout, base_params)
    for node, why in result.dropped.items():
        stage.fail(node, f"secure aggregation, {why}")
    name = {n: sites[n]["site"] for n in weights}
    used = {name[n]: weights[n] for n in result.survivors}
    clipped = {name[n]: c for n, c in result.clipped.items()}
    if any(clipped.values()):
        log.warning("elements clipped at the sites (|w*d| > clip %g): %s", cfg.clip, clipped)
    details = {
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
    if result.dropped:
        log.warning("secure aggregation: %d site(s) dropped, effective weights %s (sum %.4f, not renormalised)",
                    len(result.dropped), used, sum(used.values()))
    return result.aggregate, result.survivors, used, details


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


class RoundMerger:
    """Forms the merge of one round's vectors for given weights: by secure aggregation (one aggregation per call,
    within the sites' budget), by weighted plain uploads, or, in a trusted run (plain, and the server needs the
    vectors for a search, the pool or ablations), from each site's d_i fetched once and held by the server."""

    def __init__(self, grid: Grid, cfg: RunConfig, stage: Stage, trained: dict, sites: dict, order: list[int],
                 base_params: dict):
        self.grid, self.cfg, self.stage, self.trained, self.sites = grid, cfg, stage, trained, sites
        self.order, self.base_params = order, base_params
        self.names = {n: sites[n]["site"] for n in order}
        self.aggregations = 0
        self.vectors: dict[int, Vector] | None = None
        if cfg.aggregation == "plain" and (strategy(cfg.strategy_name).search or cfg.keep_pool or cfg.ablate):
            self.vectors = dict(fetch_uploads(stage, sites, dict.fromkeys(order, 1.0), base_params))

    def merge(self, weights: dict[int, float]):
        """(aggregate, contributing nodes, weights used by site name, secure details or None)"""
        self.aggregations += 1
        if self.cfg.aggregation == "secure":
            return _secure_aggregate(self.grid, self.cfg, self.stage, self.trained, self.sites, weights,
                                     self.base_params)
        if self.vectors is None:
            return (*plain_aggregate(self.stage, self.sites, weights, self.base_params), None)
        held = {n: w for n, w in weights.items() if n in self.vectors}
        if not held:
            raise FeddemError("no site's vector reached the server")
        aggregate = weighted_sum([self.vectors[n] for n in held], list(held.values()))
        return aggregate, list(held), {self.names[n]: w for n, w in held.items()}, None

    def by_name(self, weights: dict[str, float]) -> dict[int, float]:
        node = {name: n for n, name in self.names.items()}
        return {node[name]: w for name, w in weights.items()}


def _merge_round(merger: RoundMerger, cfg: RunConfig, state: dict):
    """Weighting and aggregation of one round: (aggregate, contributors, weights used by site, secure details,
    search summary or None)."""
    chosen = strategy(cfg.strategy_name)
    order, names = merger.order, merger.names
    if not chosen.search:
        weights = dict(zip(order, compute_weights(chosen.name, _reports(merger.sites, merger.trained, order), cfg,
                                                  state)))
        outside = {names[n]: w for n, w in weights.items() if not cfg.weight_min <= w <= cfg.weight_max}
        if outside and chosen.name == "manual":
            raise FeddemError(f"--weights {outside} are outside [weight-min, weight-max] = [{cfg.weight_min}, "
                              f"{cfg.weight_max}]")
        if outside:  # a strategy's weights are clamped to the configured range (the sites' guards check it)
            log.warning("weights %s clamped to [%g, %g]", outside, cfg.weight_min, cfg.weight_max)
            weights = {n: min(max(w, cfg.weight_min), cfg.weight_max) for n, w in weights.items()}
        log.info("weights (%s): %s", chosen.name, {names[n]: round(w, 4) for n, w in weights.items()})
        return (*merger.merge(weights), None)

    outcomes: dict = {}

    def candidate(weights):
        aggregate, *rest = merger.merge(weights)
        outcomes[tuple(weights.values())] = rest  # who contributed, weights used, details: not the vector
        return aggregate

    result = search_merge(cfg, order, names, candidate,
                          lambda aggregate: evaluate_merge(merger.stage, order, aggregate, "validation", "search"))
    summary = {"candidates": result.history, "best_validation_loss": result.score, "stopped": result.stopped,
               "aggregations": len(result.history) if cfg.aggregation == "secure" else 1}
    return (result.aggregate, *outcomes[tuple(result.weights.values())], summary)


def _ablation(merger: RoundMerger, cfg: RunConfig, out: Path) -> list[dict]:
    """Rank the candidate mixtures of `cfg.ablate` by the test loss of their merges; writes ablation.json/png."""
    names = [merger.names[n] for n in merger.order]
    min_size = cfg.min_peers + 1 if cfg.aggregation == "secure" else 1
    candidates = parse_candidates(cfg.ablate, names, min_size)
    domain = {merger.sites[n]["site"]: merger.sites[n]["domain"] for n in merger.order}

    def merge_loss(weights: dict[str, float]) -> dict[str, float]:
        aggregate = merger.merge(merger.by_name(weights))[0]
        losses = evaluate_merge(merger.stage, merger.order, aggregate, "test", "ablation")
        return {domain[merger.names[n]]: loss for n, loss in losses.items()}

    rows = rank_candidates(candidates, names, merge_loss)
    write_ablation(rows, out)
    return rows


def _record_round_merge(entry: dict, losses: dict[int, float], sites: dict) -> None:
    """A round's entry in the report gets its merge's test loss per domain and their mean."""
    entry["merged_loss"] = {sites[n]["domain"]: loss for n, loss in losses.items()}
    entry["mean_merged_loss"] = sum(losses.values()) / len(losses) if losses else None


def _cross_domain(cfg: RunConfig, stage: Stage, merger: RoundMerger, nodes: list[int],
                  start: Vector | None) -> dict:
    """The report's cross-domain matrix (`server.cross_domain`). A secure run withholds it: the server never asks
    for a site's vector. A plain run that holds the sites' vectors (search, pool, ablation) forms each site's local
    model from its vector and has every site evaluate it; one that streamed them into the sum withholds it too
    (asking a second time would be refused: a site sends a vector in the clear once)."""
    if cfg.aggregation == "secure":
        return withheld()
    if merger.vectors is None:
        return withheld(NOT_HELD_REASON)

    def vector_of(node: int) -> Vector:
        if node not in merger.vectors:
            raise FeddemError(f"{merger.names[node]}'s vector did not reach the server")
        return merger.vectors[node]

    def evaluate(vector: Vector) -> dict[int, tuple[str, float]]:
        records = evaluate_records(stage, nodes, vector, "test", "cross-domain evaluation")
        return {n: (str(r["domain"]), float(r["merged_loss"])) for n, r in records.items()}

    try:
        return federated_matrix({n: merger.names[n] for n in nodes}, vector_of, evaluate, start)
    except FeddemError as exc:
        log.warning("cross-domain matrix not formed: %s", exc)
        return {"status": "failed", "reason": str(exc)}


def run_dem(grid: Grid, cfg: RunConfig, run_id: int) -> RunResult:
    """A DEM run of `cfg.rounds` rounds; writes the merged model, report.json and report.png to the run folder."""
    timings: dict[str, float] = {}
    started = tick = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        timings[name] = round(timings.get(name, 0.0) + now - tick, 3)
        tick = now

    preflight(cfg)
    out = _out_dir(cfg, run_id)
    out.mkdir(parents=True, exist_ok=True)
    log.info("run folder: %s", out)

    model_ref = resolve_base_ref(cfg)
    base_model = load_model(model_ref)
    checksum = model_checksum(base_model)
    # the server keeps the parameters' shapes, not a copy of them nor the model: the merge and the export stream
    # the base from its files (common.modeling.export_merged)
    base_params = {name: p.shape for name, p in base_model.named_parameters()}
    base_info = {"ref": model_ref, "checksum": checksum, "parameters": sum(p.numel() for p in base_model.parameters())}
    del base_model
    lap("setup")

    nodes = _wait_for_nodes(grid, cfg.sites, cfg.timeout)
    stage = Stage(grid, cfg, M.BaseModelRef(model_ref, checksum).to_record())
    chosen = strategy(cfg.strategy_name)
    merged_so_far: Vector | None = None  # sum of the rounds' aggregates: the merged model is base + this
    state: dict = {}  # the weighting strategy's memory across rounds (DGA's moving average)
    rounds, first_sites, details, search = [], {}, None, None
    for r in range(1, cfg.rounds + 1):
        label = f"round {r}/{cfg.rounds}: " if cfg.rounds > 1 else ""
        request = M.TrainRequest(embedding=EMBEDDING in chosen.needs)
        if merged_so_far is not None:
            request.start = vector_to_record(merged_so_far)
        if ALIGNMENT in chosen.needs:
            current = load_model(model_ref)
            if merged_so_far is not None:
                apply_vector(current, merged_so_far)
            request.target = vector_to_record(target_direction(current, load_tokenizer(model_ref), cfg))
            del current
        trained = stage.run(f"{label}local fine-tuning", M.TRAIN, {n: request.to_record() for n in nodes})
        sites = {node: _site_record(content) for node, content in trained.items()}
        first_sites = first_sites or sites
        for s in sites.values():
            log.info("%s%s (%s): base loss %.4f -> local %.4f", label, s["site"], s["domain"], s["base_loss"],
                     s["local_loss"])
        lap("train")
        order = sorted(sites, key=lambda n: sites[n]["site"])
        merger = RoundMerger(grid, cfg, stage, trained, sites, order, base_params)
        aggregate, contributors, used, details, search = _merge_round(merger, cfg, state)
        lap("aggregate")
        if merged_so_far is None:
            merged_so_far = aggregate
        else:
            add_into(merged_so_far, aggregate)
        rounds.append({"round": r, "weights": dict(sorted(used.items())),
                       "local_loss": {sites[n]["domain"]: float(sites[n]["local_loss"]) for n in order}}
                      | ({"search": search} if search else {}))
        nodes = sorted(contributors)  # a site that dropped out does not come back in later rounds
        if r < cfg.rounds:  # the merge of every round is judged too (the last one below)
            _record_round_merge(rounds[-1], evaluate_merge(stage, nodes, merged_so_far, "test",
                                                           f"round {r}/{cfg.rounds}: evaluation"), sites)
            lap("evaluate")

    merged_records = evaluate_records(stage, nodes, merged_so_far, "test", "evaluation")
    merged = {sites[n]["site"]: float(r["merged_loss"]) for n, r in merged_records.items()}
    _record_round_merge(rounds[-1], {n: float(r["merged_loss"]) for n, r in merged_records.items()}, sites)
    lap("evaluate")
    start = None  # where the last round started from: the merge so far without the last round's aggregate
    if cfg.rounds > 1:
        start = {name: t - aggregate[name] if name in aggregate else t for name, t in merged_so_far.items()}
    extra = {"cross_domain": _cross_domain(cfg, stage, merger, nodes, start)}
    del start
    lap("cross_domain")
    if merger.vectors is not None and cfg.keep_pool:  # a trusted run keeps the last round's vectors
        for n, vector in merger.vectors.items():
            save_vector(vector, out / POOL / f"{merger.names[n]}.safetensors",
                        metadata={"site": merger.names[n], "domain": sites[n]["domain"]})
        extra["pool"] = sorted(merger.names[n] for n in merger.vectors)
    if cfg.ablate:
        extra["ablation"] = _ablation(merger, cfg, out)
        lap("ablation")

    model_dir = export_model(model_ref, merged_so_far, out / "model", cfg.max_shard_bytes)
    save_vector(merged_so_far, out / "aggregate.safetensors", metadata={"weights": str(used)})
    lap("export")
    timings["total"] = round(time.perf_counter() - started, 3)

    # base loss from round 1 (the base itself), local loss from the last round
    trained_sites = [sites[n] | {"base_loss": first_sites.get(n, sites[n])["base_loss"]}
                     for n in sorted(sites, key=lambda n: sites[n]["site"])]
    report = build_report(cfg.to_record(), base_info, trained_sites, used, merged,
                          dict(stage.failures), timings, aggregation=cfg.aggregation,
                          aggregation_details=details,
                          extra={"flower_run_id": run_id, "weighting": chosen.name, "rounds": rounds} | extra,
                          merged_records={sites[n]["site"]: r for n, r in merged_records.items()})
    write_report(report, out)
    write_model_card(model_dir, report)
    for warning in report["judgement"]["warnings"]:
        log.warning("report: %s", warning)
    for s in trained_sites:
        if s["site"] in merged:
            log.info("%-10s base %.4f  local %.4f  merged %.4f (nats/token)", s["domain"], s["base_loss"],
                     s["local_loss"], merged[s["site"]])
    log.info("done in %.1f s: %s", timings["total"], out)
    return RunResult(out, report)
