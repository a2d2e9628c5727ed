"""Quality benchmark: feddem's merges against data mixing (the centralised bound) and Flower's FedAvg (the federated
peer), on the same base model, sites, seed and training tokens per site.

Everything is measured in this one script, on the test half of each site's held-out split (nats/token):
- `base`: the base model;
- `local/<domain>`: each site's own fine-tuned model;
- `data_mixing`: one model fine-tuned on the union of all sites' train splits for sites x steps steps;
- `fedavg/R`: Flower's FedAvg (`flwr.serverapp.strategy.FedAvg`) over the same sites, steps/R local steps per round;
- `merge/<strategy>`: feddem at R = 1 under every strategy (uniform, size, chameleon, dga, search). The sites are
  fine-tuned once by a real `feddem simulate` run (plain aggregation, a trusted run, so the bench may read the
  sites' vectors from their folders on this machine: the pool); each strategy's weights come from its own module
  with the same site-side signals the ClientApp computes (`client.signals`, `common.weighting.dga.alignment`);
- `feddem/R`: `feddem simulate --rounds R` (uniform weights), steps/R local steps per round.

Writes quality.json ({"mean_loss": {...}, "loss": {model: {domain: loss}}, ...}) and quality.png to --out.

    python bench/quality.py --out runs/quality                 # the embedded default (long on 2 CPU cores)
    python bench/quality.py --out runs/quality --steps 100 --rounds 1 2 4
"""

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

log = logging.getLogger("feddem.bench")


def _site_data(cfg, n_sites):
    from feddem.common.site_context import SiteContext
    from feddem.client.site import load_site_shard
    from feddem.common.data import heldout_blocks
    from feddem.common.data import pack_blocks
    from feddem.common.modeling import load_tokenizer
    from feddem.server.base_ref import resolve_base_ref

    tokenizer = load_tokenizer(resolve_base_ref(cfg))
    data = []
    for i in range(n_sites):
        shard = load_site_shard(cfg, SiteContext(i, f"site-{i}", Path(".")))
        data.append({"domain": shard.name, "train": pack_blocks(shard.train["text"], tokenizer, cfg.seq_len),
                     "validation": heldout_blocks(shard, tokenizer, cfg, "validation"),
                     "test": heldout_blocks(shard, tokenizer, cfg, "test")})
    return tokenizer, data


def _losses(model, data, tokenizer, split="test") -> dict[str, float]:
    from feddem.common.evaluation import evaluate_loss

    return {d["domain"]: evaluate_loss(model, d[split], tokenizer.pad_token_id, torch.device("cpu"))["loss"]
            for d in data}


def _merged(base, vectors, weights):
    from feddem.common.vectors import apply_vector, weighted_sum

    model = copy.deepcopy(base)
    apply_vector(model, weighted_sum(vectors, weights))
    return model


def data_mixing(cfg, base, data, tokenizer) -> dict[str, float]:
    from feddem.common.training import TrainSettings, train_causal_lm

    model = copy.deepcopy(base)
    union = torch.cat([d["train"] for d in data])
    settings = TrainSettings(steps=cfg.steps * len(data), lr=cfg.lr, batch_size=cfg.batch_size,
                             grad_accum=cfg.grad_accum, seed=cfg.seed)
    train_causal_lm(model, union, settings, torch.device("cpu"))
    return _losses(model, data, tokenizer)


