"""The report that judges a merge (kept share, warnings, means, rounds, generation, closing table, plot), the
cross-domain matrix (computed in a plain run, withheld in a secure one), and the export: model card, one permission
policy, tied and untied embeddings, tokenizer, chat template and generation config kept."""

import json
import os
import stat

import pytest
import torch
import yaml
from rich.console import Console

from feddem.common import messages as M
from feddem.common.config import RunConfig
from feddem.server.cross_domain import BY_FEDERATION, DIAGONAL_REUSED, federated_matrix, local_model_vector
from feddem.server.export import export_model
from feddem.server.model_card import model_card, write_model_card
from feddem.server.report import (
    REPORT_KEYS, build_report, closing_table, judge, kept_share, read_report, write_report,
)


def _site(name, domain, base, local, held=40):
    return {"site": name, "domain": domain, "examples": 10, "tokens": 100, "heldout_examples": held,
            "train_loss": 1.0, "base_loss": base, "local_loss": local}


@pytest.mark.parametrize("base, local, merged, share, note", [
    (2.0, 1.0, 1.5, 0.5, "keeps 50%"),
    (2.0, 1.0, 0.8, 1.2, "beats the site's own model"),
    (2.0, 1.0, 2.2, -0.2, "worse than the base"),
    (2.0, 2.0, 1.9, None, "no local gain"),
    (2.0, 2.5, 1.9, None, "made its domain worse than the base"),
])
def test_kept_share_and_its_meaning(base, local, merged, share, note):
    got, text = kept_share(base, local, merged)
    assert (got is None) if share is None else got == pytest.approx(share)
    assert note in text


def test_judgement_warns_where_the_merge_is_worse_than_the_base_and_takes_means():
    sites = [_site("site-0", "code", 2.0, 1.0, held=40), _site("site-1", "prose", 3.0, 2.0, held=40),
             _site("site-2", "math", 1.0, 1.0, held=8), _site("site-3", "law", 1.5, 1.0)]
    j = judge(sites, {"site-0": 1.5, "site-1": 3.5, "site-2": 0.9})
    rows = j["domains"]
    assert rows["code"]["kept_share"] == pytest.approx(0.5) and "warning" not in rows["code"]
    assert rows["prose"]["kept_share"] == pytest.approx(-0.5) and "worse than the base on prose" in rows["prose"]["warning"]
    assert rows["math"]["kept_share"] is None and rows["law"]["merged"] is None
    assert j["mean"]["base"] == pytest.approx((2 + 3 + 1 + 1.5) / 4)
    assert j["mean"]["local"] == pytest.approx((1 + 2 + 1 + 1) / 4)
    assert j["mean"]["merged"] == pytest.approx((1.5 + 3.5 + 0.9) / 3)  # over the domains that were evaluated
    assert j["mean"]["kept_share"] == pytest.approx(0.0) and j["mean"]["kept_share_domains"] == 2
    warnings = "\n".join(j["warnings"])
    assert "worse than the base on prose" in warnings and "math: only 8 held-out" in warnings
    assert "law: the merge was not evaluated" in warnings and "code" not in warnings


def _report(rounds=None, records=None, cross=None, **sites_kw):
    sites = [_site("site-0", "code", 1.2, 0.9, **sites_kw), _site("site-1", "prose", 1.4, 1.0, **sites_kw)]
    extra = {"weighting": "uniform", "rounds": rounds or []} | ({"cross_domain": cross} if cross else {})
    return build_report({"weighting": "uniform"}, {"ref": "org/base", "checksum": "ab" * 32}, sites,
                        {"site-0": 0.5, "site-1": 0.5}, {"site-0": 1.0, "site-1": 1.45}, {}, {"total": 1.0},
                        "plain", extra=extra, merged_records=records)


