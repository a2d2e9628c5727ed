"""The run report: `report.json`, `report.png` and the console's closing table, which answer "is this merge good?".

Per domain: the base, the site's own local model and the merge (held-out loss, nats per token), the share of the
local gain that the merge keeps, `(base - merged) / (base - local)`, and a warning wherever the merge is worse than
the base; the mean of each figure; the merged loss after every round of a multi-round run; the cross-domain matrix
(each site's local model on every domain, `server.cross_domain`) when it could be computed; and, for instruction
data, the sites' generation metrics and a few sample answers of the base and the merge.
"""

import json
import math
from pathlib import Path

REPORT_KEYS = ("sites", "weights", "eval", "judgement", "timings")

# Generation metrics a site may return for instruction data (numbers), and its sample answers (a JSON string).
GEN_METRICS = ("gen_exact_match", "gen_rouge_l")
SAMPLES = "samples"
# what report.json keeps of each site's training reply (`client.site.fine_tune`): its data (format, sizes, examples
# cut to seq-len, its own warnings: small held-out split, truncation), its train loss and its phase timings
SITE_KEYS = ("site", "domain", "data_format", "examples", "tokens", "heldout_examples", "truncated_examples",
             "warnings", "train_loss", "setup_seconds", "train_seconds", "eval_seconds", "seconds")
SAMPLES_SHOWN = 3  # sample answers per domain kept in the report
MIN_HELDOUT = 20  # a test split smaller than this judges little: the report warns

KEPT_SHARE = ("share of the local gain that the merge keeps: (base - merged) / (base - local), on held-out loss; "
              "1 = the merge is as good as the site's own model on its domain, 0 = no better than the base, "
              "< 0 = worse than the base, > 1 = better than the site's own model. Undefined (null) where the local "
              "model is no better than the base: there is no gain to keep.")
TIE = 1e-9  # |base - local| below this (nats/token) counts as no change


def _loss_entry(loss: float) -> dict:
    return {"loss": loss, "perplexity": math.exp(loss)}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def kept_share(base: float, local: float, merged: float) -> tuple[float | None, str]:
    """The share of the local gain that the merge keeps, and a note saying what it means."""
    gain = base - local
    if abs(gain) <= TIE:
        return None, "no local gain to keep: the local model scores as the base does"
    if gain < 0:
        return None, ("the site's own fine-tune made its domain worse than the base (local > base): there is no gain "
                      "to keep, so the share is undefined; compare the merge with the base directly")
    share = (base - merged) / gain
    if share > 1:
        return share, "the merge beats the site's own model on its domain"
    if share < 0:
        return share, "the merge is worse than the base on this domain"
    return share, f"the merge keeps {share:.0%} of the local gain"


def judge(sites: list[dict], merged: dict[str, float]) -> dict:
    """Per domain: base, local, merged loss, kept share (with its note) and warnings; the mean of each figure.
    `sites` holds site, domain, base_loss, local_loss (and heldout_examples, truncated_examples); `merged` site ->
    merged loss."""
    domains, warnings = {}, []
    for s in sites:
        d = s["domain"]
        row = {"site": s["site"], "base": float(s["base_loss"]), "local": float(s["local_loss"]),
               "merged": None, "kept_share": None}
        if s["site"] not in merged:
            row["note"] = "not evaluated: the site did not answer the evaluation"
            warnings.append(f"{d}: the merge was not evaluated ({s['site']} did not answer)")
        else:
            row["merged"] = float(merged[s["site"]])
            row["kept_share"], row["note"] = kept_share(row["base"], row["local"], row["merged"])
            if row["merged"] > row["base"]:
                row["warning"] = (f"the merge is worse than the base on {d}: loss {row['merged']:.4f} > "
                                  f"{row['base']:.4f} nats/token")
                warnings.append(row["warning"])
        held = s.get("heldout_examples")
        if held is not None and int(held) < MIN_HELDOUT:
            warnings.append(f"{d}: only {int(held)} held-out test example(s) (under {MIN_HELDOUT}): its figures "
                            f"judge little")
        if int(s.get("truncated_examples") or 0):
            warnings.append(f"{d}: {int(s['truncated_examples'])} train/test example(s) were cut to seq-len (the "
                            f"loss does not see their ends)")
        domains[d] = row
    mean = {key: _mean(r[key] for r in domains.values()) for key in ("base", "local", "merged", "kept_share")}
    mean["kept_share_domains"] = sum(r["kept_share"] is not None for r in domains.values())
    return {"unit": "nats per token (held-out test loss)", "kept_share_definition": KEPT_SHARE,
            "domains": domains, "mean": mean, "warnings": warnings}


