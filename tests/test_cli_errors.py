"""`feddem simulate` on bad input: each problem is named on stderr, exit code 2, no traceback, no Ray started."""

import json
import os
import subprocess
import sys

import pytest


def _feddem(*args, home):
    env = dict(os.environ, FEDDEM_HOME=str(home), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "feddem.server.cli", "simulate", *args], capture_output=True, text=True,
                          env=env, timeout=300)


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
    import re

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
