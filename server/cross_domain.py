"""The cross-domain matrix: each site's local model on every domain's held-out test split, which shows interference.

Site j's local model is `base + start + d_j` (start: the merge the last round began from, zero in a one-round run),
so the matrix needs each site's own vector d_j. Who may form it depends on the run:

- a plain (trusted) run: the server already sees each vector in the clear; it forms site j's local model and asks
  every site to evaluate it with the ordinary evaluate message (`federated_matrix`);
- a secure run: the server learns only the weighted sum, never a site's vector, so the ServerApp writes the matrix
  as withheld (`withheld`) and never asks for a vector;
- `feddem simulate`: one user owns every site on one machine; after the run, the simulation driver (not the
  ServerApp, and outside the federation) reads the sites' stored vectors under FEDDEM_HOME and the shards' test
  splits and fills the matrix in (`complete_in_simulation`), marked as computed by the simulation driver.
"""

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from feddem.common.errors import FeddemError
from feddem.common.site_context import STATS_NAME

log = logging.getLogger("feddem.server")

WITHHELD_REASON = ("withheld: needs each site's vector, and under secure aggregation the server learns only the "
                   "weighted sum of the vectors")
BY_FEDERATION = "ServerApp, in the federation (plain aggregation: the server sees each site's vector)"
BY_SIMULATION = ("simulation driver, outside the federation (one user owns every site's vector and data on this "
                 "machine; a deployed secure run withholds this matrix)")
NOT_HELD_REASON = ("withheld: needs each site's vector, and in this plain run each site sent its vector once, "
                   "into the sum (a site's guard sends a vector in the clear at most once): --keep-pool, --ablate "
                   "or --weighting search make the server hold each vector, and the matrix is formed from those")


def withheld(reason: str = WITHHELD_REASON) -> dict:
    """The report's `cross_domain` section where the server holds no single vector (a secure run; a plain run
    that streamed the vectors into the sum)."""
    return {"status": "withheld", "reason": reason}


def section(loss: dict[str, dict[str, float]], computed_by: str, note: str = "", diagonal: str = "") -> dict:
    """The report's `cross_domain` section: loss[site][domain] of site's local model; per domain, which site's
    model scores best (the diagonal is the site's own domain); `diagonal` says where the diagonal came from."""
    domains = sorted({d for row in loss.values() for d in row})
    best = {d: min((s for s in loss if d in loss[s]), key=lambda s: loss[s][d]) for d in domains}
    return {"status": "computed", "computed_by": computed_by, "unit": "nats per token (held-out test loss)",
            "rows": "each site's local model (base + its own vector, from the last round's start)",
            "loss": loss, "best_on_domain": best} | ({"note": note} if note else {}) | (
                {"diagonal": diagonal} if diagonal else {})


DIAGONAL_REUSED = ("each site's own evaluation of its local model on its test split during training (the report's "
                   "eval.local), not evaluated again: the same model, split and evaluation")


def own_loss_differs(cfg, exact_start: bool) -> str:
    """Why a site's own evaluation of its local model (after training, on its test split: the report's eval.local)
    is not the matrix's diagonal, whose model is base + start + the STORED vector; "" when it is the same quantity
    (the stored vector is the trained model's exact float32 delta, and `exact_start`: the start is the one the
    site trained from), and the diagonal is then taken from it instead of being evaluated again."""
    from feddem.common.sparsify import parse_sparsify

    if parse_sparsify(cfg.sparsify)[0] != "none":
        return f"evaluated again: the stored vector is sparsified ({cfg.sparsify}), the site evaluated its dense model"
    if cfg.vector_dtype != "float32":
        return f"evaluated again: the stored vector is {cfg.vector_dtype}, the site evaluated its float32 delta"
    if cfg.lora:
        return "evaluated again: the site evaluated its LoRA adapters unmerged, the matrix the dense update"
    if not exact_start:
        return ("evaluated again: the last round's start is recovered from the aggregate (in a secure run up to "
                "its quantization error and noise), not the start the sites trained from")
    return ""


