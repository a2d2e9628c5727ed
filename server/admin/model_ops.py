"""What the feddem server computes from its store: re-merges of a trusted run's site vectors, evaluation of a run's
merged model on data the server holds, and the ranking of candidate mixtures from a run's pool.

Everything read from the store is verified against its recorded sha256 first. Problems come out as StoreErrors
(the admin API turns them into gRPC statuses): an unknown run is NOT_FOUND, a run that does not allow it
FAILED_PRECONDITION, bad weights or data INVALID_ARGUMENT.
"""

import tempfile
from dataclasses import replace
from pathlib import Path

from feddem.common.config import RunConfig
from feddem.common.errors import FeddemError
from feddem.server.admin.recorder import LocalRecorder, record_outputs
from feddem.server.manifest import AGGREGATE, MODEL
from feddem.server.store import Store
from feddem.server.store.errors import FailedPrecondition, InvalidArgument, StoreError
from feddem.server.store.validate import quote
from feddem.common.weighting.weights import check_range

TRUSTED = "plain"  # the aggregation of a run whose site vectors the server may hold


def run_config(run: dict) -> RunConfig:
    import json

    try:
        return RunConfig.from_record(json.loads(run["config_json"]))
    except (FeddemError, ValueError) as exc:
        raise FailedPrecondition(f"run {run['run_id']} has a config this feddem cannot read: {exc}") from None


def pool_artefacts(store: Store, run: dict) -> dict[str, dict]:
    """A trusted run's stored site vectors (artefact records) by site name; FAILED_PRECONDITION for other runs."""
    if run["aggregation"] != TRUSTED or run["status"] != "finished":
        raise FailedPrecondition(f"run {run['run_id']} is a {run['aggregation'] or 'unknown'}-aggregation run "
                                 f"({run['status']}): only finished trusted (plain) runs made with --keep-pool have "
                                 f"site vectors on the server; a secure run's vectors never leave the sites")
    stored = {Path(a["name"]).stem: a for a in store.artefacts(run["run_id"], "site-vector")}
    if not stored:
        raise FailedPrecondition(f"run {run['run_id']} holds no site vectors (run it with --aggregation plain "
                                 f"--keep-pool to keep them)")
    return stored


def load_site_vectors(store: Store, run_id: str, stored: dict[str, dict]) -> dict:
    """The vectors of `pool_artefacts`, each file verified against its record and its own digest."""
    from feddem.common.vector_io import load_vector

    vectors = {}
    for site, a in stored.items():
        path = store.files.verify(run_id, a["name"], a["size"], a["sha256"])
        try:
            vectors[site] = load_vector(path, verify=True)
        except Exception as exc:  # safetensors raises its own types for a file that is not one
            raise FailedPrecondition(f"the stored vector of {site} in run {run_id} cannot be read: {exc}") from None
    return vectors


def base_model(run: dict):
    """The run's base model, loaded from the reference it was recorded with and checked against its checksum."""
    from feddem.common.modeling import load_model, model_checksum

    try:
        model = load_model(run["base_ref"])
    except Exception as exc:  # FeddemError, or what transformers/safetensors raise for a broken folder
        raise FailedPrecondition(f"the base model of run {run['run_id']} is not available on the server: {exc}") \
            from None
    if model_checksum(model) != run["base_checksum"]:
        raise FailedPrecondition(f"the base model at '{run['base_ref']}' differs from the one run {run['run_id']} "
                                 f"used (checksum)")
    return model


def stored_tokenizer(store: Store, run_id: str):
    """The tokenizer of a run's stored model (verified first); FAILED_PRECONDITION when it cannot be loaded."""
    from feddem.common.modeling import load_tokenizer

    folder = store.verified_folder(run_id, "model", "model")
    try:
        return load_tokenizer(str(folder))
    except Exception as exc:  # FeddemError, or what transformers raises for a broken folder
        raise FailedPrecondition(f"the stored model of run {run_id} cannot be loaded: {str(exc)[:300]}") from None


