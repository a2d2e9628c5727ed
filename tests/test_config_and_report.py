"""The run config (one definition for CLI, flwr run-config and messages), weighting, and the report schema."""

import tomllib
from pathlib import Path

import pytest

from feddem.common.config import RunConfig
from feddem.common.errors import FeddemError
from feddem.common.weighting import WEIGHTINGS, SiteReport, compute_weights
from feddem.server.report import REPORT_KEYS, build_report, read_report, write_report

ROOT = Path(__file__).resolve().parents[1]


def test_flwr_run_config_defaults_match_run_config():
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = RunConfig().to_record()
    for key, value in app_config.items():
        assert key in defaults, f"pyproject run-config key '{key}' is not a RunConfig field"
        assert value == defaults[key], key
    assert RunConfig.from_record(app_config) == RunConfig()


def test_record_round_trip_and_coercion():
    cfg = RunConfig(sites=3, lr=3e-4, lora=True, weighting="size")
    assert RunConfig.from_record(cfg.to_record()) == cfg
    assert RunConfig.from_record({"steps": "5", "lora": "true", "lr": 1}).steps == 5
    assert RunConfig(max_shard_size="500MB").max_shard_bytes == 500 * 10**6
    assert RunConfig(max_shard_size="2GB").max_shard_bytes == 2 * 10**9


@pytest.mark.parametrize("record, message", [
    ({"bogus": 1}, "unknown run-config key 'bogus'"),
    ({"steps": "many"}, "'steps' must be a int"),
    ({"steps": 2.5}, "'steps' must be a int"),
    ({"lora": "maybe"}, "must be true or false"),
    ({"steps": 0}, "steps must be at least 1"),
    ({"lr": -1.0}, "lr must be positive"),
    ({"weighting": "magic"}, "unknown weighting 'magic'"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"vector-dtype": "int8"}, "unknown vector-dtype 'int8': choose one of float32, bfloat16, float16"),
    ({"upload-parts": 0}, "upload-parts must be at least 1, got 0"),
    ({"upload-parts": 4, "aggregation": "plain"}, "upload-parts 4 splits secure aggregation's masked uploads"),
    ({"max-shard-size": "5 parsecs"}, "max-shard-size must be a size such as 500MB or 5GB, got '5 parsecs'"),
    ({"max-shard-size": "0MB"}, "max-shard-size must be a size such as 500MB or 5GB, got '0MB'"),
    ({"lr": "inf"}, "lr must be a finite number, got inf"),
    ({"noise": float("nan")}, "noise must be a finite number, got nan"),
    ({"timeout": -1}, "timeout must be more than 0 and at most 2592000 seconds"),
    ({"timeout": 1e9}, "timeout must be more than 0 and at most 2592000 seconds"),
    ({"seed": 2**32}, "seed must be between 0 and 2\\^32 - 1"),
    ({"lora-alpha": 0}, "lora-alpha must be at least 1, got 0"),
    ({"merge-examples": 0}, "merge-examples must be at least 1, got 0"),
    ({"merge-examples": 1.5}, "'merge-examples' must be a int"),
    ({"weights": "a=0.5,b=1.5"}, "weights {'b': 1.5} are outside \\[weight-min, weight-max\\] = \\[0.0, 1.0\\]"),
])
def test_malformed_config_is_named(record, message):
    with pytest.raises(FeddemError, match=message):
        RunConfig.from_record(record)


def test_values_have_their_fields_types():
    with pytest.raises(FeddemError, match="steps must be a int, got True"):
        RunConfig(steps=True).validate()
    with pytest.raises(FeddemError, match="data must be a str, got 3"):
        RunConfig(data=3).validate()
    RunConfig(lr=1, timeout=60).validate()  # an int where a float is wanted is a number like any other
    RunConfig(aggregation="plain", weights="a=1.5,b=-0.5").validate()  # a trusted run takes any finite weights


def _sites():
    return [SiteReport("a", "x", 10, 100), SiteReport("b", "y", 10, 300)]


def test_uniform_and_size_weights():
    assert set(WEIGHTINGS) >= {"uniform", "size"}
    assert compute_weights("uniform", _sites()) == [0.5, 0.5]
    assert compute_weights("size", _sites()) == [0.25, 0.75]
    with pytest.raises(FeddemError, match="every site reported 0 tokens"):
        compute_weights("size", [SiteReport("a", "x", 0, 0)])
    with pytest.raises(FeddemError, match="no site reported"):
        compute_weights("uniform", [])


def test_report_schema_and_plot(tmp_path):
    sites = [
        {"site": "site-0", "domain": "code", "examples": 10, "tokens": 300, "heldout_examples": 2, "train_loss": 1.0,
         "base_loss": 1.2, "local_loss": 0.9},
        {"site": "site-1", "domain": "prose", "examples": 12, "tokens": 320, "heldout_examples": 2, "train_loss": 1.1,
         "base_loss": 1.4, "local_loss": 1.0},
    ]
    report = build_report({"weighting": "uniform"}, {"ref": "m"}, sites, {"site-0": 0.5, "site-1": 0.5},
                          {"site-0": 1.0, "site-1": 1.3}, {}, {"total": 1.0}, "plain")
    write_report(report, tmp_path)
    loaded = read_report(tmp_path)
    assert all(k in loaded for k in REPORT_KEYS)
    assert loaded["sites"][1] == {k: sites[1][k] for k in ("site", "domain", "examples", "tokens",
                                                          "heldout_examples", "train_loss")}
    # what a site says about its data (format, truncation, its own warnings) and its phase timings are kept
    sites[0] |= {"data_format": "chat", "truncated_examples": 3, "warnings": "code: the held-out test split has 2",
                 "setup_seconds": 1.5, "train_seconds": 2.5, "eval_seconds": 0.5, "seconds": 4.75,
                 "tokens_per_second": 9.0}
    kept = build_report({}, {"ref": "m"}, sites, {"site-0": 1.0}, {"site-0": 1.0}, {}, {}, "plain")
    assert kept["sites"][0] == {k: v for k, v in sites[0].items() if k not in ("base_loss", "local_loss",
                                                                              "tokens_per_second")}
    assert any("code: 3 train/test example(s) were cut to seq-len" in w for w in kept["judgement"]["warnings"])
    assert not any("prose" in w and "cut" in w for w in kept["judgement"]["warnings"])
    assert loaded["eval"]["merged"]["prose"]["loss"] == 1.3
    assert loaded["eval"]["base"]["code"]["perplexity"] == pytest.approx(2.718281828 ** 1.2)
    assert loaded["eval"]["local"]["code"]["loss"] == 0.9
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
