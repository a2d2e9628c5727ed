"""Multi-site deployment with real processes on 127.0.0.1: one SuperLink with TLS and SuperNode authentication (the
certificates and site keys from `feddem certs`), one SuperNode per site with its own node config, and a secure DEM
run submitted with `flwr run . <connection>`.

One SuperLink serves the whole module (its database in memory: a file database under a loaded 2-core machine
fails with "database is locked"). Every process started here inherits a tag in its environment and is stopped by
PID at the end, passed or failed. In flwr 1.41.0 the Fleet API is HTTPS on the SuperLink's one port (the gRPC-rere
transport is only a deprecated internal fallback, and the SuperNode speaks HTTPS only).
"""

import json
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

from feddem.common.synthetic import make_domain
from feddem.server.certs import generate
from tests.admin_server import AdminServer, Tls
from tests.conftest import TINY_BASE_STEPS
from tests.processes import TAG_VAR, ListenWatch, free_ports, start, stop_tree, tagged, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONNECTION = "deploy"
SITES = {"a": "arithmetic", "b": "prose", "c": "records", "d": None}  # site d's data-path does not exist
RUN_TIMEOUT = 600


@dataclass
class Deployment:
    root: Path
    env: dict
    tag: str
    port: int
    certs: Path
    other_ca: Path
    watch: ListenWatch
    admin: AdminServer
    procs: list = field(default_factory=list)
    runtime_ports: dict = field(default_factory=dict)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else "(no log)"

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        env = dict(self.env, FLWR_HOME=str(self.root / "flwr-cli"))
        return subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)

    def supernode(self, name: str, key: Path, ca: Path, node_config: str = "", retries: int | None = None):
        (runtime_port,) = free_ports(1)
        args = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                "--root-certificates", str(ca), "--auth-supernode-private-key", str(key),
                "--host", "127.0.0.1", "--port", str(runtime_port)]
        if node_config:
            args += ["--node-config", node_config]
        if retries is not None:
            args += ["--max-retries", str(retries)]
        env = dict(self.env, FLWR_HOME=str(self.root / f"flwr-{name}"))
        self.runtime_ports[name] = runtime_port
        proc = start(args, env, self.root / f"{name}.log")
        self.procs.append(proc)
        return proc


def _compose_healthcheck(service: str, replace: dict[str, str]) -> subprocess.CompletedProcess:
    """Run the health check that deploy/compose.yaml gives a service, pointed at this test's port and files."""
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    kind, python, *args, code = compose["services"][service]["healthcheck"]["test"]
    assert (kind, python) == ("CMD", "python")
    for old, new in replace.items():
        assert old in code, (old, code)
        code = code.replace(old, new)
    return subprocess.run([sys.executable, *args, code], capture_output=True, text=True, timeout=60)


def _write_site_data(folder: Path, domain: str) -> None:
    train, test = make_domain(domain, 200, 40, seed=0)  # the shard a simulated site of this domain gets
    folder.mkdir(parents=True)
    for name, texts in (("train", train), ("test", test)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_base, feddem_home):
    root = tmp_path_factory.mktemp("deployment")
    certs = root / "certs"
    generate(certs, [*SITES, "rogue"], ["localhost"])
    other_ca = generate(root / "other", ["x"]).paths.ca_cert
    tag = uuid.uuid4().hex
    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the SuperLink and SuperNodes start flower-superexec
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FEDDEM_HOME=str(feddem_home),  # the tiny base, where the ServerApp and the sites find it
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",  # several sites share two cores
        **{TAG_VAR: tag},
    )
    (port,) = free_ports(1)
    watch = ListenWatch(tag)
    # the feddem server beside the SuperLink (its certificate), where the ServerApp records the run (deploy/compose.yaml)
    admin = AdminServer(root / "store", Tls(certs / "ca.crt", certs / "superlink" / "server.crt",
                                            certs / "superlink" / "server.key"), root / "feddem-server.log")
    dep = Deployment(root, env, tag, port, certs, other_ca, watch, admin)
    admin.start()
    link = start([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs / "ca.crt"),
                  "--ssl-certfile", str(certs / "superlink" / "server.crt"),
                  "--ssl-keyfile", str(certs / "superlink" / "server.key"),
                  "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(port)],
                 dict(env, FLWR_HOME=str(root / "flwr-superlink"), **admin.env), root / "superlink.log")
    dep.procs.append(link)
    watch.start()
    try:
        wait_for_port(port, link, 120)
        health = _compose_healthcheck("superlink", {":8000": f":{port}", "/certs/ca.crt": str(certs / "ca.crt")})
        assert health.returncode == 0, health.stderr
        cli_home = root / "flwr-cli"
        cli_home.mkdir()
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n'
            f'root-certificates = "{certs / "ca.crt"}"\n')
        for site in SITES:  # rogue's key stays unregistered
            done = dep.flwr("supernode", "register", str(certs / "sites" / site / "node.pub"), CONNECTION,
                            "--name", site)
            assert done.returncode == 0 and "registered successfully" in done.stdout, done.stdout + done.stderr
        yield dep
    finally:
        watch.finish()
        admin.stop()
        stop_tree([psutil.Process(p.pid) for p in dep.procs if p.poll() is None], tag)
        leftover = tagged(tag)
        stop_tree(leftover, tag)
        assert not leftover, f"processes left after the module: {[p.pid for p in leftover]}"


