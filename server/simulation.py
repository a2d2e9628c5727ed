"""Running a DEM run on one machine with Flower's Simulation Engine (Ray, kept on loopback)."""

import os

from common.config import RunConfig
from common.errors import FeddemError
from common.data import SyntheticSizes, load_shard
from common.modeling import check_model_ref
from server.base import resolve_base_ref
from server.workflow import RunResult, preflight


def loopback_environment() -> None:
    """Keep Ray and Flower local: every Ray port binds 127.0.0.1; no telemetry, no runtime installs."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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

    from client.app import app as client_app
    from server.app import build_server_app

    outcome: dict = {}
    run_simulation(
        server_app=build_server_app(cfg.to_record(), outcome),
        client_app=client_app,
        num_supernodes=cfg.sites,
        backend_config=backend_config(cfg),
    )
    if "error" in outcome:
        raise FeddemError(outcome["error"])
    if "result" not in outcome:
        raise FeddemError("the simulation ended without a result (see the log above for the ServerApp's error)")
    return outcome["result"]
