"""Quality benchmark: feddem's merges against data mixing (the centralised bound) and Flower's FedAvg (the federated
peer), on the same base model, sites, seed and training tokens per site.

Everything is measured in this one script, on the test half of each site's held-out split (nats per scored token:
every token of text data, the assistant tokens of instruction/chat data), with the sites' own data path
(`common.data.encode_train` / `client.site.heldout_blocks`: chat templates, prompt tokens masked):
- `base`: the base model;
- `local/<domain>`: each site's own fine-tuned model (on its own domain);
- `data_mixing`: one model fine-tuned on the union of the sites' training sequences for sites x steps steps;
- `fedavg/R`: Flower's FedAvg (`flwr.serverapp.strategy.FedAvg`) over the same sites, steps/R local steps per round
  (under LoRA it averages what the sites train: the LoRA adapters, FedIT-style, from one shared initialisation);
- `merge/<strategy>`: feddem at R = 1 under every strategy (uniform, size, chameleon, dga, search). The sites are
  fine-tuned once by a real `feddem simulate` run (its aggregation: `--aggregation`, secure by default); the sites'
  vectors stay in their folders on this machine (FEDDEM_HOME/sites/), where the bench reads them (a simulation:
  one user owns every site); each strategy's weights come from its own module with the same site-side signals the
  ClientApp computes (`client.signals`);
- `merge/uniform+<rule>`, `merge/search+<rule>` (`--merge-rules`, default fisher and regmean): the merge rules from
  sums (`common.merging.rules`) on the same site vectors, with uniform weights and with the search's (scored on the
  validation split, as for the weighted sum). Each site's statistics are computed as the site computes them
  (`client.merge_parts`): with its own fine-tuned dense model (the base plus its vector) on its own train data, on
  the ClientApp's example count (the run config's `merge_examples`). Per rule the bench also
  records the upload as a multiple of the vector, the statistics' seconds per site and the server's combine
  seconds (quality.json "merge_rules", the second table of quality.md);
- `feddem/R`: `feddem simulate --rounds R` (uniform weights), steps/R local steps per round;
- `feddem/R+<rule>` (`--rule-rounds R...`, default none): `feddem simulate --merge <rule> --rounds R`, for each of
  --merge-rules.

The targets (quality.json "targets") and the plot's "best one-round merge" take the best of every one-round merge
(any strategy, any merge rule), and the best feddem row of every rule.

Under `--lora` (the default with `--model`) each site's vector is its LoRA update as dense deltas of the adapted
weights (`common.vectors.extract_lora_vector`), as in the ClientApp.

Data: `--data real` (the default with `--model`) builds four domains from text on this machine
(`bench/real_domains.py`: two instruction/chat domains, two text domains) under --out/data; any data spec works.

Presets: `--preset cpu` is sized for 2 idle CPU cores (about an hour with SmolLM2-135M), `--preset gpu` for one
H100-class GPU; explicit options override the preset. Writes quality.json, quality.md (the table, and the merge
rules' table) and quality.png to --out.

Every stage (each run, the merges, each rule's merges, each rule's runs) is kept in --out/stages.json as it
finishes; `--resume` takes the finished ones from there (it refuses other settings; --merge-rules and --rule-rounds
only choose stages, so a resumed run can add rules or rule rounds). A merge stage still to compute reads the
feddem/1 sites' vectors from FEDDEM_HOME: resume it with the first run's FEDDEM_HOME.

    python bench/quality.py --out runs/quality-smollm2 --model smollm2-135m --preset cpu
    python bench/quality.py --out runs/quality-smollm2 --model smollm2-135m --preset gpu
    python bench/quality.py --out runs/quality --data synthetic --steps 100 --rounds 1 2 4   # the embedded default
    python bench/quality.py --out runs/quality --data synthetic --steps 100 --rounds 1 2 4 --resume --rule-rounds 2
        # the same run, plus feddem/2+fisher and feddem/2+regmean
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

PRESETS = {  # per preset: run settings and bench sizes; explicit options override them
    # 2 idle CPU cores, SmolLM2-135M + LoRA: about an hour in all (4 sites, rounds 1 and 2)
    "cpu": {"steps": 8, "batch_size": 4, "seq_len": 128, "lr": 1e-3, "rounds": [1, 2], "train": 400,
            "heldout": 48, "search_budget": 4, "target_examples": 8, "gen_examples": 4},
    # one H100-class GPU
    "gpu": {"steps": 200, "batch_size": 16, "seq_len": 512, "lr": 5e-4, "rounds": [1, 2, 4, 8], "train": 2000,
            "heldout": 200, "search_budget": 8, "target_examples": 32, "gen_examples": 8},
}
DEFAULTS = {"steps": 200, "batch_size": 16, "seq_len": 128, "lr": None, "rounds": [1, 2, 4, 8], "train": 2000,
            "heldout": 400, "search_budget": 8, "target_examples": 32, "gen_examples": 8}
REAL = "real"  # --data real: the domains of bench/real_domains.py, written under --out/data


def lora_config(cfg):
    """The LoRA adapters the ClientApp trains (`client.site.fine_tune`), from the run config."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def trainable(base, cfg, seed: int):
    """A copy of `base` to fine-tune: LoRA-wrapped under `cfg.lora` (adapters initialised with `seed`)."""
    model = copy.deepcopy(base)
    if not cfg.lora:
        return model
    from peft import get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(model, lora_config(cfg))


