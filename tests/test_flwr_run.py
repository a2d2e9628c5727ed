"""End to end through Flower's own CLI: `flwr run .` on the local simulation connection, settings via --run-config.

`flwr run` starts a detached local SuperLink (in simulation mode) that outlives the run; it starts a SuperExec, which
starts `flwr-simulation` (ServerApp + Ray). Every process of the run inherits a tag in its environment, so the test
can find all of them, also Ray workers that were re-parented, and stop them by PID when it ends, passed or failed.
"""

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from tests.conftest import TINY_BASE_STEPS
from tests.processes import TAG_VAR, ListenWatch, free_ports, stop_tree, tagged

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # flwr, flower-superlink, flower-superexec and flwr-simulation of this venv

FLOWER_CONFIG = """\
[superlink]
default = "local"

[superlink.local]
address = ":local:"
options.num-supernodes = 3
options.backend.client-resources.num-cpus = 1
"""


def _superlinks(port: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if any(Path(part).name == "flower-superlink" for part in cmd[:2]) and str(port) in cmd:
            found.append(proc)
    return found


def _cleanup(tag: str, port: int) -> None:
    """Stop the local SuperLink (it stops its SuperExec), then whatever of the run is left."""
    stop_tree(_superlinks(port), tag)


def _flwr(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_flwr_run_local_simulation(tmp_path, tiny_base, feddem_home):
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(FLOWER_CONFIG)
    out = tmp_path / "run"
    http_port, control_port = free_ports(2)
    tag = uuid.uuid4().hex
    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `flwr` starts `flower-superlink` by name
        FLWR_HOME=str(flwr_home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        FEDDEM_HOME=str(feddem_home),  # holds the tiny base, pre-trained with the same base-steps
        HF_HUB_OFFLINE="1",
        **{TAG_VAR: tag},
    )
    run_config = (f"sites=3 steps=20 train-examples=200 eval-examples=40 base-steps={TINY_BASE_STEPS} "
                  f'out-dir="{out}"')
    log_file = flwr_home / "local-superlink" / "superlink.log"

    def context(text: str) -> str:
        superlink_log = log_file.read_text(errors="replace")[-3000:] if log_file.exists() else "(none)"
        return f"{text[-6000:]}\n--- superlink.log ---\n{superlink_log}"

    watch = ListenWatch(tag)
    watch.start()
    try:
        try:
            result = _flwr(["run", ".", "--stream", "--run-config", run_config], env, timeout=420)
        except subprocess.TimeoutExpired as exc:
            partial = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x or ""
                              for x in (exc.stdout, exc.stderr))
            pytest.fail(context(f"flwr run did not finish within {exc.timeout:.0f} s:\n{partial}"))
        output = result.stdout + result.stderr
        assert result.returncode == 0, context(output)
        started = re.search(r"Successfully started run (\d+)", output)
        assert started, context(output)

        # `flwr run --stream` exits 0 once the logs end, whatever the run's outcome: ask the SuperLink
        listing = _flwr(["ls", "--run-id", started.group(1), "--format", "json"], env, timeout=60)
        assert listing.returncode == 0, context(listing.stdout + listing.stderr)
        runs = json.loads(listing.stdout)["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"], context(output + listing.stdout)
    finally:
        watch.finish()
        _cleanup(tag, http_port)

    assert not tagged(tag), "processes of the run are still alive after cleanup"
    assert any(port == http_port for _, _, port in watch.seen), watch.seen  # the watch saw the SuperLink listen
    assert not watch.beyond_loopback(), f"listening beyond loopback: {sorted(watch.seen)}"

    report = json.loads((out / "report.json").read_text())
    assert report["config"]["steps"] == 20 and report["config"]["sites"] == 3  # --run-config reached the ServerApp
    assert report["base_model"]["ref"] == str(tiny_base)  # FEDDEM_HOME reached the ServerApp through the SuperLink
    assert len(report["sites"]) == 3 and report["failures"] == {}
    for domain in [s["domain"] for s in report["sites"]]:
        base, merged = report["eval"]["base"][domain]["loss"], report["eval"]["merged"][domain]["loss"]
        assert merged < base, (domain, base, merged)
    assert (out / "model" / "config.json").is_file()