def check_weights(weights: dict[str, float], sites: list[str], cfg: RunConfig) -> dict[str, float]:
    """Every site's weight (0 for those not named), refused unless each names a stored site, is finite and within
    the run's [weight-min, weight-max], and at least one is nonzero."""
    if not weights:
        raise InvalidArgument(f"no weights given: name at least one site ({', '.join(sites)})")
    unknown = sorted(set(weights) - set(sites))
    if unknown:
        raise InvalidArgument(f"unknown site(s) {', '.join(map(repr, unknown))}: the run's sites are "
                              f"{', '.join(sites)}")
    check_range(weights, cfg.weight_min, cfg.weight_max, "the run's range", error=InvalidArgument)
    if not any(weights.values()):
        raise InvalidArgument("every weight is 0: the merge would be the base model")
    return {s: float(weights.get(s, 0.0)) for s in sites}


def remerge(store: Store, run_id: str, weights: dict[str, float]) -> str:
    """A new run (kind remerge, parent `run_id`): base + sum_i w_i d_i from the run's stored site vectors, exported
    the way a run exports its merged model (server.export.export_model), with its model card."""
    run = store.get_run(run_id)
    stored = pool_artefacts(store, run)
    cfg = run_config(run)
    full = check_weights(dict(weights), sorted(stored), cfg)
    from feddem.common.vector_io import save_vector  # after the checks: a refusal is quick
    from feddem.common.vectors import weighted_sum
    from feddem.server.export import export_model
    from feddem.server.model_card import write_model_card

    vectors = load_site_vectors(store, run_id, stored)
    base_model(run)  # loaded to check that the base on this server is the run's (checksum)
    aggregate = weighted_sum([vectors[s] for s in full], list(full.values()))
    tokenizer = stored_tokenizer(store, run_id)
    parent_report = store.report(run_id)
    report = {  # the weights were given by hand: the config says so
        "config": parent_report.get("config", {}) | {"weighting": "manual",
                                                     "weights": ",".join(f"{s}={w!r}" for s, w in full.items())},
        "base_model": parent_report["base_model"],
        "aggregation": TRUSTED,
        "sites": [s for s in parent_report["sites"] if s["site"] in full],
        "weights": full,
        "eval": {},
        "failures": {},
        "timings": {},
        "remerge_of": run_id,
    }
    recorder = LocalRecorder(store)
    new = recorder.begin(report["config"], kind="remerge", parent_run=run_id)
    try:
        with tempfile.TemporaryDirectory(prefix="feddem-remerge-") as tmp:
            out = Path(tmp)
            export_model(run["base_ref"], aggregate, out / MODEL, cfg.max_shard_bytes)
            tokenizer.save_pretrained(out / MODEL)  # the run's own tokenizer, as stored
            write_model_card(out / MODEL, report)
            save_vector(aggregate, out / AGGREGATE, metadata={"weights": str(full)})
            record_outputs(recorder, new, out, report)
    except BaseException as exc:
        recorder.fail(new, f"remerge failed: {exc}")
        raise
    return new


MAX_DATA_SPEC = 1024  # characters of a data spec


def check_data(spec: str, roots: tuple[Path, ...]) -> str:
    """The data a server-side evaluation may read, refused (INVALID_ARGUMENT) before anything is read or loaded: a
    synthetic spec, or a folder inside one of the operator's data roots (`feddem server --data-root DIR`), given
    absolute or relative to a root. Returns the spec to load (a folder resolved, symbolic links followed)."""
    from feddem.common.data import SYNTHETIC, list_shards

    if len(spec) > MAX_DATA_SPEC or "\0" in spec:
        raise InvalidArgument(f"data spec {quote(spec)} is not a spec (at most {MAX_DATA_SPEC} characters)")
    if spec == SYNTHETIC or spec.startswith(SYNTHETIC + ":"):
        try:
            list_shards(spec)
        except FeddemError as exc:
            raise InvalidArgument(str(exc)) from None
        return spec
    if not roots:
        raise InvalidArgument(f"data {quote(spec)}: this feddem server reads no data folders (start it with "
                              f"`feddem server --data-root DIR` to allow folders under DIR; `synthetic` needs none)")
    path = Path(spec)
    for candidate in [path] if path.is_absolute() else [root / path for root in roots]:
        try:
            resolved = candidate.resolve()
            inside = any(resolved.is_relative_to(root) for root in roots) and resolved.is_dir()
        except (OSError, RuntimeError):  # a name too long, a loop of links
            continue
        if inside:
            try:
                list_shards(str(resolved))
            except (FeddemError, OSError) as exc:
                raise InvalidArgument(f"data {quote(spec)}: {str(exc)[:300]}") from None
            return str(resolved)
    raise InvalidArgument(f"data {quote(spec)} is not a folder inside the server's data roots "
                          f"({', '.join(map(str, roots))})")


