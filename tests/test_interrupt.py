"""A real signal to a real `feddem simulate` during training: the run stops within seconds, every process it started
is gone, the run folder is marked INTERRUPTED without a report, and the exit code is 128 + the signal."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import TINY_BASE_STEPS
from tests.processes import TAG_VAR, stop, tagged

STOP_WITHIN = 15.0  # seconds from the signal to the exit (the stop itself takes ~3-5 s; a loaded CI machine more)


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in (path.read_text(errors="replace") if path.exists() else ""):
            return
        if proc.poll() is not None:
            pytest.fail(f"feddem exited with {proc.returncode} before '{text}':\n{path.read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"no '{text}' within {timeout:.0f} s:\n{path.read_text(errors='replace')[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_training_stops_the_run(sig, tmp_path, tiny_base):
    out, console = tmp_path / "run", tmp_path / "console.txt"
    tag = uuid.uuid4().hex
    env = dict(os.environ, HF_HUB_OFFLINE="1", **{TAG_VAR: tag})
    args = [sys.executable, "-m", "feddem.server.cli", "simulate", "--out", str(out), "--sites", "2",
            "--data", "synthetic:arithmetic,records", "--aggregation", "plain", "--steps", "400", "--train-examples", "200",
            "--eval-examples", "40", "--base-steps", str(TINY_BASE_STEPS)]
    with open(console, "wb") as sink:
        proc = subprocess.Popen(args, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        _wait_for(console, "training: ", proc, timeout=240)  # a site reported a step: Ray and the sites are up
        assert tagged(tag), "the run's processes should carry the test's tag"
        sent = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
        leftovers = tagged(tag)
        stop(leftovers)
    text = console.read_text(errors="replace")
    assert code == 128 + sig, text[-3000:]
    assert took < STOP_WITHIN, f"took {took:.1f} s to stop"
    assert not leftovers, f"processes left: {[p.pid for p in leftovers]}"
    assert f"interrupted by {sig.name}" in text and "Traceback" not in text, text[-3000:]
    marker = out / "INTERRUPTED"
    assert marker.is_file() and sig.name in marker.read_text()
    assert not (out / "report.json").exists()  # nothing in the folder passes for a finished run
    assert not (out / ".progress").exists()