def generation_section(sites: list[dict], merged_records: dict[str, dict]) -> dict | None:
    """Generation metrics and sample answers, where the sites returned them (instruction data): base figures come
    from the training reply as `base_<metric>` / `base_samples`, the merge's from the evaluation reply as `<metric>`
    / `samples`. None when no site returned any."""
    base, merged, samples = {}, {}, {}
    for s in sites:
        d, record = s["domain"], merged_records.get(s["site"], {})
        b = {m: float(s[f"base_{m}"]) for m in GEN_METRICS if f"base_{m}" in s}
        m_ = {m: float(record[m]) for m in GEN_METRICS if m in record}
        if b:
            base[d] = b
        if m_:
            merged[d] = m_
        pairs = _pair_samples(_parse_samples(s.get(f"base_{SAMPLES}")), _parse_samples(record.get(SAMPLES)))
        if pairs:
            samples[d] = pairs[:SAMPLES_SHOWN]
    if not (base or merged or samples):
        return None
    mean = {which: {m: _mean(v.get(m) for v in table.values()) for m in GEN_METRICS}
            for which, table in (("base", base), ("merged", merged))}
    return {"metrics": list(GEN_METRICS), "base": base, "merged": merged, "mean": mean, "samples": samples}


def _parse_samples(raw) -> list[dict]:
    """A site's `samples` (JSON list of {prompt, reference, answer}); anything else reads as none."""
    if not raw:
        return []
    try:
        items = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return []
    return [i for i in items if isinstance(i, dict) and "prompt" in i] if isinstance(items, list) else []


def _pair_samples(base: list[dict], merged: list[dict]) -> list[dict]:
    """One row per prompt: prompt, reference, the base's answer and the merge's answer (where each exists)."""
    rows: dict[str, dict] = {}
    for which, items in (("base", base), ("merged", merged)):
        for item in items:
            row = rows.setdefault(str(item["prompt"]), {"prompt": str(item["prompt"]),
                                                        "reference": str(item.get("reference", ""))})
            row[which] = str(item.get("answer", ""))
    return list(rows.values())


def build_report(config: dict, base: dict, sites: list[dict], weights: dict, merged: dict, failures: dict,
                 timings: dict, aggregation: str, aggregation_details: dict | None = None,
                 extra: dict | None = None, merged_records: dict[str, dict] | None = None) -> dict:
    """The report as a dict. `sites` holds each site's metadata incl. base_loss/local_loss; `merged` site -> loss;
    `merged_records` site -> the whole evaluation reply (generation metrics and samples, when there are any).
    `aggregation` is "secure" or "plain"; `aggregation_details` (secure: error bound, threshold, dropped sites,
    requested vs effective weights) goes under `secure_aggregation`."""
    by_domain = {s["domain"]: s for s in sites}
    report = {
        "config": config,
        "base_model": base,
        "aggregation": aggregation,
        "sites": [
            {k: s[k] for k in SITE_KEYS if k in s} for s in sites
        ],
        "weights": dict(sorted(weights.items())),
        "weight_scale": sum(weights.values()),  # the weights need not sum to 1 (search finds the scale too)
        "eval": {
            "unit": "nats per token",
            "base": {d: _loss_entry(s["base_loss"]) for d, s in by_domain.items()},
            "local": {d: _loss_entry(s["local_loss"]) for d, s in by_domain.items()},
            "merged": {d: _loss_entry(merged[s["site"]]) for d, s in by_domain.items() if s["site"] in merged},
        },
        "judgement": judge(sites, merged),
        "failures": failures,
        "timings": timings,
    }
    generation = generation_section(sites, merged_records or {})
    if generation is not None:
        report["generation"] = generation
    if aggregation_details is not None:
        report["secure_aggregation"] = aggregation_details
    report.update(extra or {})
    return report


def write_report(report: dict, out_dir: Path) -> None:
    """report.json and report.png in the run folder (names from `server.manifest`)."""
    from feddem.server.manifest import REPORT_JSON, REPORT_PNG

    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2))
    plot_report(report, out_dir / REPORT_PNG)


