"""End to end: real `feddem simulate` runs (Flower Simulation Engine, Ray on loopback) on the tiny base."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import simulate_cli


@pytest.mark.slow
def test_three_site_run_merges_better_than_base_and_exports(tmp_path, tiny_base):
    out = tmp_path / "run"
    report, result = simulate_cli(out, "--sites", "3")
    domains = ["arithmetic", "records", "prose"]
    assert [s["domain"] for s in report["sites"]] == domains
    assert all(s["examples"] == 200 and s["tokens"] > 0 for s in report["sites"])
    assert report["weights"] == pytest.approx({f"site-{i}": 1 / 3 for i in range(3)})
    for domain in domains:
        base, local, merged = (report["eval"][k][domain]["loss"] for k in ("base", "local", "merged"))
        assert merged < base, (domain, base, merged)
        assert local < base, (domain, base, local)
        assert report["eval"]["merged"][domain]["perplexity"] == pytest.approx(torch.tensor(merged).exp().item())
    # the run's home links the session's base cache in: the same folder
    assert Path(report["base_model"]["ref"]).resolve() == Path(tiny_base).resolve()
    assert report["timings"]["total"] > 0 and report["failures"] == {}
    assert "step 20/20" in result.stdout + result.stderr  # progress was shown
    assert (out / "run.log").is_file() and not (out / ".progress").exists()  # library logs kept, progress cleaned
    assert not (out / "INTERRUPTED").exists()

    # the exported folder is the formula theta_base + sum_i w_i d_i, loads with Auto* and generates
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_base).named_parameters())
    aggregate = load_file(out / "aggregate.safetensors")
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), base[name].detach() + aggregate[name], atol=1e-6, rtol=0)
    prompt = tokenizer("12+3", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(generated[0]), str)
    png = (out / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG")


@pytest.mark.slow
def test_lora_run_with_size_weights(tmp_path, tiny_base):
    out = tmp_path / "lora"
    # two sites: a secure sum of two reveals each vector to the other site, so this run opts out explicitly
    # bfloat16 vectors: stored by the sites, uploaded and kept in the pool in half the bytes
    report, _ = simulate_cli(out, "--sites", "2", "--data", "synthetic:arithmetic,records", "--lora",
                          "--weighting", "size", "--lr", "1e-3", "--aggregation", "plain",
                          "--vector-dtype", "bfloat16", "--keep-pool")
    assert report["aggregation"] == "plain" and report["config"]["vector-dtype"] == "bfloat16"
    pool = sorted((out / "pool").glob("*.safetensors"))
    assert len(pool) == 2 and all(t.dtype == torch.bfloat16 for p in pool for t in load_file(p).values())
    tokens = {s["site"]: s["tokens"] for s in report["sites"]}
    total = sum(tokens.values())
    assert report["weights"] == pytest.approx({k: v / total for k, v in tokens.items()})
    assert report["config"]["lora"] is True
    aggregate = load_file(out / "aggregate.safetensors")
    assert aggregate and all(name.endswith("proj.weight") for name in aggregate)  # only the adapted matrices
    for domain in ("arithmetic", "records"):
        assert report["eval"]["local"][domain]["loss"] < report["eval"]["base"][domain]["loss"]