def finished(model, cfg):
    """The fine-tuned model as a plain model (LoRA adapters merged into the weights)."""
    return model.merge_and_unload() if cfg.lora else model


def site_train(cfg, shard, tokenizer, seed: int):
    """A site's training sequences, as the ClientApp encodes them: the rows `steps` steps draw
    (`common.data.encode_train`; chat rows with their prompt tokens masked)."""
    from feddem.common.data import encode_train
    from feddem.common.training import TrainSettings

    settings = TrainSettings.from_run_config(cfg, seed=seed)
    needed = cfg.steps * settings.accumulation(cfg.seq_len) * cfg.batch_size
    return encode_train(shard, tokenizer, cfg.seq_len, needed, seed)


def _shard(cfg, index: int):
    from feddem.client.site import load_site_shard
    from feddem.common.site_context import SiteContext

    return load_site_shard(cfg, SiteContext(index, f"site-{index}", Path(".")))


def site_data(cfg, n_sites: int, tokenizer) -> list[dict]:
    from feddem.common.data import heldout_blocks, heldout_indices

    data = []
    for i in range(n_sites):
        shard = _shard(cfg, i)
        data.append({"domain": shard.name, "kind": shard.kind, "test_examples": len(heldout_indices(shard, "test")),
                     "train": site_train(cfg, shard, tokenizer, cfg.seed + i),
                     "validation": heldout_blocks(shard, tokenizer, cfg, "validation"),
                     "test": heldout_blocks(shard, tokenizer, cfg, "test")})
    return data


def concat(batches, pad_id: int):
    """Several TokenBatches as one, padded to the longest (padding: not attended, not scored)."""
    from feddem.common.data import TokenBatch

    length = max(b.input_ids.shape[1] for b in batches)

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)

    return TokenBatch(torch.cat([pad(b.input_ids, pad_id) for b in batches]),
                      torch.cat([pad(b.labels, -100) for b in batches]),
                      torch.cat([pad(b.attention_mask, 0) for b in batches]))


def _losses(model, data, device, split="test") -> dict[str, float]:
    from feddem.common.evaluation import evaluate_loss

    return {d["domain"]: evaluate_loss(model, d[split], None, device)["loss"] for d in data}


def _applied(base, vector):
    """A copy of `base` with `vector` added to its weights."""
    from feddem.common.vectors import apply_vector

    model = copy.deepcopy(base)
    apply_vector(model, vector)
    return model


def _merged(base, vectors, weights):
    from feddem.common.vectors import weighted_sum

    return _applied(base, weighted_sum(vectors, weights))


def _settings(cfg, steps: int, seed: int):
    from feddem.common.training import TrainSettings

    return replace(TrainSettings.from_run_config(cfg, seed=seed), steps=steps)


def data_mixing(cfg, base, data, tokenizer, device) -> dict[str, float]:
    """One model (LoRA under --lora) fine-tuned on the union of the sites' training sequences, sites x steps steps."""
    from feddem.common.training import train_causal_lm

    model = trainable(base, cfg, cfg.seed)
    union = concat([d["train"] for d in data], tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                   else tokenizer.eos_token_id)
    train_causal_lm(model, union, _settings(cfg, cfg.steps * len(data), cfg.seed), device)
    return _losses(finished(model, cfg), data, device)