def local_model_vector(start: Mapping | None, vector: Mapping) -> dict:
    """start + d_j as a vector on the base (start is None in a one-round run)."""
    if not start:
        return dict(vector)
    out = {name: t.float().clone() for name, t in start.items()}
    for name, t in vector.items():
        out[name] = out[name] + t.float() if name in out else t.float().clone()
    return out


def merge_rule_of(report: dict):
    """The merge rule the report's `merge` section names, with its parameters (weighted-sum when it names none)."""
    from feddem.common.merging.rules import rule

    section = report.get("merge") or {}
    return rule(str(section.get("rule", "weighted-sum")), **(section.get("parameters") or {}))


def last_round_start(report: dict, aggregate: Mapping, vectors: Mapping[str, Mapping],
                     stats: Mapping[str, Mapping]) -> dict:
    """Where a multi-round run's last round started from, as a vector on the base: the run's aggregate (the sum of
    every round's merge) minus the last round's merge, which is the run's merge rule (`merge_rule_of`) applied to
    the sites' stored vectors, statistics (`stats[site]`: its merge-stats file, none for weighted-sum) and the last
    round's weights (`common.merging.rules.merge_plain`: the rule's own arithmetic, summed in the clear)."""
    from feddem.common.merging.rules import merge_plain

    merge_rule = merge_rule_of(report)
    weights = report["rounds"][-1]["weights"]
    missing = sorted(set(weights) - set(vectors))
    if missing:
        raise FeddemError(f"the last round merged {', '.join(missing)}, whose stored vector was not found")
    if merge_rule.statistics is not None:
        without = sorted(name for name in weights if name not in stats)
        if without:
            raise FeddemError(f"the run's '{merge_rule.name}' merge needs each site's statistics ({STATS_NAME}); "
                              f"not found for {', '.join(without)}")
    names = sorted(weights)
    last = merge_plain(merge_rule, [{k: t.float() for k, t in vectors[n].items()} for n in names],
                       [stats.get(n) for n in names], [float(weights[n]) for n in names])
    start = {name: t.float().clone() for name, t in aggregate.items()}
    for key, t in last.items():
        start[key] = start[key] - t.float() if key in start else -t.float()
    return start


def federated_matrix(names: dict[int, str], vector_of: Callable[[int], Mapping],
                     evaluate: Callable[[Mapping, list[int]], dict[int, tuple[str, float]]],
                     start: Mapping | None = None, own: Mapping[int, tuple[str, float]] | None = None,
                     diagonal: str = "") -> dict:
    """The matrix formed by the ServerApp of a plain run, one site's vector at a time: `vector_of(node)` gives d_j,
    `evaluate(vector, nodes)` asks those sites to evaluate base + vector and gives node -> (domain, loss). `own`
    (node -> (domain, loss)): the sites' own evaluations of their local models, which are the diagonal when given
    (`own_loss_differs` says when they are the same quantity): site j is then not asked about its own model again;
    `diagonal` says where the diagonal came from."""
    loss = {}
    nodes = sorted(names)
    for node, name in sorted(names.items(), key=lambda item: item[1]):
        ask = [n for n in nodes if not (own and n == node and n in own)]
        results = dict(evaluate(local_model_vector(start, vector_of(node)), ask)) if ask else {}
        if own and node in own:
            results[node] = own[node]
        loss[name] = {domain: value for domain, value in sorted(results.values())}
    return section(loss, BY_FEDERATION, diagonal=diagonal or (DIAGONAL_REUSED if own else ""))


def complete_in_simulation(cfg, result):
    """After a `feddem simulate` run whose ServerApp withheld the matrix (a secure run), form it here from the
    sites' stored vectors and the shards' test splits, and rewrite report.json/report.png. A run whose report has
    the matrix already, or none of this, is left as it is. Returns the result."""
    from feddem.server.report import write_report

    report = result.report
    if (report.get("cross_domain") or {}).get("status") != "withheld":
        return result
    started = time.perf_counter()
    try:
        report["cross_domain"] = simulation_matrix(cfg, report, result.out_dir)
        report["cross_domain"]["seconds"] = round(time.perf_counter() - started, 3)
    except FeddemError as exc:
        report["cross_domain"] = withheld() | {"simulation": f"the simulation driver could not form it: {exc}"}
        log.warning("cross-domain matrix: %s", exc)
    write_report(report, result.out_dir)
    return result


