"""End to end through Flower's own CLI: the README's `flwr run .` lines, run as written in a shell.

The lines run in a copy of the app (its tracked files, with `.venv` linked to this venv) whose run-config defaults
are made small, so the README's command runs a short run; PATH does not hold the venv's bin until the README's
`source .venv/bin/activate` puts it there. `flwr run` starts a detached local SuperLink that outlives the run (it
starts a SuperExec, which starts `flwr-simulation`: ServerApp + Ray). Every process inherits a tag in its
environment, so the test finds all of them, also re-parented Ray workers, and stops them by PID at the end. Then
`flwr ls` gives the run's status, `flwr log` its log, and the run folder its outputs.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from tests.conftest import TINY_BASE_STEPS
from tests.processes import TAG_VAR, ListenWatch, free_ports, stop_tree, tagged

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SMALL = {"steps": "5", "train-examples": "60", "eval-examples": "20", "base-steps": str(TINY_BASE_STEPS)}


def readme_block(section: str) -> str:
    """The first ```bash block after the README heading `section`."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {section}\n")
    match = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert match, f"no bash block under '## {section}'"
    return match.group(1)


def app_copy(dest: Path) -> Path:
    """The app's tracked files in `dest`, `.venv` linked to this venv, run-config defaults made small (Flower's
    default federation gives each site 2 CPUs: on a small machine the 4 sites train one after the other)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    (dest / ".venv").symlink_to(VENV_BIN.parent)
    pyproject = dest / "pyproject.toml"
    text = pyproject.read_text()
    for key, value in SMALL.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert n == 1, key
    pyproject.write_text(text)
    return dest


def _superlinks(port: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if any(Path(part).name == "flower-superlink" for part in cmd[:2]) and str(port) in cmd:
            found.append(proc)
    return found


@pytest.mark.slow
@pytest.mark.timeout(1500)  # a loaded 2-core machine: the base's pre-training, then 4 sites one after the other
def test_readme_flwr_run_lines(tmp_path, tiny_base, feddem_home):
    app = app_copy(tmp_path / "app")
    flwr_home = tmp_path / "flwr-home"
    http_port, control_port = free_ports(2)
    tag = uuid.uuid4().hex
    venv_bin = str(VENV_BIN)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION")}
    env.update(
        PATH=path,  # the README's `source .venv/bin/activate` puts flwr and flower-superlink on it
        FLWR_HOME=str(flwr_home),  # a fresh machine: no Flower config, no SuperLink yet
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port),
        FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        FEDDEM_HOME=str(feddem_home),  # holds the tiny base, pre-trained with the same base-steps
        HF_HUB_OFFLINE="1",
        **{TAG_VAR: tag},
    )
    script = readme_block("With Flower's CLI")
    assert "flwr run ." in script
    log_file = flwr_home / "local-superlink" / "superlink.log"

    def context(text: str) -> str:
        superlink_log = log_file.read_text(errors="replace")[-3000:] if log_file.exists() else "(none)"
        return f"{text[-6000:]}\n--- superlink.log ---\n{superlink_log}"

    def flwr(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", 'source .venv/bin/activate && flwr "$@"', "flwr", *args], cwd=app,
                              env=env, capture_output=True, text=True, timeout=120)

    watch = ListenWatch(tag)
    watch.start()
    try:
        try:
            result = subprocess.run(["bash", "-e", "-c", script], cwd=app, env=env, capture_output=True, text=True,
                                    timeout=900)
        except subprocess.TimeoutExpired as exc:
            partial = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x or ""
                              for x in (exc.stdout, exc.stderr))
            pytest.fail(context(f"the README's lines did not finish within {exc.timeout:.0f} s:\n{partial}"))
        output = result.stdout + result.stderr
        assert result.returncode == 0, context(output)
        started = re.search(r"Successfully started run (\d+)", output)
        assert started, context(output)
        run_id = started.group(1)

        # `flwr run --stream` exits 0 once the logs end, whatever the run's outcome: ask the SuperLink
        listing = flwr("ls", "--run-id", run_id, "--format", "json")
        assert listing.returncode == 0, context(listing.stdout + listing.stderr)
        runs = json.loads(listing.stdout)["runs"]
        assert [r["status"] for r in runs] == ["finished:completed"], context(output + listing.stdout)
        logs = flwr("log", run_id, "--show")
        assert logs.returncode == 0 and "run folder:" in logs.stdout, context(logs.stdout + logs.stderr)
        assert "Installing application dependencies" not in logs.stdout  # no `uv sync` of torch & co. per run
        out = Path(re.search(r"run folder: (\S+)", logs.stdout).group(1))
    finally:
        watch.finish()
        stop_tree(_superlinks(http_port), tag)  # the detached SuperLink (it stops its SuperExec), then the rest

    assert not tagged(tag), "processes of the run are still alive after cleanup"
    assert any(port == http_port for _, _, port in watch.seen), watch.seen  # the watch saw the SuperLink listen
    assert not watch.beyond_loopback(), f"listening beyond loopback: {sorted(watch.seen)}"
    assert (app / "pyproject.toml").read_text().count("[tool.flwr.app]") == 1  # flwr did not rewrite the app

    # the outputs: where the README says (FEDDEM_HOME/runs/<time>-<run-id>)
    assert out.parent == feddem_home / "runs" and out.name.endswith(f"-{run_id}")
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["steps"] == 5 and report["config"]["sites"] == 4  # the app's run config reached it
    assert report["base_model"]["ref"] == str(tiny_base)  # FEDDEM_HOME reached the ServerApp through the SuperLink
    assert len(report["sites"]) == 4 and report["failures"] == {}
    for domain in [s["domain"] for s in report["sites"]]:  # (the merge's quality: test_simulation_e2e)
        base, local = report["eval"]["base"][domain]["loss"], report["eval"]["local"][domain]["loss"]
        assert local < base and domain in report["eval"]["merged"], (domain, report["eval"])
    assert (out / "model" / "config.json").is_file()


def _simulation_grid(nodes: int):
    """Flower's in-memory simulation grid with `nodes` SuperNodes registered, set up as flwr's simulation does it
    (`flwr.simulation.run_simulation._main_loop`), without Ray."""
    from dataclasses import replace

    from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    state = factory.state()
    run = replace(Run.create_empty(run_id=1234), federation_id=NOOP_FEDERATION_ID)
    run.primary_task_id = 99
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[99] = Task(task_id=99, run_id=run.run_id)
    _register_nodes(num_nodes=nodes, state_factory=factory)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return grid


def test_too_few_supernodes_fails_within_seconds():
    """A ServerApp in a simulated federation smaller than `sites` fails at once, naming the fix, instead of
    waiting out the 1-hour timeout; with enough SuperNodes it goes on at once."""
    import time

    from feddem.common.errors import FeddemError
    from feddem.server.app import SETTLE_SECONDS, check_site_count

    grid = _simulation_grid(2)
    started = time.monotonic()
    with pytest.raises(FeddemError, match=r"the simulated federation has 2 SuperNode\(s\).*num-supernodes=3"):
        check_site_count(grid, 3, timeout=3600)
    assert time.monotonic() - started < SETTLE_SECONDS + 5
    started = time.monotonic()
    check_site_count(grid, 2, timeout=3600)
    assert time.monotonic() - started < 1
