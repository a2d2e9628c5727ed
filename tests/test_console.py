"""What `feddem simulate` shows a person: stage lines, each site's progress, the overall ETA and the closing table;
library noise only in run.log; no colour codes when the output is not a terminal."""

import io
import os
import re
import subprocess
import sys

import pytest

from feddem.common.progress import ProgressWriter, read_progress
from feddem.server.console import Overall, RunConsole
from feddem.server.report import build_report
from tests.conftest import TINY_BASE_STEPS

ANSI = re.compile(r"\x1b\[")
NOISE = [  # what the console printed before: library logs, bars, warnings, Ray's actor prefixes
    "setup plugin", "DEPRECATED", "deprecated", "FutureWarning", "Loading weights", "handled in", "Backend config",
    "backend_config", "ServerApp finished running", "Triggered stop event", "RayBackend", "ActorPool",
    "ClientAppActor", "Token indices sequence length", "Writing model shards", "it/s]", "Pre-registering",
    "Registered 3 nodes", "Traceback",
]


def _progress(folder, site, domain, steps, upto):
    writer = ProgressWriter(site, domain, steps, tokens_per_step=512, interval=0.0, folder=str(folder))
    for step in range(1, upto + 1):
        writer.step(step, 3.0 - step / steps)


def test_progress_files_round_trip(tmp_path):
    _progress(tmp_path, "site-0", "arithmetic", 8, 3)
    _progress(tmp_path, "site-1", "records", 8, 8)
    progress = read_progress(tmp_path)
    assert sorted(progress) == ["site-0", "site-1"]
    assert (progress["site-0"].step, progress["site-0"].steps, progress["site-0"].domain) == (3, 8, "arithmetic")
    assert progress["site-1"].eta_seconds == 0 and progress["site-1"].tokens_per_second > 0
    assert not list(tmp_path.glob(".*.tmp"))  # written by rename: no temporary file left
    (tmp_path / "site-2.json").write_text('{"site": "site-2", "st')  # a torn file is skipped, not an error
    assert sorted(read_progress(tmp_path)) == ["site-0", "site-1"]


def test_a_site_without_the_variable_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDDEM_PROGRESS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    ProgressWriter("site-0", "arithmetic", 4, 512, interval=0.0).step(1, 2.0)
    assert list(tmp_path.iterdir()) == []


def test_overall_eta_counts_every_site():
    overall = Overall(sites=2, steps=10)
    assert overall.update({}, now=0.0) == (0, None)
    _, eta = overall.update({"a": _site("a", 1)}, now=0.0)
    assert eta is None  # no rate yet
    done, eta = overall.update({"a": _site("a", 5), "b": _site("b", 5)}, now=10.0)
    assert done == 10 and eta == pytest.approx(10 * 10 / 9)  # 9 steps in 10 s since the first, 10 steps left
    assert "training: 10/20 steps (50%)" in overall.text(done, eta)


def _site(name, step, steps=10):
    from feddem.common.progress import SiteProgress

    return SiteProgress(name, "d", step, steps, 2.5, 1000.0, 1.0, 0.0)


def test_not_a_terminal_prints_quarters_without_colour(tmp_path):
    stream = io.StringIO()
    display = RunConsole(sites=1, steps=8, stream=stream)
    assert not display.live
    for upto in range(1, 9):
        _progress(tmp_path, "site-0", "arithmetic", 8, upto)
        display.progress(read_progress(tmp_path))
    display.stage("a warning", level=30)
    site = {"site": "site-0", "domain": "arithmetic", "examples": 8, "tokens": 64, "heldout_examples": 40,
            "train_loss": 1.5, "base_loss": 2.0, "local_loss": 1.0}
    display.summary(build_report({}, {}, [site], {"site-0": 1.0}, {"site-0": 1.25}, {}, {}, "secure"), tmp_path)
    text = stream.getvalue()
    assert [int(m) for m in re.findall(r"step (\d+)/8", text)] == [2, 4, 6, 8]  # each quarter once
    assert "training: 8/8 steps (100%)" in text and "ETA 0:00:00" in text
    assert re.search(r"arithmetic\s+.\s+site-0\s+.\s+1\.000\s+.\s+2\.0000\s+.\s+1\.0000\s+.\s+1\.2500\s+.\s+75%", text), text
    assert not ANSI.search(text)


@pytest.mark.slow
def test_simulate_console_is_readable(tmp_path, tiny_base):
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("FORCE_COLOR", None)
    result = subprocess.run(
        [sys.executable, "-m", "feddem.server.cli", "simulate", "--out", str(out), "--sites", "3", "--steps", "8",
         "--train-examples", "60", "--eval-examples", "20", "--base-steps", str(TINY_BASE_STEPS)],
        capture_output=True, text=True, env=env, timeout=600)
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-4000:]
    for i, domain in enumerate(("arithmetic", "records", "prose")):
        assert re.search(rf"site-{i} \({domain}\): step 8/8, loss \d+\.\d+, [\d.]+k? tok/s, ETA 0:00:00", console)
    assert "training: 24/24 steps (100%)" in console
    assert "is this merge good?" in console and "merged model:" in console  # the closing table and the paths
    assert "local fine-tuning: 3 of 3 site(s) replied" in console  # the stage lines
    found = [noise for noise in NOISE if noise in console]
    assert not found, f"noise on the console: {found}\n{console}"
    assert not ANSI.search(console), console
    assert len(console.splitlines()) < 60, console
    log = (out / "run.log").read_text()
    assert "(ClientAppActor" in log and "step 8/8" in log  # the sites' output went to run.log
    assert "`run_simulation` function is deprecated" not in log  # filtered (meant for Flower's own users)
    assert not ANSI.search(log)


def test_rounds_continue_the_overall_count(tmp_path):
    stream = io.StringIO()
    display = RunConsole(sites=1, steps=4, stream=stream, rounds=2)
    for _ in range(2):  # the site's progress file starts again at step 1 in round 2
        for upto in range(1, 5):
            _progress(tmp_path, "site-0", "arithmetic", 4, upto)
            display.progress(read_progress(tmp_path))
    text = stream.getvalue()
    assert "round 1/2: site-0 (arithmetic): step 4/4" in text and "round 2/2: site-0 (arithmetic): step 4/4" in text
    assert "training: 8/8 steps (100%)" in text
