"""Helpers for tests that start real Flower processes on 127.0.0.1: free ports, a tag that every started process
inherits through its environment (so the test finds all of them, also the detached and re-parented ones, and never
touches anybody else's), stopping by PID, and a watch over the sockets they listen on."""

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil

TAG_VAR = "FEDDEM_TEST_PROCESS_TAG"
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}  # the second: an IPv6 socket bound to 127.0.0.1


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that are free on 127.0.0.1 right now."""
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


def tagged(tag: str) -> list[psutil.Process]:
    """The live processes whose environment carries the tag."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(TAG_VAR) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def stop(procs: list[psutil.Process], timeout: float = 10.0) -> None:
    """Terminate, then kill what is still alive after `timeout` seconds."""
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


def stop_tree(roots: list[psutil.Process], tag: str) -> None:
    """Stop the given processes first (they stop their own children), then whatever carries the tag."""
    tree = list(roots)
    for root in roots:
        try:
            tree += root.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    stop(roots)
    stop(list({p.pid: p for p in tree + tagged(tag)}.values()))


def start(args: list[str], env: dict, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """Start a process with its output in `log`; the caller must stop it (`stop_tree`)."""
    with open(log, "wb") as out:
        return subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    """Wait until something listens on 127.0.0.1:`port` (RuntimeError if `proc` exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


class ListenWatch(threading.Thread):
    """Samples the listening TCP sockets of the tagged processes until `done` is set."""

    def __init__(self, tag: str):
        super().__init__(daemon=True)
        self.tag, self.seen, self.done = tag, set(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.sample()

    def sample(self) -> None:
        for proc in tagged(self.tag):
            try:
                for conn in proc.net_connections(kind="tcp"):
                    if conn.status == psutil.CONN_LISTEN:
                        self.seen.add((proc.name(), conn.laddr.ip, conn.laddr.port))
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                pass

    def finish(self) -> None:
        self.done.set()
        self.join(timeout=10)

    def beyond_loopback(self) -> list:
        return sorted(s for s in self.seen if s[1] not in LOOPBACK)