def _rejected(dep: Deployment, name: str, key: Path, ca: Path) -> str:
    proc = dep.supernode(name, key, ca, retries=1)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"SuperNode {name} still runs after 120 s: it was not turned away\n{dep.log(name)[-3000:]}")
    assert proc.returncode != 0, dep.log(name)[-3000:]
    return dep.log(name)


def test_unregistered_site_key_is_rejected(deployment):
    log = _rejected(deployment, "rogue", deployment.certs / "sites" / "rogue" / "node.key",
                    deployment.certs / "ca.crt")
    assert "Failed to activate SuperNode" in log, log[-3000:]
    assert "No SuperNode found with the given public key" in deployment.log("superlink")


def test_site_with_wrong_ca_cannot_connect(deployment):
    log = _rejected(deployment, "wrong-ca", deployment.certs / "sites" / "a" / "node.key", deployment.other_ca)
    assert "CERTIFICATE_VERIFY_FAILED" in log, log[-3000:]


@pytest.mark.slow
def test_secure_run_at_sites_with_their_own_data(deployment, tiny_base, tmp_path):
    """Four registered sites, each pointed at its own folder; site d's folder is missing. The run goes on with the
    other three (threshold 2 of 3, min-peers 2) to a merged model, and the report names d's problem."""
    dep = deployment
    for site, domain in SITES.items():
        data = dep.root / "data" / site / (domain or "missing")
        if domain:
            _write_site_data(data, domain)
        dep.supernode(site, dep.certs / "sites" / site / "node.key", dep.certs / "ca.crt",
                      f'data-path="{data}" site-name="site-{site}" device="cpu" work-dir="{dep.root / "work" / site}"')
    out = tmp_path / "run"
    run_config = (f"sites={len(SITES)} steps=20 train-examples=200 eval-examples=40 base-steps={TINY_BASE_STEPS} "
                  f'timeout={RUN_TIMEOUT}.0 out-dir="{out}"')
    started = time.perf_counter()
    try:
        result = dep.flwr("run", ".", CONNECTION, "--stream", "--run-config", run_config, timeout=RUN_TIMEOUT + 120)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"flwr run did not end within {exc.timeout:.0f} s\n{dep.log('superlink')[-4000:]}")
    wall = time.perf_counter() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    run_id = re.search(r"Successfully started run (\d+)", output)
    assert run_id, output[-6000:]
    listing = dep.flwr("ls", "--run-id", run_id.group(1), "--format", "json")
    assert [r["status"] for r in json.loads(listing.stdout)["runs"]] == ["finished:completed"], output[-6000:]
    logs = dep.flwr("log", run_id.group(1), CONNECTION, "--show")  # what an operator watches
    assert logs.returncode == 0 and "secure aggregation: 3 of 3 sites in the sum" in logs.stdout, logs.stdout[-3000:]
    print(f"deployment run with {len(SITES)} SuperNodes (3 with data): {wall:.1f} s wall")

    report = json.loads((out / "report.json").read_text())
    print("timings", report["timings"], "eval", {k: {d: round(v["loss"], 4) for d, v in report["eval"][k].items()}
                                                 for k in ("base", "local", "merged")})
    assert report["config"]["sites"] == len(SITES) and report["aggregation"] == "secure"
    assert sorted(s["site"] for s in report["sites"]) == ["site-a", "site-b", "site-c"]
    assert sorted(s["domain"] for s in report["sites"]) == ["arithmetic", "prose", "records"]
    assert report["secure_aggregation"]["survivors"] == ["site-a", "site-b", "site-c"]
    (reason,) = report["failures"].values()  # only site d, at local fine-tuning, with its reason
    assert re.search(r"site-d: node config data-path: '.*/missing' does not exist at this site", reason), reason
    for s in report["sites"]:
        base, merged = report["eval"]["base"][s["domain"]]["loss"], report["eval"]["merged"][s["domain"]]["loss"]
        assert merged < base, (s["domain"], base, merged)
        assert (dep.root / "work" / s["site"][-1] / "runs").is_dir()  # the vector stays in the site's work-dir

    # the ServerApp recorded the run in the feddem server's store, as an operator sees it with feddem-admin
    admin = subprocess.run([str(BIN / "feddem-admin"), "--json", "runs", "list"], capture_output=True, text=True,
                           timeout=120, env=dict(os.environ, **dep.admin.env))
    assert admin.returncode == 0, admin.stderr
    (recorded,) = json.loads(admin.stdout)
    assert recorded["status"] == "finished" and recorded["aggregation"] == "secure", recorded
    assert recorded["flower_run_id"] == int(run_id.group(1)) and recorded["has_model"], recorded
    sites = subprocess.run([str(BIN / "feddem-admin"), "--json", "runs", "sites", recorded["run_id"]],
                           capture_output=True, text=True, timeout=120, env=dict(os.environ, **dep.admin.env))
    assert sites.returncode == 0, sites.stderr
    assert "site-a" in sites.stdout and "site-d" not in sites.stdout, sites.stdout

    health = _compose_healthcheck("site-1", {":9094": f":{dep.runtime_ports['a']}"})
    assert health.returncode == 0, health.stderr

    from transformers import AutoModelForCausalLM

    import torch

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
    dep.watch.sample()
    assert any(port == dep.port for _, _, port in dep.watch.seen), dep.watch.seen
    assert not dep.watch.beyond_loopback(), f"listening beyond loopback: {sorted(dep.watch.seen)}"