def feddem_run(cfg, rounds: int) -> tuple[dict, Path]:
    """A real `feddem simulate --rounds R` (steps/R local steps per round) under the config's merge rule, in its own
    folder under the bench's (feddem-R<R>, feddem-R<R>-<rule> for a rule other than the weighted sum)."""
    from feddem.server.simulation import simulate

    folder = f"feddem-R{rounds}" + ("" if cfg.merge == "weighted-sum" else f"-{cfg.merge}")
    run_cfg = replace(cfg, rounds=rounds, steps=max(1, cfg.steps // rounds), out_dir=str(Path(cfg.out_dir) / folder))
    result = simulate(run_cfg)
    return result.report, result.out_dir


def merged_losses(report: dict) -> dict[str, float]:
    """A run report's test loss of its merged model, by domain."""
    return {d: v["loss"] for d, v in report["eval"]["merged"].items()}


def pool_vectors(report: dict, n_sites: int):
    """The sites' vectors of a `feddem simulate` run, in site order: each simulated site keeps its own in its folder
    on this machine (`client.site_context`), under the run's Flower run id."""
    from feddem.common.site_context import SiteContext, vector_file
    from feddem.common.vector_io import load_vector

    run_id = int(report["flower_run_id"])
    return [load_vector(vector_file(SiteContext.from_node_config({"partition-id": i}), run_id))
            for i in range(n_sites)]


class MergeScores:
    """The losses of the merges of one set of site vectors, each distinct merge evaluated once per split: `merge`
    maps the sites' weights to the merged vector (the weighted sum, or a merge rule's `merge_plain`)."""

    def __init__(self, base, data, device, merge) -> None:
        self.base, self.data, self.device, self.merge = base, data, device, merge
        self.cache: dict = {}

    def losses(self, weights, split: str = "test") -> dict[str, float]:
        key = (split, tuple(round(float(w), 9) for w in weights))
        if key not in self.cache:
            self.cache[key] = _losses(_applied(self.base, self.merge(list(weights))), self.data, self.device, split)
        return self.cache[key]

    def validation_score(self, weights) -> float:
        losses = self.losses(weights, "validation")
        return sum(losses.values()) / len(losses)

    def search(self, cfg) -> list[float]:
        """`common.weighting.search`'s coordinate search over the weights, scored on the validation split."""
        from feddem.common.weighting.search import coordinate_search

        weights, _, _ = coordinate_search(len(self.data), self.validation_score, cfg.search_budget, cfg.search_step,
                                          cfg.weight_min, cfg.weight_max)
        return weights


def strategy_merges(cfg, base, data, tokenizer, vectors, report, device) -> tuple[dict, dict]:
    """feddem at R = 1 under every strategy, on the same site vectors: (loss by strategy, weights by strategy)."""
    from feddem.client.signals import domain_embedding
    from feddem.common.weighting import ALIGNMENT, EMBEDDING, SiteReport, compute_weights
    from feddem.common.weighting.dga import alignment, target_direction

    sites = {s["domain"]: s for s in report["sites"]}
    direction = target_direction(copy.deepcopy(base), tokenizer, cfg)
    reports = []
    for d, vector in zip(data, vectors):
        extra = {EMBEDDING: domain_embedding(base, d["train"], tokenizer.pad_token_id, device),
                 ALIGNMENT: alignment(vector, direction)}
        s = sites[d["domain"]]
        reports.append(SiteReport(s["site"], d["domain"], s["examples"], s["tokens"], s["train_loss"], extra))
    del direction
    weights = {name: compute_weights(name, reports, replace(cfg, weighting=name), {})
               for name in ("uniform", "size", "chameleon", "dga")}

    from feddem.common.vectors import weighted_sum

    scores = MergeScores(base, data, device, lambda w: weighted_sum(vectors, w))  # size = uniform on equal shards
    weights["search"] = scores.search(cfg)
    losses = {name: scores.losses(w) for name, w in weights.items()}
    return losses, weights


RULE_NAMES = ("fisher", "regmean")  # the merge rules from sums (common.merging.rules) besides the weighted sum


def site_statistics(merge_rule, base, vectors, data, examples: int, device=torch.device("cpu")) -> list[dict]:
    """Each site's statistics for `merge_rule` on its own train blocks, computed as the site does
    (`client.merge_parts.compute_statistics`) with its own fine-tuned dense model: the base plus its vector (for a
    LoRA site the vector is already the dense delta of the adapted weights, the adapters merged in)."""
    stats = []
    for vector, d in zip(vectors, data):
        model = _applied(base, vector).to(device)
        stats.append(merge_rule.compute_statistics(model, d["train"], list(vector), examples, device))
        del model
    return stats


def rule_merges(cfg, base, data, vectors, name: str, device) -> tuple[dict, dict, dict]:
    """feddem at R = 1 under the merge rule `name` on the feddem/1 sites' vectors, with uniform weights and with the
    search's (scored on the validation split, as for the weighted sum): (loss by weights, weights by their label,
    the rule's costs: upload as a multiple of the vector, statistics seconds per site, the server's combine
    seconds)."""
    from feddem.common.merging.parts import site_upload
    from feddem.common.merging.rules import add_parts, merge_plain, rule

    merge_rule, n = rule(name), len(vectors)
    examples = cfg.merge_examples  # as the site (`client.merge_parts`)
    start = time.perf_counter()
    stats = site_statistics(merge_rule, base, vectors, data, examples, device)
    stats_seconds = (time.perf_counter() - start) / n
    upload = (sum(t.numel() for t in site_upload(merge_rule, vectors[0], stats[0]).values())
              / sum(t.numel() for t in vectors[0].values()))
    uniform = [1 / n] * n
    sums: dict = {part: {} for part in merge_rule.parts_names}  # what the secure sum gives the server
    for vector, site_stats, w in zip(vectors, stats, uniform):
        add_parts(sums, merge_rule.site_parts(vector, site_stats, w))
    start = time.perf_counter()
    merge_rule.combine(sums, sum(uniform))
    combine_seconds = time.perf_counter() - start
    del sums
    scores = MergeScores(base, data, device, lambda w: merge_plain(merge_rule, vectors, stats, w))
    weights = {"uniform": uniform, "search": scores.search(cfg)}
    losses = {label: scores.losses(w) for label, w in weights.items()}
    return losses, weights, {"upload_x": upload, "stats_seconds_per_site": stats_seconds,
                             "combine_seconds": combine_seconds, "examples": examples}


def fedavg(cfg, base, data, tokenizer, rounds: int, device) -> dict[str, float]:
    """Flower's FedAvg over the same sites: `rounds` rounds of steps/rounds local steps from the global model. Under
    LoRA the global state is the adapters (one shared initialisation), averaged as FedAvg averages any weights."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg

    from feddem.server.simulation import backend_config, loopback_environment
    from flwr.simulation import run_simulation

    steps = max(1, cfg.steps // rounds)
    bench_dir = str(Path(__file__).resolve().parent)
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context):  # a FedAvg site: its own data, the global model, steps/R local steps
        sys.path.insert(0, bench_dir)
        import quality as bench  # noqa: PLC0415 - this module, imported in the simulation's worker

        from feddem.common.devices import resolve_device
        from feddem.common.modeling import load_model, load_tokenizer
        from feddem.common.training import train_causal_lm
        from feddem.server.base_ref import resolve_base_ref

        index = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"].get("server-round", 1))
        ref = resolve_base_ref(cfg)
        local_device = resolve_device(cfg.device)
        train_data = bench.site_train(cfg, bench._shard(cfg, index), load_tokenizer(ref), cfg.seed + index)
        model = bench.trainable(load_model(ref), cfg, cfg.seed)
        bench.set_state(model, cfg, msg.content["arrays"].to_torch_state_dict())
        train_causal_lm(model, train_data, bench._settings(cfg, steps, cfg.seed + index + 1000 * server_round),
                        local_device)
        return Message(RecordDict({"arrays": ArrayRecord(bench.get_state(model, cfg)),
                                   "metrics": MetricRecord({"num-examples": len(train_data)})}), reply_to=msg)

    out: dict = {}
    server_app = ServerApp()
    initial = trainable(base, cfg, cfg.seed)

    @server_app.main()
    def main(grid, context):
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=len(data),
                          min_available_nodes=len(data))
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(get_state(initial, cfg)), num_rounds=rounds,
                                train_config=ConfigRecord({"steps": steps}))
        out["state"] = result.arrays.to_torch_state_dict()

    loopback_environment()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=len(data),
                   backend_config=backend_config(cfg))
    if "state" not in out or set(out["state"]) != set(get_state(initial, cfg)):
        raise RuntimeError(f"FedAvg with {rounds} round(s) did not finish (see the log above)")
    set_state(initial, cfg, out["state"])
    return _losses(finished(initial, cfg), data, device)


def get_state(model, cfg) -> dict:
    """What a FedAvg site trains and sends: the LoRA adapters under --lora, else every weight."""
    if cfg.lora:
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return model.state_dict()


def set_state(model, cfg, state) -> None:
    if cfg.lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)
    else:
        model.load_state_dict(state)


def plot(results: dict, rounds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = results["mean_loss"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(rounds, [mean[f"fedavg/{r}"] for r in rounds], "o-", label="Flower FedAvg")
    ax.plot(rounds, [mean["merge/uniform"]] + [mean[f"feddem/{r}"] for r in rounds if r > 1], "s-",
            label="feddem (uniform)")
    ticks = set(rounds)
    colours = iter(("tab:red", "tab:purple", "tab:brown"))  # (green: the best one-round merge's line)
    for name in results.get("merge_rules", {}):  # feddem under each merge rule: R = 1 from the merges, then its runs
        points = {1: mean[f"merge/uniform+{name}"]} | {
            rounds_of(k): v for k, v in mean.items() if k.startswith("feddem/") and k.endswith(f"+{name}")}
        ax.plot(sorted(points), [points[r] for r in sorted(points)], "^--", color=next(colours, None),
                label=f"feddem (uniform, {name})")
        ticks |= set(points)
    best = best_one_round_merge(mean)
    ax.axhline(mean[best], color="tab:green", ls="--", label=f"best one-round merge ({best})")
    ax.axhline(mean["data_mixing"], color="black", ls=":", label="data mixing (centralised)")
    ax.axhline(mean["base"], color="grey", ls="-.", label="base")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [str(r) for r in sorted(ticks)])
    ax.set_xlabel("rounds (communication)")
    ax.set_ylabel("mean test loss over domains (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def kept_shares(loss: dict, local: dict[str, float]) -> dict[str, dict[str, float | None]]:
    """Per model and domain, the share of the local gain kept: (base - model) / (base - local); None where the
    local model did not improve on the base (no gain to keep)."""
    from feddem.server.report import kept_share

    return {name: {d: kept_share(loss["base"][d], local[d], value[d])[0] for d in value}
            for name, value in loss.items() if not name.startswith("local/")}


def rounds_of(name: str) -> int | None:
    """The communication rounds of a model row (1 for a one-round merge), None for base and data mixing; a merge
    rule's rows (`merge/<weights>+<rule>`, `feddem/<R>+<rule>`) as the weighted sum's."""
    if name.startswith("merge/"):
        return 1
    if name.startswith(("fedavg/", "feddem/")):
        return int(name.split("/")[1].split("+")[0])
    return None


def best_one_round_merge(mean: dict[str, float]) -> str:
    """The row of lowest mean loss among the one-round merges: every merge/ row (each strategy, each merge rule) and
    the one-round feddem runs of the merge rules (feddem/1+<rule>)."""
    return min((k for k in mean if k.startswith("merge/") or (k.startswith("feddem/") and rounds_of(k) == 1)),
               key=mean.get)


def targets(loss: dict, mean: dict[str, float], rounds: list[int]) -> dict:
    """The quality targets: every merge below the base on every domain; the best one-round merge at or below FedAvg
    with 2 rounds; at each R the best feddem row (any strategy at R = 1, any merge rule) at or below FedAvg with R
    rounds; the best feddem row at or below data mixing."""
    best_merge = best_one_round_merge(mean)
    best_feddem = min((k for k in mean if k.startswith(("merge/", "feddem/"))), key=mean.get)

    def best_at(r):
        return best_merge if r == 1 else min((k for k in mean if k.startswith("feddem/") and rounds_of(k) == r),
                                             key=mean.get)
    return {
        "every_merge_below_base_on_every_domain": all(
            loss[k][d] < loss["base"][d] for k in loss if k.startswith("merge/") for d in loss["base"]),
        "best_one_round_merge": best_merge,
        "best_one_round_merge_at_or_below_fedavg_2": mean[best_merge] <= mean.get("fedavg/2", float("inf")),
        "feddem_R_at_or_below_fedavg_R": {r: mean[best_at(r)] <= mean[f"fedavg/{r}"] for r in rounds},
        "best_feddem": best_feddem,
        "best_feddem_at_or_below_data_mixing": mean[best_feddem] <= mean["data_mixing"],
        "best_feddem_over_data_mixing": mean[best_feddem] / mean["data_mixing"],
    }


def worst_kept(results: dict, name: str) -> str:
    """A row's kept share on its worst domain (the domains with a local gain to keep), as a percentage."""
    shares = [s for s in results["kept_share"][name].values() if s is not None]
    return f"{min(shares):.0%}" if shares and name != "base" else ""


def rules_table(results: dict) -> str:
    """The merge rules' markdown table: per rule and weights (uniform, search) the mean test loss, the kept share on
    the worst domain, the upload as a multiple of the vector, the statistics' seconds per site and the server's
    combine seconds; the weighted sum's rows (merge/uniform, merge/search) first, for comparison."""
    mean = results["mean_loss"]
    head = ["rule", "weights", "mean", "kept worst", "upload x", "stats s/site", "combine s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, info in {"weighted-sum": None, **results.get("merge_rules", {})}.items():
        for weights in ("uniform", "search"):
            row = f"merge/{weights}" + ("" if info is None else f"+{name}")
            if row not in mean:
                continue
            costs = ("1.00 | |" if info is None else f"{info['upload_x']:.2f} | {info['stats_seconds_per_site']:.1f}"
                     f" | {info['combine_seconds']:.3f}")
            lines.append(f"| {name} | {weights} | {mean[row]:.4f} | {worst_kept(results, row)} | {costs} |")
    return "\n".join(lines) + "\n"


def table(results: dict) -> str:
    """The markdown table: per model the mean and per-domain test loss, the kept share on its worst domain, and the
    ratio of its mean loss to data mixing's and to FedAvg's at the same rounds."""
    loss, mean = results["loss"], results["mean_loss"]
    domains = list(loss["base"])
    head = ["model", "mean", *domains, "kept (worst domain)", "/ data mixing", "/ FedAvg same R"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, value in loss.items():
        if name.startswith("local/"):
            continue
        worst = worst_kept(results, name)
        r = rounds_of(name)
        vs_fedavg = f"{mean[name] / mean[f'fedavg/{r}']:.3f}" if r and f"fedavg/{r}" in mean else ""
        lines.append(f"| {name} | {mean[name]:.4f} | " + " | ".join(f"{value[d]:.4f}" for d in domains)
                     + f" | {worst} | {mean[name] / mean['data_mixing']:.3f} | {vs_fedavg} |")
    local = results["local"]
    lines.append("| local (own domain) | " + f"{sum(local.values()) / len(local):.4f} | "
                 + " | ".join(f"{local[d]:.4f}" for d in domains) + " | 100% | | |")
    return "\n".join(lines) + "\n"


def build_data(args) -> str:
    """The data spec: --data, or for `real` the domains of bench/real_domains.py written under --out/data."""
    if args.data != REAL:
        return args.data
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from real_domains import build_domains

    return str(build_domains(args.out / "data", args.domains, train=args.train, heldout=args.heldout,
                             seed=args.seed).resolve())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for quality.json/.md/.png, the data and runs")
    parser.add_argument("--model", default="", help="base model (e.g. smollm2-135m; default: the embedded model)")
    parser.add_argument("--preset", choices=list(PRESETS), help="sizes for 2 CPU cores (cpu) or one GPU (gpu)")
    parser.add_argument("--data", default=None, help="data spec; 'real' (the default with --model): the domains of "
                        "bench/real_domains.py; default without --model: synthetic")
    parser.add_argument("--domains", nargs="+", help="--data real: which domains (default: all four of "
                        "bench/real_domains.py: licenses, python_reference, stdlib_docs, unicode_names)")
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                        help="fine-tune LoRA adapters (default: on with --model, off for the embedded model)")
    parser.add_argument("--sites", type=int, default=0, help="sites (default: one per shard of --data)")
    parser.add_argument("--steps", type=int, help="local steps per site in all (default: 200)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--lr", type=float, help="learning rate (default: the run config's)")
    parser.add_argument("--rounds", type=int, nargs="+", help="round counts, 1 included (default: 1 2 4 8)")
    parser.add_argument("--train", type=int, help="--data real: train examples per domain")
    parser.add_argument("--heldout", type=int, help="--data real: held-out examples per domain (half test)")
    parser.add_argument("--train-examples", type=int, default=2000, help="synthetic domains: train examples")
    parser.add_argument("--search-budget", type=int)
    parser.add_argument("--target-examples", type=int, help="dga: target examples per shard")
    parser.add_argument("--gen-examples", type=int, help="held-out prompts answered in the feddem runs' reports")
    parser.add_argument("--aggregation", default="secure", choices=["secure", "plain"],
                        help="the feddem runs' aggregation (default: secure, feddem's default)")
    parser.add_argument("--merge-rules", nargs="*", default=list(RULE_NAMES), choices=RULE_NAMES,
                        help="merge rules from sums to score at R = 1 on the feddem/1 sites' vectors: rows "
                        "merge/uniform+<rule> and merge/search+<rule> (default: fisher regmean; none: skip)")
    parser.add_argument("--rule-rounds", type=int, nargs="*", default=[], help="rounds of real feddem runs under "
                        "each of --merge-rules: rows feddem/<R>+<rule> (default: none)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of this process on CPU (default: one "
                        "per core; 1 is faster on cores other work keeps busy)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="take the stages already finished from "
                        "--out/stages.json (written by a run with the same options) instead of running them again")
    args = parser.parse_args(argv)
    for key, value in (PRESETS.get(args.preset) or DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if 1 not in args.rounds:
        parser.error("--rounds must include 1")
    if args.rule_rounds and not args.merge_rules:
        parser.error("--rule-rounds runs feddem under each of --merge-rules: name at least one")
    if any(r < 1 for r in args.rule_rounds):
        parser.error(f"--rule-rounds must be positive, got {args.rule_rounds}")
    args.rule_rounds = sorted(set(args.rule_rounds))
    args.rounds = sorted(set(args.rounds))
    args.data = args.data or (REAL if args.model else "synthetic")
    args.lora = bool(args.model) if args.lora is None else args.lora

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    from feddem.common.config import RunConfig
    from feddem.common.data import list_shards
    from feddem.common.devices import resolve_device
    from feddem.common.modeling import load_model, load_tokenizer
    from feddem.server.base_ref import resolve_base_ref
    from feddem.server.simulation import check_local_inputs

    if args.threads:  # also for the processes the runs start (the simulation's driver; Ray sets its own sites')
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FEDDEM_HOME", tempfile.mkdtemp(prefix="feddem-quality-"))
    started = time.perf_counter()
    data_spec = build_data(args)
    n_sites = args.sites or len(list_shards(data_spec))
    cfg = RunConfig(sites=n_sites, data=data_spec, model=args.model, lora=args.lora, steps=args.steps,
                    batch_size=args.batch_size, seq_len=args.seq_len, train_examples=args.train_examples,
                    eval_examples=max(args.heldout, 2), gen_examples=args.gen_examples,
                    search_budget=args.search_budget, target_examples=args.target_examples, seed=args.seed,
                    aggregation=args.aggregation, device=args.device, out_dir=str(args.out),
                    **({"lr": args.lr} if args.lr else {}))
    check_local_inputs(cfg)
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    ref = resolve_base_ref(cfg)
    base = load_model(ref)
    tokenizer = load_tokenizer(ref)
    data = site_data(cfg, n_sites, tokenizer)
    loss = {}
    # each stage's result is kept in stages.json as it finishes; --resume takes the finished ones from there
    stages_path = args.out / "stages.json"
    # which merge rules and rule rounds run only chooses stages (each its own, by name): not part of the settings
    settings = cfg.to_record() | {"bench": {k: v for k, v in vars(args).items()
                                            if k not in ("out", "resume", "merge_rules", "rule_rounds")}}
    stages = json.loads(stages_path.read_text()) if args.resume and stages_path.is_file() else {}
    if stages and json.loads(json.dumps(settings, default=str)) != stages.get("settings"):
        parser.error(f"--resume: {stages_path} was written with other settings")
    stages.setdefault("settings", json.loads(json.dumps(settings, default=str)))
    timings = stages.setdefault("timings", {})

    def timed(name, fn):
        if name in stages:
            log.info("%s: from %s", name, stages_path)
            return stages[name]
        start = time.perf_counter()
        log.info("%s ...", name)
        value = fn()
        timings[name] = round(time.perf_counter() - start, 1)
        losses = value[0]["uniform"] if isinstance(value, (tuple, list)) else value  # the merges: uniform's
        if "eval" in losses:  # a run's report: its merge
            losses = {d: v["loss"] for d, v in losses["eval"]["merged"].items()}
        log.info("%s: mean test loss %.4f (%.0f s)", name, sum(losses.values()) / len(losses), timings[name])
        stages[name] = value
        stages_path.write_text(json.dumps(stages, indent=1))
        return value

    report = timed(f"feddem/1 ({cfg.aggregation} aggregation)", lambda: feddem_run(cfg, 1)[0])
    # the base's and the local models' test losses as the sites measured them in that run (the same test halves,
    # the same `evaluate_loss`)
    loss["base"] = {d["domain"]: report["eval"]["base"][d["domain"]]["loss"] for d in data}
    local = {d["domain"]: report["eval"]["local"][d["domain"]]["loss"] for d in data}
    for d, value in local.items():
        loss[f"local/{d}"] = {d: value}
    vectors: list = []  # the feddem/1 sites' vectors, read once when a stage needs them

    def site_vectors():
        vectors[:] = vectors or pool_vectors(report, n_sites)
        return vectors

    merges, weights = timed("merges", lambda: strategy_merges(cfg, base, data, tokenizer, site_vectors(), report,
                                                              device))
    for name, value in merges.items():
        loss[f"merge/{name}"] = value
    weights, merge_rules = dict(weights), {}  # (a copy: the rules' weights join it, not the stage's record)
    for rule_name in args.merge_rules:
        rule_losses, rule_weights, costs = timed(
            f"merges+{rule_name}", lambda rule_name=rule_name: rule_merges(cfg, base, data, site_vectors(), rule_name,
                                                                           device))
        merge_rules[rule_name] = costs | {"weights": rule_weights}
        for label, value in rule_losses.items():
            loss[f"merge/{label}+{rule_name}"] = value
            weights[f"{label}+{rule_name}"] = rule_weights[label]
    vectors.clear()
    for r in args.rounds:
        loss[f"fedavg/{r}"] = timed(f"fedavg/{r}", lambda r=r: fedavg(cfg, base, data, tokenizer, r, device))
        if r > 1:
            loss[f"feddem/{r}"] = timed(f"feddem/{r}", lambda r=r: merged_losses(feddem_run(cfg, r)[0]))
    loss["data_mixing"] = timed("data_mixing", lambda: data_mixing(cfg, base, data, tokenizer, device))
    for rule_name in args.merge_rules:  # in the order given: the first rule's rounds first
        for r in args.rule_rounds:
            loss[f"feddem/{r}+{rule_name}"] = timed(f"feddem/{r}+{rule_name}", lambda r=r, rule_name=rule_name:
                                                    merged_losses(feddem_run(replace(cfg, merge=rule_name), r)[0]))
    timings["total"] = round(time.perf_counter() - started, 1)

    mean = {k: sum(v.values()) / len(v) for k, v in loss.items() if not k.startswith("local/")}
    results = {"mean_loss": mean, "loss": loss, "local": local, "kept_share": kept_shares(loss, local),
               "weights": weights, "merge_rules": merge_rules, "timings": timings, "feddem_1_report_timings": report.get("timings"),
               "settings": {"model": args.model or "embedded", "lora": args.lora, "sites": n_sites,
                            "domains": {d["domain"]: d["kind"] for d in data}, "steps": args.steps,
                            "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": cfg.lr,
                            "rounds": args.rounds, "merge_rules": args.merge_rules,
                            "rule_rounds": args.rule_rounds, "data": args.data, "preset": args.preset,
                            "aggregation": args.aggregation, "seed": args.seed, "device": str(device),
                            "cpus": os.cpu_count(), "test_examples": {d["domain"]: d["test_examples"] for d in data}}}
    results["targets"] = targets(loss, mean, args.rounds)
    (args.out / "quality.json").write_text(json.dumps(results, indent=1))
    markdown = table(results) + ("\n" + rules_table(results) if merge_rules else "")
    (args.out / "quality.md").write_text(markdown)
    plot(results, args.rounds, args.out / "quality.png")
    print("\n" + markdown)
    print(f"targets: {json.dumps(results['targets'], indent=1)}")
    print(f"timings (s): {json.dumps(timings)}")
    print(f"\n{args.out / 'quality.json'}, {args.out / 'quality.md'}, {args.out / 'quality.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
