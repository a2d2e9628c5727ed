"""End to end through Flower's own CLI: `flwr run .` on the local simulation connection, settings via --run-config.

`flwr run` starts a detached local SuperLink (in simulation mode) that outlives the run; it starts a SuperExec, which
starts `flwr-simulation` (ServerApp + Ray). Every process of the run inherits a tag in its environment, so the test
can find all of them, also Ray workers that were re-parented, and stop them by PID when it ends, passed or failed.
"""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import psutil
import pytest

from tests.conftest import TINY_BASE_STEPS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # flwr, flower-superlink, flower-superexec and flwr-simulation of this venv
TAG_VAR = "FEDDEM_TEST_FLWR_RUN_TAG"
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}  # the second: an IPv6 socket bound to 127.0.0.1

FLOWER_CONFIG = """\
[superlink]
default = "local"

[superlink.local]
address = ":local:"
options.num-supernodes = 3
options.backend.client-resources.num-cpus = 1
"""


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):  # all open at once, so the ports differ
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tagged(tag: str) -> list[psutil.Process]:
    """The processes whose environment carries the tag: everything `flwr run` started, directly or not."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(TAG_VAR) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def _superlinks(port: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if any(Path(part).name == "flower-superlink" for part in cmd[:2]) and str(port) in cmd:
            found.append(proc)
    return found


def _stop(procs: list[psutil.Process], timeout: float = 10.0) -> None:
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)


def _cleanup(tag: str, port: int) -> None:
    """Stop the local SuperLink (it stops its SuperExec), then whatever of the run is left."""
    links = _superlinks(port)
    tree = list(links)
    for link in links:
        try:
            tree += link.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    _stop(links)
    _stop(list({p.pid: p for p in tree + _tagged(tag)}.values()))


class _ListenWatch(threading.Thread):
    """Samples the listening TCP sockets of the run's processes until stopped."""

    def __init__(self, tag: str):
        super().__init__(daemon=True)
        self.tag, self.seen, self.done = tag, set(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            for proc in _tagged(self.tag):
                try:
                    for conn in proc.net_connections(kind="tcp"):
                        if conn.status == psutil.CONN_LISTEN:
                            self.seen.add((proc.name(), conn.laddr.ip, conn.laddr.port))
                except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                    pass


def _flwr(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_flwr_run_local_simulation(tmp_path, tiny_base, feddem_home):
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text(FLOWER_CONFIG)
    out = tmp_path / "run"
    http_port, control_port = _free_ports(2)
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

    watch = _ListenWatch(tag)
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
        watch.done.set()
        watch.join(timeout=10)
        _cleanup(tag, http_port)

    assert not _tagged(tag), "processes of the run are still alive after cleanup"
    assert any(port == http_port for _, _, port in watch.seen), watch.seen  # the watch saw the SuperLink listen
    assert all(ip in LOOPBACK for _, ip, _ in watch.seen), f"listening beyond loopback: {sorted(watch.seen)}"

    report = json.loads((out / "report.json").read_text())
    assert report["config"]["steps"] == 20 and report["config"]["sites"] == 3  # --run-config reached the ServerApp
    assert report["base_model"]["ref"] == str(tiny_base)  # FEDDEM_HOME reached the ServerApp through the SuperLink
    assert len(report["sites"]) == 3 and report["failures"] == {}
    for domain in [s["domain"] for s in report["sites"]]:
        base, merged = report["eval"]["base"][domain]["loss"], report["eval"]["merged"][domain]["loss"]
        assert merged < base, (domain, base, merged)
    assert (out / "model" / "config.json").is_file()
