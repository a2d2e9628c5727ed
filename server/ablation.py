"""Data ablations by merging (Na et al.): rank candidate data mixtures, subsets of the sites, by the held-out loss of
the average of their vectors, instead of training a model on each mixture.

A candidate is a subset S of the sites; its merge is base + sum_{i in S} d_i / |S|. Candidates come as an explicit
list (`site-0,site-1;site-2,site-3`) or as every subset up to a size (`2`). Where the vectors are depends on the
run: a trusted (plain) run with `keep-pool` keeps them in its folder (`pool/`), and `feddem ablate` merges them
there; in a secure run they never leave the sites, so `--ablate` makes every candidate one more secure aggregation
(zero weight outside S), which the sites' guards allow only within their aggregation budget (with noise).
"""

import itertools
import json
from collections.abc import Callable
from pathlib import Path

from feddem.common.errors import FeddemError
from feddem.server.manifest import POOL_DIR

POOL = POOL_DIR  # folder of a trusted run: one safetensors vector per site (named in `server.manifest`)


def parse_candidates(spec: str, names: list[str], min_size: int = 1) -> list[tuple[str, ...]]:
    """The candidate subsets of `names` that `spec` names: 'K' (every subset of size min_size..K) or
    'a,b;c,d' (those subsets)."""
    spec = spec.strip()
    if not spec:
        raise FeddemError("ablation: no candidates given (a size K, or subsets like 'site-0,site-1;site-2,site-3')")
    if spec.isdigit():
        size = int(spec)
        if not 1 <= size <= len(names):
            raise FeddemError(f"ablation: subset size {size} must be between 1 and the {len(names)} sites")
        if size < min_size:
            raise FeddemError(f"ablation: subsets of at most {size} site(s), but each candidate needs at least "
                              f"{min_size} here (the privacy guard's min-peers)")
        return [c for k in range(min_size, size + 1) for c in itertools.combinations(sorted(names), k)]
    candidates = []
    for part in (p.strip() for p in spec.split(";")):
        if not part:
            continue
        members = tuple(sorted({m.strip() for m in part.split(",") if m.strip()}))
        unknown = [m for m in members if m not in names]
        if unknown:
            raise FeddemError(f"ablation: unknown site(s) {unknown} in '{part}' (sites: {', '.join(names)})")
        if len(members) < min_size:
            raise FeddemError(f"ablation: candidate '{part}' has {len(members)} site(s); each needs at least "
                              f"{min_size} here (the privacy guard's min-peers)")
        candidates.append(members)
    if not candidates:
        raise FeddemError(f"ablation: no candidate in '{spec}'")
    return candidates


def candidate_weights(candidate: tuple[str, ...], names: list[str]) -> dict[str, float]:
    """The uniform average over the candidate's sites; 0 for the others."""
    return {name: (1.0 / len(candidate) if name in candidate else 0.0) for name in names}


def rank_candidates(candidates: list[tuple[str, ...]], names: list[str],
                    merge_loss: Callable[[dict[str, float]], dict[str, float]],
                    domains: list[str] | None = None) -> list[dict]:
    """Score each candidate by the mean loss of its merge over `domains` (default: every domain evaluated);
    returns rows sorted best first. A candidate that cannot be merged (a guard refuses) ends the ranking there,
    with its reason in the last row."""
    rows = []
    for candidate in candidates:
        try:
            losses = merge_loss(candidate_weights(candidate, names))
        except FeddemError as exc:
            rows.append({"candidate": list(candidate), "error": str(exc)})
            break
        chosen = domains or sorted(losses)
        missing = [d for d in chosen if d not in losses]
        if missing:
            raise FeddemError(f"ablation: no loss for domain(s) {missing} (evaluated: {', '.join(sorted(losses))})")
        rows.append({"candidate": list(candidate), "loss": {d: losses[d] for d in chosen},
                     "mean_loss": sum(losses[d] for d in chosen) / len(chosen)})
    scored = sorted((r for r in rows if "mean_loss" in r), key=lambda r: r["mean_loss"])
    return scored + [r for r in rows if "error" in r]


def test_sets(cfg, tokenizer, domains: list[str] | None = None) -> dict:
    """The test half of the held-out split of each shard of `cfg.data` (only `domains` when given), as token blocks
    by domain: what a pool's merges are scored on, here and on the feddem server."""
    from feddem.common.data import heldout_blocks, list_shards, load_run_shard

    shards = list_shards(cfg.data)
    wanted = domains or shards
    unknown = [d for d in wanted if d not in shards]
    if unknown:
        raise FeddemError(f"evaluation domain(s) {unknown} are not in data '{cfg.data}' ({', '.join(shards)})")
    sets = {}
    for index, name in enumerate(shards):
        if name in wanted:
            shard = load_run_shard(cfg, index)
            sets[shard.name] = heldout_blocks(shard, tokenizer, cfg, "test")
    return sets


