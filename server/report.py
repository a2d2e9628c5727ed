"""The run report: `report.json` (sites, weights, per-domain evaluation, timings) and `report.png` (bar chart)."""

import json
import math
from pathlib import Path

REPORT_KEYS = ("sites", "weights", "eval", "timings")


def _loss_entry(loss: float) -> dict:
    return {"loss": loss, "perplexity": math.exp(loss)}


def build_report(config: dict, base: dict, sites: list[dict], weights: dict, merged: dict, failures: dict,
                 timings: dict, aggregation: str, aggregation_details: dict | None = None,
                 extra: dict | None = None) -> dict:
    """The report as a dict. `sites` holds each site's metadata incl. base_loss/local_loss; `merged` site -> loss.
    `aggregation` is "secure" or "plain"; `aggregation_details` (secure: error bound, threshold, dropped sites,
    requested vs effective weights) goes under `secure_aggregation`."""
    by_domain = {s["domain"]: s for s in sites}
    report = {
        "config": config,
        "base_model": base,
        "aggregation": aggregation,
        "sites": [
            {k: s[k] for k in ("site", "domain", "examples", "tokens", "heldout_examples", "train_loss")}
            for s in sites
        ],
        "weights": dict(sorted(weights.items())),
        "eval": {
            "unit": "nats per token",
            "base": {d: _loss_entry(s["base_loss"]) for d, s in by_domain.items()},
            "local": {d: _loss_entry(s["local_loss"]) for d, s in by_domain.items()},
            "merged": {d: _loss_entry(merged[s["site"]]) for d, s in by_domain.items() if s["site"] in merged},
        },
        "failures": failures,
        "timings": timings,
    }
    if aggregation_details is not None:
        report["secure_aggregation"] = aggregation_details
    report.update(extra or {})
    return report


def write_report(report: dict, out_dir: Path) -> None:
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    plot_report(report, out_dir / "report.png")


def read_report(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "report.json").read_text())


def plot_report(report: dict, path: Path) -> None:
    """Grouped bars: per domain, the perplexity of the base, the site's local model, and the merged model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(report["eval"]["base"])
    series = [("base", "#9e9e9e"), ("local", "#4c72b0"), ("merged", "#dd8452")]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(domains) + 2), 4))
    for i, (name, color) in enumerate(series):
        values = [report["eval"][name].get(d, {}).get("perplexity", float("nan")) for d in domains]
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(domains))]
        bars = ax.bar(xs, values, width, label=name, color=color)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, rotation=90, padding=2)
    ax.set_xticks(range(len(domains)), domains)
    ax.set_ylabel("held-out perplexity (per token)")
    weights = ", ".join(f"{k}={v:.2f}" for k, v in report["weights"].items())
    ax.set_title(f"feddem: base vs local vs merged ({report.get('weighting', report['config'].get('weighting'))}: {weights})", fontsize=9)
    ax.legend()
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