def test_report_json_png_and_closing_table_with_rounds_generation_and_matrix(tmp_path):
    rounds = [{"round": 1, "weights": {}, "mean_merged_loss": 1.31}, {"round": 2, "weights": {}, "mean_merged_loss": 1.225}]
    samples = json.dumps([{"prompt": "2+2?", "reference": "4", "answer": "4"}])
    records = {"site-0": {"gen_exact_match": 0.5, "gen_rouge_l": 0.7, "samples": samples}}
    cross = federated_matrix({1: "site-0", 2: "site-1"}, lambda node: {"w": torch.ones(1) * node},
                             lambda v, ask: {n: r for n, r in {1: ("code", 0.9 + float(v["w"][0]) / 10),
                                                               2: ("prose", 1.5)}.items() if n in ask})
    # the base's generation figures come with the training reply, under base_*
    sites = [_site("site-0", "code", 1.2, 0.9) | {"base_gen_exact_match": 0.25, "base_gen_rouge_l": 0.5,
                                                   "base_samples": json.dumps([{"prompt": "2+2?", "reference": "4",
                                                                                "answer": "5"}])}]
    report = build_report({}, {"ref": "m"}, sites + [_site("site-1", "prose", 1.4, 1.0)], {"site-0": 0.5, "site-1": 0.5},
                          {"site-0": 1.0, "site-1": 1.45}, {}, {}, "plain",
                          extra={"weighting": "uniform", "rounds": rounds, "cross_domain": cross},
                          merged_records=records)
    gen = report["generation"]
    assert gen["base"]["code"] == {"gen_exact_match": 0.25, "gen_rouge_l": 0.5}
    assert gen["merged"]["code"]["gen_rouge_l"] == 0.7 and "prose" not in gen["merged"]
    assert gen["samples"]["code"] == [{"prompt": "2+2?", "reference": "4", "base": "5", "merged": "4"}]
    assert cross["loss"] == {"site-0": {"code": 1.0, "prose": 1.5}, "site-1": {"code": 1.1, "prose": 1.5}}
    assert cross["best_on_domain"]["code"] == "site-0" and cross["computed_by"] == BY_FEDERATION

    write_report(report, tmp_path)
    loaded = read_report(tmp_path)
    assert all(k in loaded for k in REPORT_KEYS)
    assert loaded["judgement"]["domains"]["prose"]["warning"].startswith("the merge is worse than the base")
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000

    console = Console(record=True, width=200)
    console.print(closing_table(loaded))
    text = console.export_text()
    assert "code" in text and "67%" in text and "worse than base" in text  # (1.2-1.0)/(1.2-0.9)
    assert "mean" in text and "1.3000" in text  # mean base
    assert "0.250>0.500" in text and "1: 1.3100, 2: 1.2250" in text and "cross-domain matrix in report.json" in text


def test_report_without_generation_or_matrix_still_plots_and_tabulates(tmp_path):
    report = _report(cross={"status": "withheld", "reason": "withheld: needs each site's vector"})
    assert "generation" not in report
    write_report(report, tmp_path)
    console = Console(record=True, width=200)
    console.print(closing_table(report))
    assert "cross-domain matrix withheld: withheld: needs each site's vector" in console.export_text()


