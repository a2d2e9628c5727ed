"""Who writes a run: host, PID and the process's start time, so a restarted store can tell that a `running` run's
writer is gone (a crash or kill) and mark it failed. PIDs are reused; the start time tells them apart."""

import os
import re
import socket
from pathlib import Path

OWNER = re.compile(r"^[A-Za-z0-9._-]{1,253}:[0-9]{1,10}:[0-9]{1,20}$")  # host:pid:starttime


def _start_time(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[19]  # field 22 (starttime), counted after "(comm)"
    except (OSError, IndexError):
        return "0"


def current_owner() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def owner_alive(owner: str) -> bool | None:
    """True/False for a writer on this host; None when it runs elsewhere (it cannot be checked from here)."""
    rest = owner.split(":")
    try:
        host, pid, started = ":".join(rest[:-2]), int(rest[-2]), rest[-1]
    except (IndexError, ValueError):
        return False
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    return started == "0" or _start_time(pid) == started
