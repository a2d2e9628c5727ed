"""`feddem simulate` on bad input: each problem is named on stderr, exit code 2, no traceback, no Ray started; most
before torch is even imported. The run folder's checks (`server.run_folder`), the exit codes, --version and --help."""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from feddem.common.errors import FeddemError
from feddem.server import cli
from feddem.server.run_folder import RUN_ENTRIES, check_run_folder, clear_run_folder
from tests.conftest import TINY_BASE_STEPS

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "flwr", "transformers", "datasets")  # modules the error path must not import


def _feddem(*args, home, timeout=300):
    env = dict(os.environ, FEDDEM_HOME=str(home), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "feddem.server.cli", "simulate", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _data(tmp_path, files: dict):
    root = tmp_path / "data"
    root.mkdir()
    for name, text in files.items():
        (root / name).write_text(text)
    return str(root)


def _lines(n, prefix):
    return "\n".join(json.dumps({"text": f"{prefix} {i}"}) for i in range(n))


CASES = {
    "missing model folder": (lambda t: ["--model", str(t / "no-model")], "model folder '.*no-model' does not exist"),
    "unknown hub model": (lambda t: ["--model", "no-such-org/no-such-model"],
                          "could not load model 'no-such-org/no-such-model'"),
    "missing data": (lambda t: ["--data", str(t / "nowhere")], "data path '.*nowhere' does not exist"),
    "empty data folder": (lambda t: ["--data", str((t / "d").mkdir() or t / "d")], "holds no site data"),
    "empty file": (lambda t: ["--sites", "3", "--data", _data(t, {"a.jsonl": _lines(5, "a"), "b.jsonl": "",
                                                                   "c.jsonl": _lines(5, "c")})],
                   "data file '.*b.jsonl' is empty"),
    "site with no examples": (lambda t: ["--sites", "3", "--data", _data(t, {"a.txt": "x\ny\n", "b.txt": "\n\n",
                                                                             "c.txt": "z\nw\n"})],
                              "'.*b.txt' has no non-empty examples"),
    "too many sites": (lambda t: ["--sites", "9"], "--sites 9 is more than the 4 shard"),
    "bad number": (lambda t: ["--steps", "0"], "steps must be at least 1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_error(case, tmp_path, feddem_home):
    make_args, pattern = CASES[case]
    result = _feddem(*make_args(tmp_path), "--base-steps", "30", home=feddem_home)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert re.search(pattern, result.stderr), result.stderr[-2000:]
    assert "Initialising: RayBackend" not in result.stdout + result.stderr


def test_bad_choice_is_rejected_by_the_parser(tmp_path, feddem_home):
    result = _feddem("--weighting", "magic", home=feddem_home)
    assert result.returncode == 2 and "invalid choice: 'magic'" in result.stderr


def test_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "feddem.server.cli", "simulate", "--help"], capture_output=True, text=True,
                         timeout=120).stdout
    for option in ("--sites N", "--out DIR", "--model NAME_OR_DIR", "--data SPEC", "--steps", "--lr", "--batch-size",
                   "--seq-len", "--lora", "--weighting", "--device", "--seed"):
        assert option in out, option
    assert "uniform,size" in out and "auto,cpu,cuda" in out


def _file(tmp_path):
    (tmp_path / "a-file").write_text("x")
    return tmp_path / "a-file"


def _run_folder(tmp_path, *extra):
    out = tmp_path / "old-run"
    (out / "model").mkdir(parents=True)
    (out / "pool").mkdir()
    (out / "pool" / "site-0.safetensors").write_bytes(b"old")
    (out / "report.json").write_text("{}")
    for name in extra:
        (out / name).write_text("mine")
    return out


# each fails in the quick checks: no torch, no Ray; (args, stderr pattern)
QUICK = {
    "lr inf": (lambda t: ["--lr", "inf"], "lr must be a finite number, got inf"),
    "lr nan": (lambda t: ["--lr", "nan"], "lr must be a finite number, got nan"),
    "negative timeout": (lambda t: ["--timeout", "-1"], "timeout must be more than 0 and at most 2592000 seconds"),
    "infinite timeout": (lambda t: ["--timeout", "inf"], "timeout must be a finite number, got inf"),
    "infinite clip": (lambda t: ["--clip", "1e999"], "clip must be a finite number, got inf"),
    "nan dga-ema": (lambda t: ["--dga-ema", "nan"], "dga-ema must be a finite number, got nan"),
    "no sites": (lambda t: ["--sites", "0"], "sites must be at least 1, got 0"),
    "seq-len 0": (lambda t: ["--seq-len", "0"], "seq-len must be at least 8, got 0"),
    "negative batch size": (lambda t: ["--batch-size", "-1"], "batch-size must be at least 1, got -1"),
    "lora-alpha 0": (lambda t: ["--lora-alpha", "0"], "lora-alpha must be at least 1, got 0"),
    "merge-examples 0": (lambda t: ["--merge", "fisher", "--merge-examples", "0"],
                         "merge-examples must be at least 1, got 0"),
    "negative seed": (lambda t: ["--seed", "-1"], r"seed must be between 0 and 2\^32 - 1, got -1"),
    "duplicate weights": (lambda t: ["--weights", "site-0=0.5,site-0=0.5"], "weights: site-0 is given twice"),
    "infinite weight": (lambda t: ["--weights", "site-0=inf,site-1=0.5"],
                        r"weights: the weight of site-0 is not finite"),
    "weights miss a site": (lambda t: ["--sites", "3", "--weights", "site-0=0.5,site-1=0.5"],
                            r"--weights: unknown site\(s\) \[\], missing site\(s\) \['site-2'\]"),
    "weights name no site": (lambda t: ["--sites", "2", "--aggregation", "plain", "--weights", "site-1=0.5,site-2=0.5"],
                             r"unknown site\(s\) \['site-2'\], missing site\(s\) \['site-0'\]"),
    "weight above weight-max": (lambda t: ["--sites", "3", "--weights", "site-0=2,site-1=0.5,site-2=0.5"],
                                r"weights \{'site-0': 2.0\} are outside \[weight-min, weight-max\]"),
    "ablate names no site": (lambda t: ["--aggregation", "plain", "--ablate", "site-0,site-9"],
                             r"ablation: unknown site\(s\) \['site-9'\]"),
    "missing data": (lambda t: ["--data", str(t / "nowhere")], "data path '.*nowhere' does not exist"),
    "data is a file": (lambda t: ["--data", str(_file(t))], "data path '.*a-file' is a file"),
    "unknown synthetic domain": (lambda t: ["--data", "synthetic:arithmetic,poetry"],
                                 r"unknown synthetic domain\(s\) \['poetry'\]"),
    "too many sites": (lambda t: ["--sites", "9"], "--sites 9 is more than the 4 shard"),
    "missing target": (lambda t: ["--weighting", "dga", "--target", str(t / "nowhere")],
                       "target path '.*nowhere' does not exist"),
    "missing model folder": (lambda t: ["--model", str(t / "no-model")], "model folder '.*no-model' does not exist"),
    "model folder without config": (lambda t: ["--model", str(t)], "has no config.json"),
    "out under a file": (lambda t: ["--out", str(_file(t) / "run")], "--out '.*a-file/run' is under '.*a-file', which "
                                                                      "is a file"),
    "out is a file": (lambda t: ["--out", str(_file(t))], "--out '.*a-file' is a file"),
    "out under /proc": (lambda t: ["--out", "/proc/feddem-run"], "--out '/proc/feddem-run' cannot be created or "
                                                                  "written here"),
    "out is /proc": (lambda t: ["--out", "/proc"], "--out '/proc' cannot be created or written here"),
    "out not empty": (lambda t: ["--out", str(_run_folder(t))], "--out '.*old-run' is not empty \\(it holds model, "
                                                                 "pool, report.json\\).*--overwrite"),
    "overwrite a folder with other files": (lambda t: ["--out", str(_run_folder(t, "notes.txt")), "--overwrite"],
                                            "--overwrite clears only a previous run's folder, and --out '.*old-run' "
                                            "also holds notes.txt"),
    "overwrite home": (lambda t: ["--out", str(Path.home()), "--overwrite"], "--overwrite will not clear"),
}


@pytest.mark.parametrize("case", list(QUICK))
def test_bad_input_is_named_before_torch_loads(case, tmp_path, feddem_home):
    make_args, pattern = QUICK[case]
    args = make_args(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    started = time.perf_counter()
    env = dict(os.environ, FEDDEM_HOME=str(feddem_home), PYTHONPROFILEIMPORTTIME="1")
    result = subprocess.run([sys.executable, "-m", "feddem.server.cli", "simulate", *args], capture_output=True,
                            text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - started
    assert result.returncode == 2, result.stderr[-2000:]
    messages = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert re.search(pattern, "\n".join(messages)), messages
    assert "Traceback" not in result.stderr + result.stdout
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "feddem.server.precheck" in imported  # the import log works
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY)
    assert not heavy, heavy
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing created, nothing cleared
    assert elapsed < 30, elapsed  # typically well under 1 s; generous for a loaded machine


def test_out_folder_is_checked_without_leaving_a_trace(tmp_path, monkeypatch):
    new = tmp_path / "a" / "b" / "run"
    assert check_run_folder(str(new)) == new
    assert list(tmp_path.iterdir()) == []  # the folders made for the write probe are gone again
    (tmp_path / "empty").mkdir()
    assert check_run_folder(str(tmp_path / "empty")) == tmp_path / "empty"
    assert list((tmp_path / "empty").iterdir()) == []
    monkeypatch.setenv("FEDDEM_HOME", str(tmp_path / "home"))
    assert check_run_folder("") == tmp_path / "home" / "runs"  # the default: each run makes its folder there
    assert not (tmp_path / "home").exists()
    monkeypatch.setenv("FEDDEM_HOME", str(_file(tmp_path)))
    with pytest.raises(FeddemError, match="default run folder '.*a-file/runs'.*is under '.*a-file', which is a file"):
        check_run_folder("")


def test_overwrite_clears_only_a_run_folder(tmp_path, monkeypatch):
    out = _run_folder(tmp_path)
    elsewhere = tmp_path / "keep"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("x")
    (out / "model" / "weights").symlink_to(elsewhere)  # a link is removed, never followed
    with pytest.raises(FeddemError, match="is not empty"):
        check_run_folder(str(out))
    assert check_run_folder(str(out), overwrite=True) == out
    clear_run_folder(out)
    assert list(out.iterdir()) == [] and (elsewhere / "precious").read_text() == "x"
    assert RUN_ENTRIES >= {"model", "pool", "report.json", "report.png", "ablation.json"}

    out = _run_folder(tmp_path / "second")
    (out / "model" / "inner").mkdir()
    monkeypatch.chdir(out / "model" / "inner")  # the working directory is inside: clearing would delete it
    with pytest.raises(FeddemError, match="will not clear"):
        check_run_folder(str(out), overwrite=True)
    monkeypatch.chdir(out)  # the run folder itself may be the working directory: only its contents go
    assert check_run_folder(".", overwrite=True) == out
    monkeypatch.setenv("FEDDEM_HOME", str(out / "pool"))  # never $FEDDEM_HOME or a folder above it
    with pytest.raises(FeddemError, match="will not clear"):
        check_run_folder(str(out), overwrite=True)
    for protected in ("/", str(Path.home())):
        with pytest.raises(FeddemError, match="will not clear|not empty"):
            check_run_folder(protected, overwrite=True)


def test_version_and_exit_codes_are_documented():
    result = subprocess.run([sys.executable, "-m", "feddem.server.cli", "--version"], capture_output=True, text=True,
                            timeout=60)
    import feddem

    assert result.returncode == 0 and result.stdout.strip() == f"feddem {feddem.__version__}"
    codes = {cli.EXIT_OK: "0", cli.EXIT_FAILED: "1", cli.EXIT_USAGE: "2", cli.EXIT_DIVERGED: "3",
             cli.EXIT_INTERRUPTED: "130"}
    assert len(codes) == 5  # all different
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    for code in codes.values():
        assert re.search(rf"^\| `{code}` \|", section, re.M), code


def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_every_option_has_help_text():
    from feddem.client import cli as site_cli

    parsers = list(_all_parsers(cli.build_parser())) + list(_all_parsers(site_cli.build_parser()))
    assert {p.prog for p in parsers} >= {"feddem simulate", "feddem ablate", "feddem certs", "feddem server",
                                         "feddem-site prune"}
    for parser in parsers:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, (parser.prog, action.option_strings or action.dest)
    out = subprocess.run([sys.executable, "-m", "feddem.server.cli", "simulate", "--help"], capture_output=True,
                         text=True, timeout=120).stdout
    assert "{float32,bfloat16,float16}" in out and "--overwrite" in out
    assert "--merge-examples MERGE_EXAMPLES" in out and "rule's statistics are computed on" in " ".join(out.split())


def test_a_refused_run_clears_nothing(tmp_path, feddem_home):
    """--overwrite clears the old run only once every check has passed, those that load the data included."""
    out = _run_folder(tmp_path)
    data = _data(tmp_path, {"a.jsonl": _lines(5, "a"), "b.jsonl": ""})
    result = _feddem("--sites", "2", "--aggregation", "plain", "--data", data, "--out", str(out), "--overwrite",
                     home=feddem_home)
    assert result.returncode == 2 and re.search("data file '.*b.jsonl' is empty", result.stderr), result.stderr[-2000:]
    assert (out / "pool" / "site-0.safetensors").read_bytes() == b"old"


@pytest.mark.slow
def test_too_little_data_for_one_block_is_named_before_ray(tmp_path, feddem_home, tiny_base):
    """Found by tokenizing (so with the base model built: slow on a cold cache), still before Ray starts."""
    result = _feddem("--train-examples", "1", "--seq-len", "512", "--base-steps", str(TINY_BASE_STEPS),
                     home=feddem_home)
    assert result.returncode == 2, result.stderr[-2000:]
    assert re.search(r"site-0's training data gives \d+ tokens, fewer than one block of --seq-len 512", result.stderr)
    assert "Initialising: RayBackend" not in result.stdout + result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_diverged_run_has_its_own_exit_code(tmp_path, feddem_home, tiny_base):
    """A huge learning rate makes the sites' loss inf/nan: the run fails with exit code 3, not 2 (bad usage). It runs
    with --overwrite into an old run's folder, which is cleared when the run starts: no old pool/ is left."""
    out = _run_folder(tmp_path)
    result = _feddem("--sites", "2", "--aggregation", "plain", "--steps", "4", "--lr", "1e30", "--train-examples",
                     "40", "--eval-examples", "8", "--base-steps", str(TINY_BASE_STEPS), "--seq-len", "32",
                     "--batch-size", "4", "--out", str(out), "--overwrite", home=feddem_home, timeout=900)
    assert result.returncode == cli.EXIT_DIVERGED, result.stderr[-3000:]
    assert "training diverged" in result.stderr and "Traceback" not in result.stderr
    assert not (out / "pool").exists() and not (out / "report.json").exists()


def test_a_hub_dataset_spec_is_not_taken_for_a_missing_folder():
    from feddem.server.precheck import _check_data_spec

    assert _check_data_spec("hf:org/name", "data") is None
    with pytest.raises(FeddemError, match="does not exist"):
        _check_data_spec("no/such/folder", "data")


def test_feddem_sites_names_the_site_operators_command(capsys):
    assert cli.main(["sites", "prune", "--keep", "2"]) == cli.EXIT_USAGE
    assert "run `feddem-site prune --keep 2`" in capsys.readouterr().err