def feddem_run(cfg, rounds: int) -> tuple[dict, Path]:
    from feddem.server.simulation import simulate

    run_cfg = replace(cfg, rounds=rounds, steps=max(1, cfg.steps // rounds),
                      out_dir=str(Path(cfg.out_dir) / f"feddem-R{rounds}"))
    result = simulate(run_cfg)
    return result.report, result.out_dir


def pool_vectors(home: Path, n_sites: int, since: float):
    """The sites' vectors of the latest run (the pool of a trusted run on this machine), in site order."""
    from feddem.common.vector_io import load_vector

    vectors = []
    for i in range(n_sites):
        found = [p for p in (home / "sites" / f"site-{i}" / "runs").glob("*/vector.safetensors")
                 if p.stat().st_mtime >= since]
        if len(found) != 1:
            raise RuntimeError(f"expected one new vector for site-{i}, found {len(found)}")
        vectors.append(load_vector(found[0]))
    return vectors


def strategy_merges(cfg, base, data, tokenizer, vectors, report) -> tuple[dict, dict]:
    """feddem at R = 1 under every strategy, on the same site vectors: (loss by strategy, weights by strategy)."""
    from feddem.client.signals import domain_embedding
    from feddem.common.weighting import ALIGNMENT, EMBEDDING, SiteReport, compute_weights
    from feddem.common.weighting.search import coordinate_search
    from feddem.common.weighting.dga import alignment, target_direction

    sites = {s["domain"]: s for s in report["sites"]}
    direction = target_direction(copy.deepcopy(base), tokenizer, cfg)
    reports = []
    for d, vector in zip(data, vectors):
        extra = {EMBEDDING: domain_embedding(base, d["train"], tokenizer.pad_token_id, torch.device("cpu")),
                 ALIGNMENT: alignment(vector, direction)}
        s = sites[d["domain"]]
        reports.append(SiteReport(s["site"], d["domain"], s["examples"], s["tokens"], s["train_loss"], extra))
    weights = {name: compute_weights(name, reports, replace(cfg, weighting=name), {})
               for name in ("uniform", "size", "chameleon", "dga")}

    def validation_score(candidate):
        losses = _losses(_merged(base, vectors, candidate), data, tokenizer, "validation")
        return sum(losses.values()) / len(losses)

    weights["search"], _, _ = coordinate_search(len(vectors), validation_score, cfg.search_budget, cfg.search_step,
                                                cfg.weight_min, cfg.weight_max)
    losses = {name: _losses(_merged(base, vectors, w), data, tokenizer) for name, w in weights.items()}
    return losses, weights


def fedavg(cfg, base, data, tokenizer, rounds: int) -> dict[str, float]:
    """Flower's FedAvg over the same sites: `rounds` rounds of steps/rounds local steps from the global model."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from feddem.common.training import TrainSettings, train_causal_lm
    from feddem.server.base_ref import resolve_base_ref
    from feddem.server.simulation import backend_config, loopback_environment

    steps = max(1, cfg.steps // rounds)
    ref = resolve_base_ref(cfg)
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context):  # a FedAvg site: its own data, the global model, steps/R local steps
        from feddem.common.site_context import SiteContext
        from feddem.client.site import load_site_shard
        from feddem.common.data import pack_blocks
        from feddem.common.modeling import load_model, load_tokenizer

        index = int(context.node_config["partition-id"])
        shard = load_site_shard(cfg, SiteContext(index, f"site-{index}", Path(".")))
        blocks = pack_blocks(shard.train["text"], load_tokenizer(ref), cfg.seq_len)
        model = load_model(ref)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        settings = TrainSettings(steps=steps, lr=cfg.lr, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                                 seed=cfg.seed + index)
        train_causal_lm(model, blocks, settings, torch.device("cpu"))
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": MetricRecord({"num-examples": int(blocks.shape[0])})}),
                       reply_to=msg)

    out: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=len(data),
                          min_available_nodes=len(data))
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(base.state_dict()), num_rounds=rounds,
                                train_config=ConfigRecord({"steps": steps}))
        out["state"] = result.arrays.to_torch_state_dict()

    loopback_environment()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(data),
                   backend_config=backend_config(cfg))
    if "state" not in out or set(out["state"]) != set(base.state_dict()):
        raise RuntimeError(f"FedAvg with {rounds} round(s) did not finish (see the log above)")
    model = copy.deepcopy(base)
    model.load_state_dict(out["state"])
    return _losses(model, data, tokenizer)


def plot(results: dict, rounds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = results["mean_loss"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(rounds, [mean[f"fedavg/{r}"] for r in rounds], "o-", label="Flower FedAvg")
    feddem_rounds = [1] + [r for r in rounds if r > 1]
    ax.plot(feddem_rounds, [mean["merge/uniform"]] + [mean[f"feddem/{r}"] for r in rounds if r > 1], "s-",
            label="feddem (uniform)")
    best = min((k for k in mean if k.startswith("merge/")), key=mean.get)
    ax.axhline(mean[best], color="tab:green", ls="--", label=f"best one-round merge ({best})")
    ax.axhline(mean["data_mixing"], color="black", ls=":", label="data mixing (centralised)")
    ax.axhline(mean["base"], color="grey", ls="-.", label="base")
    ax.set_xscale("log", base=2)
    ax.set_xticks(rounds, [str(r) for r in rounds])
    ax.set_xlabel("rounds (communication)")
    ax.set_ylabel("mean test loss over domains (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for quality.json, quality.png and the runs")
    parser.add_argument("--data", default="synthetic", help="data spec (default: the 4 synthetic domains)")
    parser.add_argument("--sites", type=int, default=0, help="sites (default: one per shard of --data)")
    parser.add_argument("--steps", type=int, default=200, help="local steps per site in all (default: 200)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the run config's)")
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--rounds", type=int, nargs="+", default=[1, 2, 4, 8], help="round counts (default: 1 2 4 8)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if 1 not in args.rounds:
        parser.error("--rounds must include 1")

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    from feddem.common.config import RunConfig
    from feddem.common.data import list_shards
    from feddem.common.modeling import load_model
    from feddem.server.base_ref import resolve_base_ref
    from feddem.server.simulation import check_local_inputs

    args.out.mkdir(parents=True, exist_ok=True)
    home = Path(os.environ.setdefault("FEDDEM_HOME", tempfile.mkdtemp(prefix="feddem-quality-")))
    n_sites = args.sites or len(list_shards(args.data))
    cfg = RunConfig(sites=n_sites, data=args.data, steps=args.steps, train_examples=args.train_examples,
                    seed=args.seed, aggregation="plain", out_dir=str(args.out), **({"lr": args.lr} if args.lr else {}))
    check_local_inputs(cfg)
    torch.set_num_threads(os.cpu_count() or 1)
    base = load_model(resolve_base_ref(cfg))
    tokenizer, data = _site_data(cfg, n_sites)
    timings, loss = {}, {}

    def timed(name, fn):
        start = time.perf_counter()
        log.info("%s ...", name)
        value = fn()
        timings[name] = round(time.perf_counter() - start, 1)
        log.info("%s: mean test loss %.4f (%.0f s)", name, sum(value.values()) / len(value), timings[name])
        return value

    loss["base"] = _losses(base, data, tokenizer)
    since = time.time()
    start = time.perf_counter()
    report, _ = feddem_run(cfg, 1)
    timings["feddem/1"] = round(time.perf_counter() - start, 1)
    for s in report["sites"]:
        loss[f"local/{s['domain']}"] = {s["domain"]: report["eval"]["local"][s["domain"]]["loss"]}
    vectors = pool_vectors(home, n_sites, since)
    merges, weights = strategy_merges(cfg, base, data, tokenizer, vectors, report)
    for name, value in merges.items():
        loss[f"merge/{name}"] = value
    for r in args.rounds:
        loss[f"fedavg/{r}"] = timed(f"fedavg/{r}", lambda r=r: fedavg(cfg, base, data, tokenizer, r))
        if r > 1:
            loss[f"feddem/{r}"] = timed(f"feddem/{r}", lambda r=r: {
                d: v["loss"] for d, v in feddem_run(cfg, r)[0]["eval"]["merged"].items()})
    loss["data_mixing"] = timed("data_mixing", lambda: data_mixing(cfg, base, data, tokenizer))

    mean = {k: sum(v.values()) / len(v) for k, v in loss.items() if not k.startswith("local/")}
    mean["local (own domain)"] = sum(report["eval"]["local"][d]["loss"] for d in report["eval"]["local"]) / n_sites
    results = {"mean_loss": mean, "loss": loss, "weights": weights, "timings": timings,
               "settings": {"sites": n_sites, "steps": args.steps, "lr": cfg.lr, "rounds": args.rounds,
                            "data": args.data, "train_examples": args.train_examples, "seed": args.seed}}
    best_merge = min((k for k in mean if k.startswith("merge/")), key=mean.get)
    best_feddem = min((k for k in mean if k.startswith(("merge/", "feddem/"))), key=mean.get)
    results["targets"] = {
        "every_merge_below_base_on_every_domain": all(
            loss[k][d] < loss["base"][d] for k in loss if k.startswith("merge/") for d in loss["base"]),
        "best_one_round_merge_at_or_below_fedavg_2": mean[best_merge] <= mean.get("fedavg/2", float("inf")),
        "feddem_R_at_or_below_fedavg_R": {r: mean[f"feddem/{r}"] <= mean[f"fedavg/{r}"]
                                          for r in args.rounds if r > 1} | {1: mean[best_merge] <= mean["fedavg/1"]},
        "best_feddem_at_or_below_data_mixing": mean[best_feddem] <= mean["data_mixing"],
        "best_feddem_over_data_mixing": mean[best_feddem] / mean["data_mixing"],
    }
    (args.out / "quality.json").write_text(json.dumps(results, indent=1))
    plot(results, args.rounds, args.out / "quality.png")

    domains = list(loss["base"])
    print(f"\n{'model':<22}" + "".join(f"{d:>12}" for d in domains) + f"{'mean':>10}")
    for name, value in loss.items():
        if name.startswith("local/"):
            continue
        print(f"{name:<22}" + "".join(f"{value[d]:>12.4f}" for d in domains) + f"{mean[name]:>10.4f}")
    print(f"{'local (own domain)':<22}" + "".join(f"{report['eval']['local'][d]['loss']:>12.4f}" for d in domains)
          + f"{mean['local (own domain)']:>10.4f}")
    print(f"\ntargets: {json.dumps(results['targets'], indent=1)}")
    print(f"\n{args.out / 'quality.json'}, {args.out / 'quality.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
