"""Running a DEM run on one machine with Flower's Simulation Engine (Ray, kept on loopback)."""

import os
import signal
import time
import uuid
from pathlib import Path

from feddem.common.config import RunConfig
from feddem.common.errors import FeddemError
from feddem.common.data import SyntheticSizes, load_shard
from feddem.common.modeling import check_model_ref
from feddem.server.base import resolve_base_ref
from feddem.server.workflow import RunResult, preflight


def loopback_environment() -> None:
    """Keep Ray and Flower local: every Ray port binds 127.0.0.1; no telemetry, no runtime installs."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


TAG_VAR = "FEDDEM_SIMULATION_TAG"  # inherited by every process the simulation starts (Ray's raylet, workers, ...)


def _tagged_pids(tag: str) -> list[int]:
    """Live processes (other than this one) whose environment carries the tag (Linux /proc)."""
    needle = f"{TAG_VAR}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def stop_leftovers(tag: str, grace: float = 10.0) -> int:
    """Wait up to `grace` seconds for the simulation's processes to end, then terminate (and kill) the rest: Ray can
    leave a busy actor process behind after shutdown, and with many sites those pile up. Returns how many."""
    deadline = time.monotonic() + grace
    while (pids := _tagged_pids(tag)) and time.monotonic() < deadline:
        time.sleep(0.25)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        time.sleep(1.0)
        if not (pids := _tagged_pids(tag)):
            break
    return len(pids)


def backend_config(cfg: RunConfig) -> dict:
    """Ray resources: one CPU per virtual site; on CUDA the sites share the GPU in equal fractions."""
    import torch

    gpu = cfg.device in ("auto", "cuda") and torch.cuda.is_available()
    cpus = os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 1.0 / min(cfg.sites, 4) if gpu else 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "logging_level": "ERROR"},
    }


def check_local_inputs(cfg: RunConfig) -> None:
    """In simulation the sites' data and the base are on this machine: check them all before starting Ray, and
    build the embedded base here (with progress) so the ServerApp finds it cached."""
    for index in range(cfg.sites):
        load_shard(cfg.data, index, SyntheticSizes(cfg.train_examples, cfg.eval_examples, cfg.seed))
    check_model_ref(resolve_base_ref(cfg))


def simulate(cfg: RunConfig) -> RunResult:
    """Run one DEM run with `cfg.sites` virtual sites; raises FeddemError with the reason if it fails."""
    preflight(cfg)
    check_local_inputs(cfg)
    loopback_environment()
    from flwr.simulation import run_simulation

    from feddem.client.app import app as client_app
    from feddem.server.app import build_server_app

    outcome: dict = {}
    tag, previous = uuid.uuid4().hex, os.environ.get(TAG_VAR)
    os.environ[TAG_VAR] = tag  # a fresh tag per run: only this run's processes carry it
    try:
        run_simulation(
            server_app=build_server_app(cfg.to_record(), outcome),
            client_app=client_app,
            num_supernodes=cfg.sites,
            backend_config=backend_config(cfg),
        )
    finally:
        if previous is None:
            os.environ.pop(TAG_VAR, None)
        else:
            os.environ[TAG_VAR] = previous
        stop_leftovers(tag)
    if "error" in outcome:
        raise FeddemError(outcome["error"])
    if "result" not in outcome:
        raise FeddemError("the simulation ended without a result (see the log above for the ServerApp's error)")
    from feddem.server.cross_domain import complete_in_simulation

    # the ServerApp of a secure run withholds the cross-domain matrix; here one user owns every site's vector
    return complete_in_simulation(cfg, outcome["result"])
