"""Merge rules on the same site vectors: how much of each site's own gain a one-round merge keeps.

The sites are fine-tuned once, in process (`client.site.fine_tune`, no Ray), on the run's data (default: the four
synthetic domains of the embedded model); then, on the test half of each site's held-out split, every variant is
scored by the kept share per domain, (base - merged) / (base - local), where local is the site's own dense model:

- weights: `uniform` (1/n), `uniform x2` (2/n: the scale alone), `search` (`common.weighting.search`, scale and
  shape, scored on the validation half as the server's search is), `search-noscale` (the old one-weight-at-a-time
  search, for comparison);
- sparsification (`common.sparsify`) of each site's vector before the merge: none, dare:0.5, dare:0.9, topk:0.2;
- merge rules from sums (`common.merging`): `fisher` and `regmean` (each site's statistics computed on its own
  train blocks with its fine-tuned dense model), under uniform, uniform x2 and search weights, with the upload
  (floats per site, as a multiple of the vector) and the time of the statistics and of the server's combine.

Writes merge_rules.json to --out and prints a table.

    python bench/merge_rules.py --out /tmp/merge-rules --steps 100
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import _losses, _merged, site_data, site_statistics  # noqa: E402  (the quality bench's helpers)

log = logging.getLogger("feddem.bench")
SPARSIFY = ("none", "dare:0.5", "dare:0.9", "topk:0.2")
CPU = torch.device("cpu")


def train_sites(cfg, ref: str, work: Path):
    """Each site fine-tuned once: its vector (dense, as stored with sparsify none)."""
    from feddem.client.site import fine_tune
    from feddem.common.site_context import SiteContext
    from feddem.common.vector_io import load_vector

    vectors = []
    for i in range(cfg.sites):
        site = SiteContext.from_node_config({"partition-id": i, "work-dir": str(work / f"site-{i}")})
        fine_tune(cfg, site, ref, "", run_id=1)
        vectors.append({k: v.clone() for k, v in load_vector(site.vector_path(1)).items()})
    return vectors


def rule_rows(args, cfg, base, dense, data, tokenizer, score, mean_validation) -> dict:
    """Every merge rule from sums under uniform, uniform x2 and search weights (no sparsification)."""
    from feddem.common.merging.rules import merge_plain, rule
    from feddem.common.weighting.search import coordinate_search

    n, rows = len(dense), {}
    size = sum(t.numel() for t in dense[0].values())
    for name in args.rules:
        merge_rule = rule(name)
        start = time.perf_counter()
        stats = site_statistics(merge_rule, base, dense, data, args.stat_examples)
        stats_seconds = (time.perf_counter() - start) / n
        parts = merge_rule.site_parts(dense[0], stats[0], 1.0)
        upload = sum(t.numel() for part in parts.values() for t in part.values()) / size

        def merged(weights):
            return merge_plain(merge_rule, dense, stats, weights)

        weights = {"uniform": [1 / n] * n, "uniform x2": [2 / n] * n}
        weights["search"], _, _ = coordinate_search(n, lambda w: mean_validation([merged(w)], [1.0]),
                                                    cfg.search_budget, cfg.search_step, cfg.weight_min,
                                                    cfg.weight_max)
        for label, w in weights.items():
            start = time.perf_counter()
            vector = merged(w)
            combine_seconds = time.perf_counter() - start
            row = score([vector], [1.0])
            rows[f"{label} / {name}"] = row | {"weights": w, "weight_scale": sum(w), "upload_x": upload,
                                               "stats_seconds": stats_seconds, "merge_seconds": combine_seconds}
            log.info("%-28s scale %.3f mean loss %.4f kept %s (upload %.2fx, stats %.1f s/site)", f"{label} / {name}",
                     sum(w), row["mean_loss"], row["kept"], upload, stats_seconds)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--search-budget", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rules", nargs="*", default=["fisher", "regmean"], choices=["fisher", "regmean"],
                        help="merge rules from sums to compare (default: fisher regmean; none: skip)")
    parser.add_argument("--stat-examples", type=int, default=32,
                        help="train blocks per site for the rules' statistics (default: 32)")
    parser.add_argument("--sparsify", nargs="*", default=list(SPARSIFY), help=f"variants (default: {' '.join(SPARSIFY)})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("FEDDEM_HOME", tempfile.mkdtemp(prefix="feddem-merge-"))

    from feddem.common.config import RunConfig
    from feddem.common.data import list_shards
    from feddem.common.modeling import load_model
    from feddem.common.sparsify import sparsify
    from feddem.common.weighting.search import coordinate_search
    from feddem.server.base_ref import resolve_base_ref
    from feddem.server.report import kept_share

    args.out.mkdir(parents=True, exist_ok=True)
    n = len(list_shards(args.data))
    cfg = RunConfig(sites=n, data=args.data, steps=args.steps, train_examples=args.train_examples, seed=args.seed,
                    aggregation="plain", device="cpu", search_budget=args.search_budget)
    ref = resolve_base_ref(cfg)
    base = load_model(ref)
    from feddem.common.modeling import load_tokenizer

    tokenizer = load_tokenizer(ref)
    data = site_data(cfg, n, tokenizer)
    start = time.perf_counter()
    dense = train_sites(cfg, ref, Path(os.environ["FEDDEM_HOME"]) / "merge-sites")
    log.info("sites trained in %.0f s", time.perf_counter() - start)
    domains = [d["domain"] for d in data]
    base_loss = _losses(base, data, CPU)
    local = {d: _losses(_merged(base, [v], [1.0]), [x], CPU)[d] for d, v, x in zip(domains, dense, data)}

    def mean_validation(vectors, weights) -> float:
        losses = _losses(_merged(base, vectors, weights), data, CPU, "validation")
        return sum(losses.values()) / len(losses)

    def score(vectors, weights) -> dict:
        merged = _losses(_merged(base, vectors, weights), data, CPU)
        kept = {d: kept_share(base_loss[d], local[d], merged[d])[0] for d in domains}
        return {"loss": merged, "kept": kept, "mean_loss": sum(merged.values()) / n,
                "worst_kept": min((k for k in kept.values() if k is not None), default=float("nan"))}

    rows = {}
    for spec in args.sparsify:
        vectors = [{k: t.clone() for k, t in sparsify(v, spec, f"site-{i}|bench".encode()).items()}
                   for i, v in enumerate(dense)]
        weights = {"uniform": [1 / n] * n, "uniform x2": [2 / n] * n, "uniform x4": [min(4 / n, 1.0)] * n}
        weights["search"], _, _ = coordinate_search(n, lambda w: mean_validation(vectors, w), cfg.search_budget,
                                                     cfg.search_step, cfg.weight_min, cfg.weight_max)
        weights["search-noscale"], _, _ = coordinate_search(n, lambda w: mean_validation(vectors, w),
                                                            cfg.search_budget, cfg.search_step, cfg.weight_min,
                                                            cfg.weight_max, scale=False)
        for name, w in weights.items():
            rows[f"{name} / {spec}"] = score(vectors, w) | {"weights": w, "weight_scale": sum(w), "upload_x": 1.0}
            row = rows[f"{name} / {spec}"]
            log.info("%-28s scale %.3f mean loss %.4f kept %s", f"{name} / {spec}", sum(w), row["mean_loss"],
                     row["kept"])
    rows |= rule_rows(args, cfg, base, dense, data, tokenizer, score, mean_validation)
    result = {"base": base_loss, "local": local, "rows": rows,
              "settings": {"sites": n, "steps": args.steps, "data": args.data, "seed": args.seed,
                           "search_budget": args.search_budget}}
    (args.out / "merge_rules.json").write_text(json.dumps(result, indent=2))
    print(f"{'variant':30s} {'scale':>6s} {'upload':>6s} {'mean':>7s} " + " ".join(f"{d[:10]:>10s}" for d in domains)
          + "  worst")
    for name, row in rows.items():
        print(f"{name:30s} {row['weight_scale']:6.3f} {row['upload_x']:5.2f}x {row['mean_loss']:7.4f} "
              + " ".join(f"{row['kept'][d]:10.2f}" if row['kept'][d] is not None else f"{'-':>10s}" for d in domains) + f"  {row['worst_kept']:.2f}")
    print(f"base mean {sum(base_loss.values()) / n:.4f}, local mean {sum(local.values()) / n:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