def test_local_model_vector_adds_the_start():
    start = {"a": torch.ones(2), "b": torch.zeros(1)}
    d = {"a": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    out = local_model_vector(start, d)
    assert torch.equal(out["a"], torch.tensor([2.0, 3.0])) and torch.equal(out["b"], torch.zeros(1))
    assert torch.equal(start["a"], torch.ones(2))  # the start is not changed
    assert local_model_vector(None, d).keys() == {"a"}


def test_model_card_content():
    report = _report()
    card = model_card(report, chat_template=True)
    _, front, body = card.split("---", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == "org/base" and meta["library_name"] == "transformers"
    assert {"feddem", "merge"} <= set(meta["tags"])
    assert "ab" * 32 in body and "| site-1 | prose | 10 | 100 | 0.5000 |" in body
    assert "plain aggregation" in body and "| prose | 1.4000 | 1.0000 | 1.4500 (worse than base) | -13% |" in body
    assert "AutoModelForCausalLM.from_pretrained" in body and '"role": "user"' in body
    assert "No per-domain evaluation" in model_card({"base_model": {"ref": "m"}, "sites": [], "weights": {}})


# --- export -------------------------------------------------------------------------------------------------

def _tiny_folder(path, tie: bool):
    from feddem.common.modeling import build_model, tiny_llama_config
    from feddem.common.tokenizer import build_byte_tokenizer

    model = build_model(tiny_llama_config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          tie_word_embeddings=tie), seed=0)
    model.generation_config.max_new_tokens = 17  # a base setting the export must keep
    tokenizer = build_byte_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


@pytest.mark.parametrize("tie, stored_twice", [(True, False), (False, False), (True, True)])
def test_export_keeps_ties_tokenizer_chat_template_generation_config_and_one_permission_policy(tmp_path, tie,
                                                                                              stored_twice):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    base = _tiny_folder(tmp_path / "base", tie)
    if stored_twice:  # a tied checkpoint that stores the output embedding too (not what save_pretrained writes)
        weights = load_file(tmp_path / "base" / "model.safetensors")
        assert "lm_head.weight" not in weights
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
        save_file(weights, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    params = dict(base.named_parameters())
    assert ("lm_head.weight" in params) is (not tie)  # a tied weight is one parameter
    torch.manual_seed(1)
    vector = {name: torch.randn_like(p) * 0.01 for name, p in params.items()}
    old = os.umask(0o027)  # group may read, others nothing
    try:
        folder = export_model(str(tmp_path / "base"), vector, tmp_path / "model", 10**9)
        write_model_card(folder, _report())
    finally:
        os.umask(old)
    merged = AutoModelForCausalLM.from_pretrained(folder)
    assert merged.config.tie_word_embeddings is tie
    same = merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    assert same is tie
    for name, p in merged.named_parameters():
        torch.testing.assert_close(p.detach(), params[name].detach() + vector[name], atol=1e-6, rtol=0)
    if not tie:
        assert not torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<user>hi"
    assert GenerationConfig.from_pretrained(folder).max_new_tokens == 17
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert "model.safetensors" in modes and "README.md" in modes
    assert set(modes.values()) == {0o640}, modes
    assert '"role": "user"' in (folder / "README.md").read_text()  # the card knows it has a chat template


# --- the matrix in runs over the real ClientApp (in-process grid) -------------------------------------------

def _cfg(base, out, **kw) -> RunConfig:
    values = dict(sites=3, model=str(base), steps=1, train_examples=8, eval_examples=4, batch_size=4, seq_len=32,
                  base_steps=30, device="cpu", timeout=5.0, out_dir=str(out))
    return RunConfig(**(values | kw))


@pytest.fixture
def grid_run(tiny_base, tmp_path):
    from feddem.server.workflow import run_dem
    from tests.fakegrid import RUN_ID, FakeGrid, task_identity

    def run(nodes=(11, 22, 33), **kw):
        grid = FakeGrid(tmp_path / "sites", list(nodes))
        with task_identity():
            return grid, run_dem(grid, _cfg(tiny_base, tmp_path / "run", **kw), RUN_ID).report

    return run


@pytest.mark.slow  # an in-process run of 18 site messages (about a minute on 2 busy cores)
def test_plain_two_round_run_computes_the_matrix_and_judges_every_round(grid_run):
    # the server holds each vector (pool): a site sends a vector in the clear once, so only then can it be formed
    grid, report = grid_run(nodes=(11, 22), sites=2, aggregation="plain", rounds=2, keep_pool=True)
    cross = report["cross_domain"]
    assert cross["status"] == "computed" and cross["computed_by"] == BY_FEDERATION
    domains = [s["domain"] for s in report["sites"]]
    assert set(cross["loss"]) == {"site-0", "site-1"}
    # each local model (start + d_j) on its own domain is what the site measured in training: taken from there
    assert cross["diagonal"] == DIAGONAL_REUSED
    for s in report["sites"]:
        assert set(cross["loss"][s["site"]]) == set(domains)
        assert cross["loss"][s["site"]][s["domain"]] == report["eval"]["local"][s["domain"]]["loss"]
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for r in report["rounds"]:
        assert set(r["merged_loss"]) == set(domains)
        assert r["mean_merged_loss"] == pytest.approx(sum(r["merged_loss"].values()) / 2)
    assert report["rounds"][-1]["merged_loss"] == {d: report["eval"]["merged"][d]["loss"] for d in domains}
    assert report["judgement"]["mean"]["merged"] == pytest.approx(report["rounds"][-1]["mean_merged_loss"])
    # each vector is uploaded once per round and held; the matrix asks for none again (a site would refuse)
    assert grid.sent.count(M.UPLOAD) == 2 * 2
    assert "warnings" in report["judgement"] and len(report["rounds"][0]["merged_loss"]) == 2


def test_a_secure_run_withholds_the_matrix_without_asking_the_sites_anything():
    from feddem.server.workflow import _cross_domain

    # no stage, no merger: a secure run must not touch either (it never asks a site for its vector)
    section = _cross_domain(RunConfig(aggregation="secure"), None, None, [1, 2, 3], None)
    assert section["status"] == "withheld" and section["reason"].startswith("withheld: needs each site's vector")


@pytest.mark.slow  # an in-process secure two-round run (about a minute on 2 busy cores)
def test_secure_two_round_run_withholds_the_matrix_and_the_simulation_driver_recovers_it(grid_run, tmp_path,
                                                                                       monkeypatch):
    from feddem.client import site as site_module
    from feddem.server.cross_domain import BY_SIMULATION, simulation_matrix

    evaluated, evaluate_base = [], site_module.evaluate_base

    def counted(model, tokenizer, heldout, *args):  # the base's evaluations at the sites, with what they found
        loss, extra = evaluate_base(model, tokenizer, heldout, *args)
        evaluated.append(loss["loss"])
        return loss, extra

    replied, fine_tune = {}, site_module.fine_tune

    def recorded(*args, **kwargs):  # each training reply's base loss, by site
        result = fine_tune(*args, **kwargs)
        replied.setdefault(result["site"], []).append(result["base_loss"])
        return result

    monkeypatch.setattr(site_module, "evaluate_base", counted)
    monkeypatch.setattr(site_module, "fine_tune", recorded)
    grid, report = grid_run(rounds=2)
    # each site evaluated the base once in two rounds of training: round 2 replied with round 1's figures, which
    # are the report's base losses
    assert grid.sent.count(M.TRAIN) == 2 * 3 and len(evaluated) == 3
    assert all(len(losses) == 2 and losses[0] == losses[1] for losses in replied.values()) and len(replied) == 3
    assert sorted(report["eval"]["base"][s["domain"]]["loss"] for s in report["sites"]) == sorted(evaluated)
    assert report["aggregation"] == "secure" and report["cross_domain"]["status"] == "withheld"
    assert M.UPLOAD not in grid.sent and grid.sent.count(M.EVALUATE) == 2 * 3  # each round's merge, nothing more
    assert [r["round"] for r in report["rounds"]] == [1, 2] and all(r["mean_merged_loss"] for r in report["rounds"])
    # the driver (one owner of every site) forms it from the stored vectors: start of round 2 + d_j on every domain
    cfg = _cfg(report["base_model"]["ref"], tmp_path / "run", rounds=2)
    cross = simulation_matrix(cfg, report, tmp_path / "run",
                              {f"site-{i}": tmp_path / "sites" / f"site-{i}" for i in range(3)})
    assert cross["computed_by"] == BY_SIMULATION and "multi-round" in cross["note"]
    for s in report["sites"]:  # its diagonal is what each site measured of its own local model
        assert cross["loss"][s["site"]][s["domain"]] == pytest.approx(
            report["eval"]["local"][s["domain"]]["loss"], rel=1e-4)


@pytest.mark.slow
def test_simulate_reports_kept_share_and_the_drivers_matrix_and_exports_a_card(tmp_path, tiny_base):
    """A short secure `feddem simulate`: the ServerApp withholds the matrix, the simulation driver fills it in."""
    from tests.conftest import simulate_cli

    out = tmp_path / "run"
    report, _ = simulate_cli(out, "--sites", "3", "--steps", "5", "--train-examples", "60", "--eval-examples", "20")
    assert report["aggregation"] == "secure"
    for domain, row in report["judgement"]["domains"].items():
        base, local, merged = row["base"], row["local"], row["merged"]
        assert row["kept_share"] == pytest.approx((base - merged) / (base - local))
    cross = report["cross_domain"]
    assert cross["status"] == "computed" and cross["computed_by"].startswith("simulation driver, outside")
    assert cross["diagonal"] == DIAGONAL_REUSED  # what each site measured of its own model, not evaluated again
    for s in report["sites"]:
        row = cross["loss"][s["site"]]
        assert row[s["domain"]] == report["eval"]["local"][s["domain"]]["loss"]
        assert len(row) == 3 and all(v > 0 for v in row.values())  # and the other domains evaluated
    card = (out / "model" / "README.md").read_text()
    assert "tags:\n- feddem\n- merge" in card and report["base_model"]["checksum"] in card
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (out / "model").iterdir()}
    assert len(modes) == 1, modes
