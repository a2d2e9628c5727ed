"""deploy/: the compose file and the Kubernetes manifests parse, every Flower command in them parses with the
installed Flower's own argument parsers (so a flag that 1.41 lacks fails here), the key and certificate mounts
match the layout `feddem certs` writes, and every service has its health check and persistent volumes. Where the
machine has them, `docker compose config` and `kubectl kustomize` check the files too."""

import os
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import yaml
from flwr.common.config import parse_config_args
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

from feddem.server.admin.client import ADDRESS_ENV, CA_ENV, TOKEN_ENV
from feddem.server.certs import CertPaths
from feddem.server.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
CERTS = CertPaths(Path("certs"))  # compose.yaml lives in deploy/, `feddem certs` writes deploy/certs


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # merge keys (<<) resolved


def _mounts(service: dict) -> dict[str, str]:
    """container path -> source of a compose service's volumes (short syntax)."""
    out = {}
    for spec in service.get("volumes", []):
        source, target, *_ = spec.split(":")
        out[target] = source
    return out


def _supernodes(services: dict) -> dict[str, dict]:
    return {n: s for n, s in services.items() if s["command"][0] == "flower-supernode"}


def test_compose_superlink_tls_auth_and_volumes():
    compose = _compose()
    services = compose["services"]
    link = services["superlink"]
    assert link["command"][0] == "flower-superlink"
    args = _parse_args_run_superlink().parse_args(link["command"][1:])
    assert args.enable_supernode_auth and not args.insecure
    mounts = _mounts(link)
    for flag, layout in ((args.ssl_ca_certfile, CERTS.ca_cert), (args.ssl_certfile, CERTS.server_cert),
                         (args.ssl_keyfile, CERTS.server_key)):
        # the file the flag names lies under a mount whose source is where `feddem certs` writes it
        path = PurePosixPath(flag)
        target = next(t for t in mounts if path == PurePosixPath(t) or PurePosixPath(t) in path.parents)
        source = Path(mounts[target]) / path.relative_to(target)
        assert source == Path(".") / layout, (flag, source, layout)
    db_dir = str(PurePosixPath(args.database).parent)
    assert mounts[db_dir] in compose["volumes"]  # the SuperLink's database is on a named volume
    assert args.host == "0.0.0.0" and f"{args.port}:{args.port}" in link["ports"]
    assert "/var/lib/feddem" in mounts and mounts["/var/lib/feddem"] in compose["volumes"]  # the run store
    assert "feddem-server" in services
    assert _mounts(services["feddem-server"])["/var/lib/feddem"] == mounts["/var/lib/feddem"]  # shared run store


def test_compose_sites():
    compose = _compose()
    services = compose["services"]
    sites = _supernodes(services)
    assert len(sites) >= 3
    names = set()
    for service_name, site in sites.items():
        args = _parse_args_run_supernode().parse_args(site["command"][1:])
        assert not args.insecure and args.superlink.split(":")[0] == "superlink"
        assert args.superlink.split(":")[1] == str(_parse_args_run_superlink().parse_args(
            services["superlink"]["command"][1:]).port)
        config = parse_config_args([args.node_config])
        names.add(config["site-name"])
        mounts = _mounts(site)
        key = PurePosixPath(args.auth_supernode_private_key)
        assert key.name == CERTS.site_key(config["site-name"]).name
        assert Path(mounts[str(key.parent)]) == Path(".") / CERTS.site_key(config["site-name"]).parent
        assert Path(mounts[args.root_certificates]) == Path(".") / CERTS.ca_cert
        assert mounts[config["data-path"]].startswith("./data/")  # the site's own files, read-only
        assert f"{mounts[config['data-path']]}:{config['data-path']}:ro" in site["volumes"]
        assert mounts["/var/lib/feddem"] in compose["volumes"]  # its work dir persists
        assert config["device"] in ("cpu", "cuda", "auto")
        assert site["depends_on"]["superlink"]["condition"] == "service_healthy"
    assert len(names) == len(sites)  # one name per site
    work = [_mounts(s)["/var/lib/feddem"] for s in sites.values()]
    assert len(set(work)) == len(work)  # no two sites share a work dir


def test_compose_every_service_has_healthcheck_and_image():
    compose = _compose()
    for name, service in compose["services"].items():
        assert service["healthcheck"]["test"][0] == "CMD", name
        assert service["image"] and service["build"]["dockerfile"] == "deploy/Dockerfile", name
        for source in _mounts(service).values():
            assert source in compose["volumes"] or source.startswith(("./certs", "./data")), (name, source)
    assert (DEPLOY / "Dockerfile").is_file()