def read_report(out_dir: Path) -> dict:
    from feddem.server.manifest import REPORT_JSON

    return json.loads((Path(out_dir) / REPORT_JSON).read_text())


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def closing_table(report: dict):
    """The console's closing table (a `rich.table.Table`): per domain base, local and merged loss, the kept share and
    a warning mark, the generation metrics where there are any, and the mean row; the caption names the warnings
    and whether the cross-domain matrix is in the report."""
    from rich.table import Table

    judgement = report.get("judgement") or judge([], {})
    generation = report.get("generation") or {}
    metrics = [m for m in GEN_METRICS if any(m in v for t in ("base", "merged") for v in generation.get(t, {}).values())]
    table = Table(title=f"is this merge good? ({report.get('aggregation', '?')} aggregation, "
                        f"{report.get('weighting', report.get('config', {}).get('weighting', '?'))} weights; "
                        f"loss in nats/token, lower is better)", title_justify="left")
    for name, justify in (("domain", "left"), ("site", "left"), ("weight", "right"), ("base", "right"),
                          ("local", "right"), ("merged", "right"), ("kept", "right"), ("", "left")):
        table.add_column(name, justify=justify)
    for m in metrics:
        table.add_column(f"{m.removeprefix('gen_')} base>merged", justify="right")
    weights = report.get("weights", {})
    for domain, row in judgement["domains"].items():
        gen = [f"{_fmt(generation.get('base', {}).get(domain, {}).get(m), '.3f')}>"
               f"{_fmt(generation.get('merged', {}).get(domain, {}).get(m), '.3f')}" for m in metrics]
        worse = "warning" in row
        table.add_row(domain, row["site"], _fmt(weights.get(row["site"]), ".3f"), _fmt(row["base"]),
                      _fmt(row["local"]), f"[red]{_fmt(row['merged'])}[/red]" if worse else _fmt(row["merged"]),
                      _fmt(row["kept_share"], ".0%"), "[red]worse than base[/red]" if worse else "", *gen)
    mean = judgement["mean"]
    gen_mean = [f"{_fmt(generation.get('mean', {}).get('base', {}).get(m), '.3f')}>"
                f"{_fmt(generation.get('mean', {}).get('merged', {}).get(m), '.3f')}" for m in metrics]
    table.add_section()
    table.add_row("[bold]mean[/bold]", "", "", _fmt(mean["base"]), _fmt(mean["local"]), _fmt(mean["merged"]),
                  _fmt(mean["kept_share"], ".0%"), "", *gen_mean)
    cross = report.get("cross_domain") or {}
    lines = [f"[red]warning:[/red] {w}" for w in judgement["warnings"]]
    if cross.get("status") == "computed":
        lines.append(f"cross-domain matrix in report.json (computed by the {cross.get('computed_by')})")
    elif cross.get("status"):
        lines.append(f"cross-domain matrix {cross['status']}: {cross.get('reason', '')}")
    rounds = [r for r in report.get("rounds", []) if r.get("mean_merged_loss") is not None]
    if len(rounds) > 1:
        lines.append("mean merged loss by round: " + ", ".join(f"{r['round']}: {r['mean_merged_loss']:.4f}"
                                                             for r in rounds))
    table.caption = "\n".join(lines) or None
    table.caption_justify = "left"
    return table


def plot_report(report: dict, path: Path) -> None:
    """report.png: per domain, the change in held-out loss of the local model and of the merge relative to the
    base (in %, so small differences show), with the absolute losses written on the bars; the kept share; the
    cross-domain matrix when computed; the mean merged loss by round in multi-round runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judgement = report.get("judgement") or {"domains": {}, "mean": {}}
    rows = judgement["domains"]
    domains = list(rows)
    cross = report.get("cross_domain") or {}
    rounds = [r for r in report.get("rounds", []) if r.get("mean_merged_loss") is not None]
    panels = ["change", "kept"] + (["cross"] if cross.get("status") == "computed" else []) \
        + (["rounds"] if len(rounds) > 1 else [])
    widths = {"change": max(3.0, 1.1 * len(domains) + 1.5), "kept": max(2.5, 0.7 * len(domains) + 1.2),
              "cross": max(3.0, 0.8 * len(domains) + 2.0), "rounds": 3.0}
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths[p] for p in panels) + 0.5, 4.6),
                             gridspec_kw={"width_ratios": [widths[p] for p in panels]}, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        {"change": _plot_change, "kept": _plot_kept, "cross": _plot_cross, "rounds": _plot_rounds}[panel](
            ax, report, rows, domains, cross, rounds)
    weights = ", ".join(f"{k}={v:.2f}" for k, v in report.get("weights", {}).items())
    weighting = report.get("weighting", report.get("config", {}).get("weighting"))
    fig.suptitle(f"feddem: is this merge good? ({report.get('aggregation', '?')} aggregation; {weighting}: {weights})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_change(ax, report, rows, domains, cross, rounds) -> None:
    """Grouped bars of (loss - base) / base in % for local and merged, the base's loss written under each group."""
    series = [("local", "#4c72b0"), ("merged", "#dd8452")]
    width = 0.8 / len(series)
    for i, (name, color) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(domains))]
        values = [100 * (rows[d][name] - rows[d]["base"]) / rows[d]["base"] if rows[d][name] is not None
                  and rows[d]["base"] else float("nan") for d in domains]
        bars = ax.bar(xs, values, width, label=name, color=color)
        ax.bar_label(bars, labels=[_fmt(rows[d][name], ".3f") for d in domains], fontsize=6, padding=1)
    ax.axhline(0, color="#555555", linewidth=0.8)
    ax.set_xticks(range(len(domains)), [f"{d}\nbase {rows[d]['base']:.3f}" for d in domains], fontsize=7)
    for j, d in enumerate(domains):
        if "warning" in rows[d]:
            ax.get_xticklabels()[j].set_color("#c0392b")
    ax.set_ylabel("held-out loss vs base (%, lower is better)", fontsize=8)
    ax.set_title("change from the base (numbers: loss, nats/token)", fontsize=8)
    ax.margins(y=0.18)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=7, frameon=False)


