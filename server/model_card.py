"""The merged model's card: `README.md` in the exported model folder, in the Hugging Face convention (YAML front
matter, then Markdown): the base and its checksum, the sites and their weights, the aggregation mode, the
per-domain figures of the report, and how to load the model. Written from the run report alone, so anything that
exports a merge with a report (a run, the admin server's remerge) can write it: `write_model_card(folder, report)`.
"""

import json
from pathlib import Path

CARD = "README.md"


def _yaml_string(value: str) -> str:
    return json.dumps(str(value))  # a JSON string is a valid YAML double-quoted scalar


def _num(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def front_matter(report: dict) -> str:
    base = report.get("base_model", {})
    lines = ["---", f"base_model: {_yaml_string(base.get('ref', 'unknown'))}", "library_name: transformers",
             "pipeline_tag: text-generation", "tags:", "- feddem", "- merge", "---"]
    return "\n".join(lines)


def _sites_table(report: dict) -> list[str]:
    weights = report.get("weights", {})
    lines = ["| site | domain | training examples | training tokens | weight |", "| --- | --- | ---: | ---: | ---: |"]
    for s in report.get("sites", []):
        lines.append(f"| {s['site']} | {s['domain']} | {s.get('examples', '-')} | {s.get('tokens', '-')} | "
                     f"{_num(weights.get(s['site']))} |")
    return lines


def _figures_table(report: dict) -> list[str]:
    judgement = report.get("judgement")
    if not judgement or not judgement.get("domains"):
        return ["No per-domain evaluation was recorded for this merge."]
    lines = ["Held-out test loss in nats per token (lower is better); *kept* is the share of the site's own "
             "fine-tuning gain that the merge keeps, `(base - merged) / (base - local)`.", "",
             "| domain | base | local (the site's own model) | merged | kept |", "| --- | ---: | ---: | ---: | ---: |"]
    for domain, row in judgement["domains"].items():
        mark = " (worse than base)" if "warning" in row else ""
        lines.append(f"| {domain} | {_num(row['base'])} | {_num(row['local'])} | {_num(row['merged'])}{mark} | "
                     f"{_num(row['kept_share'], '.0%')} |")
    mean = judgement["mean"]
    lines.append(f"| **mean** | {_num(mean['base'])} | {_num(mean['local'])} | {_num(mean['merged'])} | "
                 f"{_num(mean['kept_share'], '.0%')} |")
    if judgement.get("warnings"):
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in judgement["warnings"]]
    generation = report.get("generation")
    if generation:
        lines += ["", "Generation on held-out prompts (base -> merged):", "",
                  "| domain | " + " | ".join(generation["metrics"]) + " |",
                  "| --- |" + " ---: |" * len(generation["metrics"])]
        for domain in sorted(set(generation["base"]) | set(generation["merged"])):
            cells = [f"{_num(generation['base'].get(domain, {}).get(m), '.3f')} -> "
                     f"{_num(generation['merged'].get(domain, {}).get(m), '.3f')}" for m in generation["metrics"]]
            lines.append(f"| {domain} | " + " | ".join(cells) + " |")
    return lines


def _aggregation(report: dict) -> list[str]:
    mode = report.get("aggregation", "unknown")
    text = {"secure": "secure aggregation: the server learned only the weighted sum of the sites' vectors",
            "plain": "plain aggregation (a trusted run): the server saw each site's weighted vector"}.get(mode, mode)
    lines = [f"- aggregation: {text}", f"- weighting: {report.get('weighting', report.get('config', {}).get('weighting', '-'))}"]
    rounds = report.get("rounds") or []
    if rounds:
        lines.append(f"- rounds: {len(rounds)}")
    secure = report.get("secure_aggregation") or {}
    if secure.get("dropped"):
        lines.append(f"- sites dropped from the sum: {', '.join(sorted(secure['dropped']))}")
    if secure.get("noise"):
        lines.append(f"- distributed Gaussian noise in the sum: std {secure['noise']}")
    if report.get("remerge_of"):
        lines.append(f"- a remerge of run {report['remerge_of']} with weights given by hand")
    return lines


def model_card(report: dict, chat_template: bool = False) -> str:
    """The card's text for the merge that `report` describes."""
    base = report.get("base_model", {})
    body = [
        front_matter(report), "",
        "# Merged model (feddem)", "",
        "This model is a *distribution edited model*: `theta = theta_base + sum_i w_i d_i`, where each site "
        "fine-tuned the base on its own data and `d_i` is its distribution vector (its weights minus the base's). "
        "It is an ordinary model of its base's kind, with the base's tokenizer"
        + (", chat template" if chat_template else "") + " and generation config.", "",
        "## Base", "",
        f"- model: `{base.get('ref', 'unknown')}`",
        f"- checksum (SHA-256 over parameter names, dtypes, shapes and bytes): `{base.get('checksum', '-')}`", "",
        "## Sites and weights", "", *_sites_table(report), "",
        "## Aggregation", "", *_aggregation(report), "",
        "## Per-domain figures", "", *_figures_table(report), "",
        "## How to load", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        'generate = pipeline("text-generation", model=model, tokenizer=tokenizer)',
        *(['print(generate([{"role": "user", "content": "Hello!"}], max_new_tokens=64))'] if chat_template
          else ['print(generate("Hello", max_new_tokens=64))']),
        "```", "",
    ]
    return "\n".join(body)


def write_model_card(folder: str | Path, report: dict) -> Path:
    """Write README.md into the exported model folder (the tokenizer must be saved there first: the card says
    whether it has a chat template), with the permissions of the folder's config.json."""
    folder = Path(folder)
    chat = (folder / "chat_template.jinja").is_file() or "chat_template" in _tokenizer_config(folder)
    path = folder / CARD
    path.write_text(model_card(report, chat_template=chat))
    if (folder / "config.json").is_file():
        path.chmod((folder / "config.json").stat().st_mode & 0o777)
    return path


def _tokenizer_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return {}