def simulation_matrix(cfg, report: dict, out_dir, work_dirs: dict | None = None) -> dict:
    """The matrix from the simulated sites' stored vectors (FEDDEM_HOME/sites/<site>/runs/<run-id>/, or under
    `work_dirs[site]`), on this machine. In a multi-round run the last round's start is recovered as the run's
    aggregate minus the last round's merge of the stored vectors (`last_round_start`; exact up to secure
    aggregation's quantization error and noise)."""
    import torch

    from feddem.common.site_context import SiteContext, vector_file
    from feddem.common.devices import resolve_device
    from feddem.common.modeling import load_model, load_tokenizer, model_checksum
    from feddem.common.vector_io import load_vector
    from feddem.server.ablation import test_sets

    if "flower_run_id" not in report:
        raise FeddemError("the report has no flower_run_id: cannot find the sites' stored vectors")
    sites = {s["site"]: s["domain"] for s in report["sites"]}
    vectors, stats_files = {}, {}
    for index in range(cfg.sites):
        site = SiteContext.from_node_config({"partition-id": index})
        if work_dirs and site.name in work_dirs:
            site.work_dir = Path(work_dirs[site.name])
        if site.name in sites:
            vectors[site.name] = load_vector(vector_file(site, int(report["flower_run_id"])))
            stats_files[site.name] = site.stats_path(int(report["flower_run_id"]))
    ref, checksum = report["base_model"]["ref"], report["base_model"]["checksum"]
    base = load_model(ref)
    if model_checksum(base) != checksum:
        raise FeddemError(f"the base model at '{ref}' is not the one the run used (checksum differs)")
    tokenizer = load_tokenizer(ref)
    tests = test_sets(cfg, tokenizer, sorted(set(sites.values())))
    start, note = None, ""
    if len(report.get("rounds", [])) > 1:
        stats = {name: load_vector(path) for name, path in stats_files.items() if path.is_file()}
        start = last_round_start(report, load_vector(Path(out_dir) / "aggregate.safetensors"), vectors, stats)
        note = ("multi-round run: each local model is the last round's start (the run's aggregate minus the last "
                f"round's merge of the stored vectors by the run's '{merge_rule_of(report).name}' rule, with the "
                "sites' stored statistics) plus the site's own vector")
    from feddem.server.ablation import pool_merge_loss

    device = resolve_device(cfg.device)
    differs = own_loss_differs(cfg, exact_start=start is None)
    own = {} if differs else own_losses(report)
    loss = {}
    for name in sorted(vectors):
        local = {"local": local_model_vector(start, vectors[name])}
        sets = {d: blocks for d, blocks in tests.items() if not (name in own and d == sites[name])}
        with torch.no_grad():
            loss[name] = pool_merge_loss(base, local, sets, tokenizer.pad_token_id, device)({"local": 1.0})
        if name in own:
            loss[name][sites[name]] = own[name]
        loss[name] = dict(sorted(loss[name].items()))
    log.info("cross-domain matrix formed by the simulation driver: %d site(s) x %d domain(s)", len(loss), len(tests))
    return section(loss, BY_SIMULATION, note, DIAGONAL_REUSED if own else differs)


def own_losses(report: dict) -> dict[str, float]:
    """Each site's own evaluation of its local model on its domain (the report's eval.local), by site; only the
    sites whose domain is no other site's (eval.local is by domain)."""
    domains = [s["domain"] for s in report["sites"]]
    local = (report.get("eval") or {}).get("local") or {}
    return {s["site"]: float(local[s["domain"]]["loss"]) for s in report["sites"]
            if domains.count(s["domain"]) == 1 and s["domain"] in local}