def evaluation_sets(cfg: RunConfig, data: str, tokenizer) -> dict:
    """The held-out test blocks of each shard of `data` (a spec `check_data` returned), by domain."""
    from feddem.server.ablation import test_sets

    cfg = replace(cfg, data=data)
    try:
        return test_sets(cfg, tokenizer)
    except FeddemError as exc:
        raise InvalidArgument(f"data '{cfg.data}': {exc}") from None


def _losses(model, sets: dict, pad_id: int) -> dict[str, dict]:
    import torch

    from feddem.common.evaluation import evaluate_loss

    return {domain: evaluate_loss(model, blocks, pad_id, torch.device("cpu")) for domain, blocks in sets.items()}


def evaluate(store: Store, run_id: str, data: str, roots: tuple[Path, ...] = ()) -> dict[str, dict]:
    """Held-out loss per domain of the run's merged model on `data` (default: the run's own data spec; either
    inside the data `roots`); recorded as metrics of stage `server:<data>`."""
    run = store.get_run(run_id)
    if not run["has_model"]:
        raise FailedPrecondition(f"run {run_id} holds no merged model (status {run['status']})")
    cfg = run_config(run)
    spec = check_data(data or cfg.data, roots)
    from feddem.common.modeling import load_model, load_tokenizer  # after the checks: a refusal is quick

    folder = str(store.verified_folder(run_id, "model", "model"))
    try:
        model, tokenizer = load_model(folder), load_tokenizer(folder)
    except Exception as exc:  # FeddemError, or what transformers/safetensors raise for a broken folder
        raise FailedPrecondition(f"the stored model of run {run_id} cannot be loaded: {str(exc)[:300]}") from None
    results = _losses(model, evaluation_sets(cfg, spec, tokenizer), tokenizer.pad_token_id)
    store.add_metrics(run_id, f"server:{(data or cfg.data)[:200]}", results)
    return results


def rank_pool(store: Store, run_id: str, candidates: str, data: str, roots: tuple[Path, ...] = ()) -> list[dict]:
    """Candidate mixtures (subsets of the run's sites) ranked by the mean held-out loss of the average of their
    stored vectors (server/ablation.py's ranking)."""
    run = store.get_run(run_id)
    stored = pool_artefacts(store, run)
    import torch  # after the first checks: a refusal is quick

    from feddem.server.ablation import parse_candidates, pool_merge_loss, rank_candidates

    names = sorted(stored)
    try:
        chosen = parse_candidates(candidates, names)
    except FeddemError as exc:
        raise InvalidArgument(str(exc)) from None
    spec = check_data(data or run_config(run).data, roots)
    vectors = load_site_vectors(store, run_id, stored)
    base = base_model(run)
    tokenizer = stored_tokenizer(store, run_id)
    sets = evaluation_sets(run_config(run), spec, tokenizer)

    merge_loss = pool_merge_loss(base, vectors, sets, tokenizer.pad_token_id, torch.device("cpu"))

    try:
        return rank_candidates(chosen, names, merge_loss, sorted(sets))
    except StoreError:
        raise
    except FeddemError as exc:
        raise InvalidArgument(str(exc)) from None
