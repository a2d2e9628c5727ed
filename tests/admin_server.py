"""Helpers for the admin API tests: TLS material, a real `feddem server` subprocess on 127.0.0.1 (stopped or killed
by PID), a client channel, and a fingerprint of what the API shows of the store."""

import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil

from tests.processes import free_ports, start, stop
from feddem.server.certs import generate

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Tls:
    ca: Path
    cert: Path
    key: Path


def make_tls(folder: Path) -> Tls:
    paths = generate(folder, sites=[]).paths
    return Tls(paths.ca_cert, paths.server_cert, paths.server_key)


def make_client_cert(tls: Tls, name: str = "operator") -> tuple[Path, Path]:
    """A client certificate (client auth) signed by the CA of `tls`; returns (cert, key) files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key(tls.ca.with_name("ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(tls.ca.read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA384()))
    cert_file, key_file = tls.ca.parent / f"{name}.crt", tls.ca.parent / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


class AdminServer:
    """`feddem server` in a subprocess, on a free port of 127.0.0.1."""

    def __init__(self, store: Path, tls: Tls, log: Path, token: str | None = None, client_ca: Path | None = None,
                 extra: list[str] = ()):
        """`token=""`: no token (then `client_ca` must be given: client certificates only); `extra`: more flags of
        `feddem server` (e.g. --idle-timeout, --data-root)."""
        self.store, self.tls, self.log, self.client_ca, self.extra = store, tls, log, client_ca, list(extra)
        self.token = secrets.token_hex(24) if token is None else token
        self.token_file = log.with_suffix(".token")
        self.token_file.write_text(self.token + "\n")
        self.address = f"127.0.0.1:{free_ports(1)[0]}"
        self.proc = None

    def start(self, timeout: float = 60.0) -> "AdminServer":
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDDEM_ADMIN_")}
        auth = ["--token-file", str(self.token_file)] if self.token else []
        auth += ["--client-ca", str(self.client_ca)] if self.client_ca else []
        self.proc = start([sys.executable, "-m", "feddem.server.cli", "server", "--store", str(self.store), "--address",
                           self.address, "--cert", str(self.tls.cert), "--key", str(self.tls.key), *auth,
                           *self.extra], env,
                          self.log, cwd=ROOT)
        deadline = time.monotonic() + timeout
        while "admin API on" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"feddem server did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        return self

    @property
    def env(self) -> dict:
        """The environment that points feddem-admin and a recording ServerApp at this server."""
        return {"FEDDEM_ADMIN_SERVER": self.address, "FEDDEM_ADMIN_TOKEN": self.token,
                "FEDDEM_ADMIN_CA": str(self.tls.ca)}

    def channel(self, token: str | None = "", ca: Path | None = None, client: tuple | None = None) -> grpc.Channel:
        """A channel with this server's token (or `token`; None: no token), trusting its CA (or `ca`), with an
        optional client certificate (cert, key)."""
        from feddem.server.admin.client import open_channel

        return open_channel(self.address, self.token if token == "" else (token or ""), ca or self.tls.ca,
                            *(client or (None, None)))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            stop([psutil.Process(self.proc.pid)])
        if self.proc is not None:
            self.proc.wait(timeout=30)


def fingerprint(stub, pb) -> tuple:
    """What the API shows of the store: its counts and every run in full."""
    status = stub.GetStatus(pb.GetStatusRequest(), timeout=30)
    runs = stub.ListRuns(pb.ListRunsRequest(), timeout=30).runs
    return (status.SerializeToString(deterministic=True),
            tuple(stub.GetRun(pb.GetRunRequest(run_id=r.run_id), timeout=30).SerializeToString(deterministic=True)
                  for r in runs))