def pool_merge_loss(base, vectors: dict, sets: dict, pad_id: int, device
                    ) -> Callable[[dict[str, float]], dict[str, float]]:
    """The scorer `rank_candidates` needs for a pool held in memory: weights -> loss per domain of
    base + sum_i w_i d_i on `sets` (the base model itself is left as it is)."""
    import copy

    from feddem.common.evaluation import evaluate_loss
    from feddem.common.vectors import apply_vector, weighted_sum

    names = sorted(vectors)

    def merge_loss(weights: dict[str, float]) -> dict[str, float]:
        model = copy.deepcopy(base)
        members = [n for n in names if weights[n]]
        apply_vector(model, weighted_sum([vectors[n] for n in members], [weights[n] for n in members]))
        return {d: evaluate_loss(model, blocks, pad_id, device)["loss"] for d, blocks in sets.items()}

    return merge_loss


def write_ablation(rows: list[dict], out: Path) -> None:
    """ablation.json (the ranking) and ablation.png: by candidate, best first, the mean loss of its merge on an axis
    from zero (labelled with the value), and beside it how much worse than the best candidate it is, so that small
    differences between candidates show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps({"ranking": rows}, indent=1))
    scored = [r for r in rows if "mean_loss" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, max(2.5, 0.35 * len(scored) + 1.2)), sharey=True,
                                      gridspec_kw={"width_ratios": [3, 2]})
    labels = ["+".join(r["candidate"]) for r in scored]
    ys = range(len(scored))
    losses = [r["mean_loss"] for r in scored]
    bars = left.barh(ys, losses, color="#4c72b0")
    left.bar_label(bars, fmt="%.4f", fontsize=6, padding=2)
    left.set_xlim(0, max(losses + [0]) * 1.18 or 1)
    left.set_yticks(ys, labels, fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("mean held-out loss of the merge (nats/token)", fontsize=8)
    best = min(losses) if losses else 0.0
    gaps = [loss - best for loss in losses]
    bars = right.barh(ys, gaps, color="#dd8452")
    right.bar_label(bars, labels=[f"+{g:.4f}" for g in gaps], fontsize=6, padding=2)
    right.set_xlim(0, max(gaps + [0]) * 1.25 or 1)
    right.set_xlabel("worse than the best candidate by (nats/token)", fontsize=8)
    fig.suptitle("candidate mixtures ranked by merging (best first)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "ablation.png", dpi=120)
    plt.close(fig)


def print_ranking(rows: list[dict]) -> None:
    for i, row in enumerate(rows, 1):
        if "error" in row:
            print(f"  --  {'+'.join(row['candidate'])}: not scored ({row['error']})")
        else:
            print(f"{i:>4}  {row['mean_loss']:.4f}  {'+'.join(row['candidate'])}")


def ablate_pool(run_dir: Path, spec: str, data: str = "", domains: list[str] | None = None,
                out: Path | None = None) -> list[dict]:
    """`feddem ablate`: rank candidate mixtures from a trusted run's pool, evaluating each merge on the test splits
    of the data this machine holds (the run's data spec unless `data` is given); writes ablation.json/png."""
    from feddem.common.config import RunConfig
    from feddem.common.devices import resolve_device
    from feddem.common.modeling import load_model, load_tokenizer, model_checksum
    from feddem.common.vector_io import load_vector
    from feddem.server.report import read_report

    run_dir = Path(run_dir)
    if not (run_dir / "report.json").is_file():
        raise FeddemError(f"'{run_dir}' is not a feddem run folder (no report.json)")
    report = read_report(run_dir)
    files = sorted((run_dir / POOL).glob("*.safetensors"))
    if not files:
        raise FeddemError(f"run '{run_dir}' has no pool: only trusted (plain) runs with --keep-pool keep the sites' "
                          f"vectors; in a secure run the vectors stay at the sites, so rank mixtures during the run "
                          f"with --ablate (each candidate is one more secure aggregation)")
    cfg = RunConfig.from_record(report["config"] | ({"data": data} if data else {}))
    ref, checksum = report["base_model"]["ref"], report["base_model"]["checksum"]
    base = load_model(ref)
    if model_checksum(base) != checksum:
        raise FeddemError(f"the base model at '{ref}' is not the one the run used (checksum differs)")
    tokenizer = load_tokenizer(ref)
    vectors = {path.stem: load_vector(path, verify=True) for path in files}
    names = sorted(vectors)
    tests = test_sets(cfg, tokenizer, domains)
    merge_loss = pool_merge_loss(base, vectors, tests, tokenizer.pad_token_id, resolve_device(cfg.device))
    rows = rank_candidates(parse_candidates(spec, names), names, merge_loss, sorted(tests))
    write_ablation(rows, Path(out) if out else run_dir)
    return rows