def _manifests() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kubernetes_manifests():
    docs = _manifests()
    kustomization = next(d for d in docs if d["kind"] == "Kustomization")
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    link = by_kind["StatefulSet"][0]
    containers = {c["name"]: c for c in link["spec"]["template"]["spec"]["containers"]}
    args = _parse_args_run_superlink().parse_args(containers["superlink"]["args"][1:])
    assert args.enable_supernode_auth and args.ssl_certfile and args.ssl_keyfile and args.ssl_ca_certfile
    claims = {t["metadata"]["name"] for t in link["spec"]["volumeClaimTemplates"]}
    assert {"superlink-db", "run-store"} <= claims
    mounts = {m["mountPath"]: m["name"] for m in containers["superlink"]["volumeMounts"]}
    assert mounts[str(PurePosixPath(args.database).parent)] == "superlink-db"
    assert "feddem-server" in containers
    for container in containers.values():
        assert container["readinessProbe"] and container["livenessProbe"], container["name"]
    assert any(p["port"] == args.port for p in by_kind["Service"][0]["spec"]["ports"])

    sites = by_kind["Deployment"]
    assert len(sites) >= 3
    pvcs = {d["metadata"]["name"] for d in by_kind["PersistentVolumeClaim"]}
    for site in sites:
        pod = site["spec"]["template"]["spec"]
        (node,) = pod["containers"]
        args = _parse_args_run_supernode().parse_args(node["args"][1:])
        config = parse_config_args([args.node_config])
        assert site["metadata"]["name"] == config["site-name"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in node["volumeMounts"]}
        key = PurePosixPath(args.auth_supernode_private_key)
        assert key.name == CERTS.site_key("x").name
        assert volumes[mounts[str(key.parent)]]["secret"]["secretName"] == f"{config['site-name']}-key"
        assert volumes[mounts[config["data-path"]]]["persistentVolumeClaim"]["readOnly"] is True
        work = volumes[mounts["/var/lib/feddem"]]["persistentVolumeClaim"]["claimName"]
        assert work in pvcs  # defined here; the data PVC is the site's own (README)
        assert node["readinessProbe"] and node["livenessProbe"]
        assert pod["securityContext"]["runAsNonRoot"] is True


def _feddem_server_args(command: list[str]):
    """A feddem-server command parsed by feddem's own CLI (a flag `feddem server` lacks fails here)."""
    assert command[:2] == ["feddem", "server"], command
    return build_parser().parse_args(command[1:])


def test_compose_feddem_server_and_the_serverapp_recording_through_it():
    compose = _compose()
    services = compose["services"]
    server = services["feddem-server"]
    args = _feddem_server_args(server["command"])
    mounts = _mounts(server)
    for flag, layout in ((args.cert, CERTS.server_cert), (args.key, CERTS.server_key)):
        path = PurePosixPath(str(flag))
        assert Path(mounts[str(path.parent)]) / path.name == Path(".") / layout, (flag, layout)
    assert PurePosixPath(str(args.store)).is_relative_to("/var/lib/feddem")  # on the run-store volume
    host, port = args.address.rsplit(":", 1)
    assert host == "0.0.0.0" and f"127.0.0.1:{port}:{port}" in server["ports"]  # published on this host only
    assert TOKEN_ENV in server["environment"] and args.token_file is None  # the token from deploy/.env
    # the ServerApp (in the SuperLink's container) records every run through the admin API, over TLS with ca.crt
    env = services["superlink"]["environment"]
    assert env[ADDRESS_ENV] == f"feddem-server:{port}"
    assert env[TOKEN_ENV] == server["environment"][TOKEN_ENV]
    ca = PurePosixPath(env[CA_ENV])
    assert Path(_mounts(services["superlink"])[str(ca)]) == Path(".") / CERTS.ca_cert


def test_kubernetes_feddem_server_beside_the_superlink():
    link = next(d for d in _manifests() if d["kind"] == "StatefulSet")
    pod = link["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    server = containers["feddem-server"]
    args = _feddem_server_args(server["args"])
    mounts = {m["mountPath"]: m["name"] for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts[str(PurePosixPath(str(args.cert)).parent)]]["secret"]["secretName"] == "superlink-tls"
    token = PurePosixPath(str(args.token_file))
    assert volumes[mounts[str(token.parent)]]["secret"]["secretName"] == "feddem-admin-token"
    assert mounts["/var/lib/feddem"] == "run-store"
    port = int(args.address.rsplit(":", 1)[1])
    assert server["ports"][0]["containerPort"] == port
    env = {e["name"]: e for e in containers["superlink"]["env"]}
    assert env[ADDRESS_ENV]["value"] == f"127.0.0.1:{port}"  # same pod
    assert env[TOKEN_ENV]["valueFrom"]["secretKeyRef"] == {"name": "feddem-admin-token", "key": token.name}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl on this machine")
def test_kubectl_kustomize_builds():
    result = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(result.stdout) if d]
    assert kinds.count("Deployment") >= 3 and "StatefulSet" in kinds and "Namespace" in kinds


def _docker_compose_works() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60).returncode == 0


@pytest.mark.skipif(not _docker_compose_works(), reason="no `docker compose` on this machine")
def test_docker_compose_config(tmp_path):
    result = subprocess.run(["docker", "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, FEDDEM_ADMIN_TOKEN="a-token-for-the-check"))
    assert result.returncode == 0, result.stderr
