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
from server.certs import generate

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Tls:
    ca: Path
    cert: Path
    key: Path


def make_tls(folder: Path) -> Tls:
    paths = generate(folder, sites=[]).paths
    return Tls(paths.ca_cert, paths.server_cert, paths.server_key)


class AdminServer:
    """`feddem server` in a subprocess, on a free port of 127.0.0.1."""

    def __init__(self, store: Path, tls: Tls, log: Path, token: str | None = None):
        self.store, self.tls, self.log = store, tls, log
        self.token = token or secrets.token_urlsafe(24)
        self.token_file = log.with_suffix(".token")
        self.token_file.write_text(self.token + "\n")
        self.address = f"127.0.0.1:{free_ports(1)[0]}"
        self.proc = None

    def start(self, timeout: float = 60.0) -> "AdminServer":
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDDEM_ADMIN_")}
        self.proc = start([sys.executable, "-m", "server.cli", "server", "--store", str(self.store), "--address",
                           self.address, "--cert", str(self.tls.cert), "--key", str(self.tls.key), "--token-file",
                           str(self.token_file)], env, self.log, cwd=ROOT)
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

    def channel(self, token: str | None = "", ca: Path | None = None) -> grpc.Channel:
        from server.admin.client import open_channel

        return open_channel(self.address, self.token if token == "" else (token or ""), ca or self.tls.ca)

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