def _plot_kept(ax, report, rows, domains, cross, rounds) -> None:
    """The kept share per domain and its mean, with the 0 (base) and 100% (local) lines."""
    shares = [rows[d]["kept_share"] for d in domains]
    mean = (report.get("judgement") or {}).get("mean", {}).get("kept_share")
    labels, values = domains + ["mean"], shares + [mean]
    colors = ["#c0392b" if v is not None and v < 0 else "#55a868" for v in values[:-1]] + ["#333333"]
    bars = ax.bar(range(len(values)), [100 * v if v is not None else 0 for v in values], 0.6, color=colors)
    ax.bar_label(bars, labels=[_fmt(v, ".0%") if v is not None else "n/a" for v in values], fontsize=6, padding=1)
    ax.axhline(0, color="#555555", linewidth=0.8)
    ax.axhline(100, color="#4c72b0", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("local gain kept by the merge (%)", fontsize=8)
    ax.set_title("kept share (dashed: local model)", fontsize=8)
    ax.margins(y=0.15)


def _plot_cross(ax, report, rows, domains, cross, rounds) -> None:
    """Heatmap of each site's local model on every domain, as loss change vs the base (%): interference shows red."""
    loss = cross["loss"]
    sites = list(loss)
    columns = [d for d in domains if any(d in loss[s] for s in sites)]
    grid = [[100 * (loss[s][d] - rows[d]["base"]) / rows[d]["base"] if d in loss[s] else float("nan")
             for d in columns] for s in sites]
    bound = max([abs(v) for row in grid for v in row if v == v] + [1e-9])
    image = ax.imshow(grid, cmap="RdYlGn_r", vmin=-bound, vmax=bound, aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:+.1f}%", ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(columns)), columns, fontsize=7, rotation=30, ha="right")
    domain_of = {r["site"]: d for d, r in rows.items()}
    ax.set_yticks(range(len(sites)), [f"{s} ({domain_of.get(s, '?')})" for s in sites], fontsize=7)
    ax.set_xlabel("evaluated on domain", fontsize=8)
    ax.set_title("cross-domain: local models vs base (%)", fontsize=8)
    ax.figure.colorbar(image, ax=ax, fraction=0.05, pad=0.03).ax.tick_params(labelsize=6)


def _plot_rounds(ax, report, rows, domains, cross, rounds) -> None:
    """Mean merged loss after each round, with the mean base and local losses as reference lines."""
    mean = (report.get("judgement") or {}).get("mean", {})
    ax.plot([r["round"] for r in rounds], [r["mean_merged_loss"] for r in rounds], marker="o", color="#dd8452",
            label="merged")
    for key, color in (("base", "#9e9e9e"), ("local", "#4c72b0")):
        if mean.get(key) is not None:
            ax.axhline(mean[key], color=color, linestyle="--", linewidth=0.8, label=f"{key} (last round)"
                       if key == "local" else key)
    ax.set_xticks([r["round"] for r in rounds])
    ax.set_xlabel("round", fontsize=8)
    ax.set_ylabel("mean held-out loss (nats/token)", fontsize=8)
    ax.set_title("merge by round", fontsize=8)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=7, frameon=False)
