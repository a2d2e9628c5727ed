"""Benchmark: plain aggregation vs feddem's secure aggregation vs Flower's own SecAgg+, on the same vectors.

Each configuration (sites x parameters) runs once per method through Flower's Simulation Engine in this one script:
- `plain`: feddem's `--aggregation plain` path (`server.workflow.plain_aggregate`, the sites' `train.upload`);
- `feddem`: feddem's secure aggregation (`server.secure_aggregation.secure_sum`, the sites' `query.sa_*` handlers);
- `flower`: Flower's SecAgg+ (`SecAggPlusWorkflow` in a `DefaultWorkflow`, clients with `secaggplus_mod`), with the
  same clipping range, all-pairs masking and the same Shamir threshold.

Site i's vector d_i is the same in every method (seeded normal values, scale 0.01); the aggregate asked for is
sum_i w_i d_i with w_i = 1/n (Flower's SecAgg+ computes the mean weighted by example counts; every site reports 1).
Every method runs `--rounds` rounds on the same vectors; the first is warm-up (actor start, imports), the rest give
the steady-state seconds per round. Bytes per site: the serialized size (Flower's protobuf) of everything a site
sends the server in one round. Max error: max |result - exact float64 sum|.

The same vector is aggregated more than once here only to time steady-state rounds: before each feddem round the
bench's own `prepare` handler resets the site's aggregation record, which the privacy guard would otherwise hold
against it. Nothing of the product does that.

    python bench/secagg.py                        # 5 and 10 sites, 1M and 10M parameters, 3 rounds
    python bench/secagg.py --sites 5 --params 1e6 --rounds 2 --json out.json
"""

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CHUNK_PARAMS = 1 << 22  # the bench "model" is 1-D tensors of at most this many parameters
SCALE = 0.01
CLIP = 1.0


# ---------------------------------------------------------------------------------------------------- vectors


def layout(length: int) -> dict[str, tuple[int]]:
    """Parameter names and shapes of a bench model with `length` parameters (sorted names)."""
    shapes, start, i = {}, 0, 0
    while start < length:
        size = min(CHUNK_PARAMS, length - start)
        shapes[f"p{i:04d}"] = (size,)
        start, i = start + size, i + 1
    return shapes


def site_vector(seed: int, site: int, length: int) -> np.ndarray:
    """Site `site`'s distribution vector, flat float32, the same in every method."""
    return (np.random.default_rng([seed, site]).standard_normal(length, dtype=np.float32) * SCALE)


def as_vector(flat: np.ndarray, length: int) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for name, (size,) in layout(length).items():
        out[name] = torch.from_numpy(flat[start:start + size].copy())
        start += size
    return out


def flatten(vector) -> np.ndarray:
    return np.concatenate([np.asarray(vector[name], dtype=np.float64).reshape(-1) for name in sorted(vector)])


def exact_sum(seed: int, sites: int, length: int) -> np.ndarray:
    total = np.zeros(length, dtype=np.float64)
    for i in range(sites):
        total += site_vector(seed, i, length).astype(np.float64) / sites
    return total


# ---------------------------------------------------------------------------------------------------- counting


class CountingGrid:
    """Wraps the ServerApp's Grid; adds up the serialized size of every reply content per source node."""

    def __init__(self, grid):
        from flwr.common.serde import recorddict_to_proto

        self._grid, self._size = grid, recorddict_to_proto
        self.received: dict[int, int] = {}

    def __getattr__(self, name):
        return getattr(self._grid, name)

    def _count(self, replies):
        replies = list(replies)
        for reply in replies:
            if not reply.has_error():
                node = reply.metadata.src_node_id
                self.received[node] = self.received.get(node, 0) + self._size(reply.content).ByteSize()
        return replies

    def send_and_receive(self, messages, *args, **kwargs):
        return self._count(self._grid.send_and_receive(messages, *args, **kwargs))

    def pull_messages(self, message_ids):
        return self._count(self._grid.pull_messages(message_ids))

    def take(self) -> float:
        """Mean bytes per sending site since the last call."""
        received, self.received = self.received, {}
        return statistics.mean(received.values()) if received else 0.0


# ---------------------------------------------------------------------------------------------------- feddem


def feddem_client_app(seed: int, length: int):
    """feddem's ClientApp handlers for the uploads and the four secure stages, plus the bench's `prepare`."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    from feddem.client import app as site_app
    from feddem.client import guard, ledger
    from feddem.common.site_context import SiteContext
    from feddem.common import messages as M
    from feddem.common.vector_io import save_vector

    app = ClientApp()

    @app.train()
    def prepare(msg: Message, context):
        site = SiteContext.from_node_config(dict(context.node_config))
        path = site.vector_path(context.run_id)
        if not path.is_file():
            save_vector(as_vector(site_vector(seed, site.index, length), length), path)
        for name in (ledger.RECORD_NAME, ledger.IDENTITY_NAME):  # bench only: a fresh site (guard) each round
            (site.work_dir / name).unlink(missing_ok=True)
        cfg = M.Envelope.from_record(msg.content).settings  # the site's settings (common.messages)
        guard.record_trained(site, context.run_id, cfg, "bench", cfg.seed, False)  # the run's declared mode
        return Message(M.stamp(RecordDict({M.SITE: ConfigRecord({"site": site.name})})), reply_to=msg)

    app.train("upload")(site_app.upload)
    for message_type in (M.SA_KEYS, M.SA_SHARE, M.SA_MASKED, M.SA_UNMASK):
        app.query(message_type.split(".", 1)[1])(site_app._secure_stage)
    return app


def feddem_server_app(method: str, seed: int, sites: int, length: int, rounds: int, out: list,
                      vector_dtype: str = "float32"):
    from flwr.app import ConfigRecord, RecordDict
    from flwr.serverapp import ServerApp

    from feddem.common import messages as M
    from feddem.common.config import RunConfig
    from feddem.server.secure_aggregation import secure_sum
    from feddem.server.workflow import Stage, _wait_for_nodes, plain_aggregate

    app = ServerApp()

    @app.main()
    def main(grid, context):
        grid = CountingGrid(grid)
        cfg = RunConfig(sites=sites, aggregation="secure" if method == "feddem" else "plain", clip=CLIP,
                        timeout=600.0, min_peers=2, vector_dtype=vector_dtype)
        nodes = _wait_for_nodes(grid, sites, cfg.timeout)
        base = ConfigRecord({"model-ref": "bench", "model-checksum": ""})
        shapes = {name: torch.Size(s) for name, s in layout(length).items()}
        zeros = {name: torch.empty(s) for name, s in shapes.items()}  # for the plain path's shape checks
        exact = exact_sum(seed, sites, length)
        weights = {node: 1.0 / sites for node in nodes}
        for _ in range(rounds):
            stage = Stage(grid, cfg, base)
            prepared = stage.run("prepare", M.TRAIN, {n: RecordDict() for n in nodes})
            names = {n: {"site": str(c.config_records[M.SITE]["site"])} for n, c in prepared.items()}
            grid.take()
            start = time.perf_counter()
            if method == "feddem":
                result = secure_sum(grid, cfg, base, weights, sorted(shapes), shapes)
                aggregate, bound = result.aggregate, result.error_bound
            else:
                aggregate, _, _ = plain_aggregate(stage, names, weights, zeros)
                bound = 0.0
            seconds = time.perf_counter() - start
            out.append({"seconds": seconds, "bytes_per_site": grid.take(),
                        "max_error": float(np.max(np.abs(flatten(aggregate) - exact))), "bound": bound})

    return app


# ---------------------------------------------------------------------------------------------------- Flower


def flower_apps(seed: int, sites: int, length: int, rounds: int, threshold: int, out: list):
    """Flower's SecAgg+ on the legacy strategy API: a timed FedAvg inside DefaultWorkflow(SecAggPlusWorkflow)."""
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.serverapp import ServerApp

    class Site(NumPyClient):
        def __init__(self, index: int):
            self.index = index

        def fit(self, parameters, config):
            return [site_vector(seed, self.index, length)], 1, {}

    def client_fn(context):
        return Site(int(context.node_config["partition-id"])).to_client()

    exact = exact_sum(seed, sites, length)
    counter: dict = {}

    class TimedFedAvg(FedAvg):
        """FedAvg that sends no model down (like feddem's aggregation) and times each fit round."""

        def configure_fit(self, server_round, parameters, client_manager):
            counter["grid"].take()
            counter["start"] = time.perf_counter()
            empty = Parameters(tensors=[], tensor_type="numpy.ndarray")
            return super().configure_fit(server_round, empty, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            aggregated, metrics = super().aggregate_fit(server_round, results, failures)
            seconds = time.perf_counter() - counter["start"]
            result = parameters_to_ndarrays(aggregated)[0].astype(np.float64)
            out.append({"seconds": seconds, "bytes_per_site": counter["grid"].take(),
                        "max_error": float(np.max(np.abs(result - exact))), "bound": float("nan")})
            return aggregated, metrics

    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        grid = counter["grid"] = CountingGrid(grid)
        strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=sites,
                               min_available_clients=sites,
                               initial_parameters=ndarrays_to_parameters([np.zeros(1, np.float32)]))
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares=sites,
                                                                   reconstruction_threshold=threshold,
                                                                   clipping_range=CLIP, max_weight=1.0))
        workflow(grid, legacy)

    return server_app, ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


# ---------------------------------------------------------------------------------------------------- driver


def run_one(method: str, seed: int, sites: int, length: int, rounds: int, vector_dtype: str = "float32") -> dict:
    from flwr.simulation import run_simulation

    from feddem.common.config import RunConfig
    from feddem.server.simulation import loopback_environment

    loopback_environment()
    out: list = []
    if method == "flower":
        threshold = RunConfig(sites=sites).threshold_for(sites)
        server_app, client_app = flower_apps(seed, sites, length, rounds, threshold, out)
    else:
        server_app = feddem_server_app(method, seed, sites, length, rounds, out, vector_dtype)
        client_app = feddem_client_app(seed, length)
    cpus = os.cpu_count() or 1
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=sites,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "include_dashboard": False,
                                                 "logging_level": "ERROR"}})
    if len(out) != rounds:
        raise RuntimeError(f"{method} with {sites} sites and {length} parameters finished {len(out)} of {rounds} "
                           f"rounds (see the log above)")
    steady = out[1:] if rounds > 1 else out
    return {
        "method": method, "sites": sites, "params": length, "rounds": out,
        "seconds_per_round": statistics.mean(r["seconds"] for r in steady),
        "bytes_per_site": statistics.mean(r["bytes_per_site"] for r in steady),
        "bytes_over_float32": statistics.mean(r["bytes_per_site"] for r in steady) / (4 * length),
        "max_error": max(r["max_error"] for r in out),
        "error_bound": max(r["bound"] for r in out),
    }


def ratios(results: list[dict]) -> list[dict]:
    rows = []
    for sites in sorted({r["sites"] for r in results}):
        for params in sorted({r["params"] for r in results}):
            by = {r["method"]: r for r in results if r["sites"] == sites and r["params"] == params}
            row = {"sites": sites, "params": params}
            if "plain" in by and "feddem" in by:
                row["secure_over_plain"] = by["feddem"]["seconds_per_round"] / by["plain"]["seconds_per_round"]
            if "flower" in by and "feddem" in by:
                row["flower_over_feddem"] = by["flower"]["seconds_per_round"] / by["feddem"]["seconds_per_round"]
            rows.append(row)
    return rows


def print_table(results: list[dict], rows: list[dict]) -> None:
    print(f"\n{'sites':>5} {'params':>10} {'method':>7} {'s/round':>9} {'MB up/site':>11} {'x float32':>9} "
          f"{'max error':>10} {'bound':>9}")
    for r in results:
        print(f"{r['sites']:>5} {r['params']:>10,} {r['method']:>7} {r['seconds_per_round']:>9.3f} "
              f"{r['bytes_per_site'] / 1e6:>11.2f} {r['bytes_over_float32']:>9.3f} {r['max_error']:>10.2e} "
              f"{r['error_bound']:>9.2e}")
    print(f"\n{'sites':>5} {'params':>10} {'secure/plain':>13} {'Flower SecAgg+/feddem':>22}")
    for row in rows:
        sp, ff = row.get("secure_over_plain", math.nan), row.get("flower_over_feddem", math.nan)
        print(f"{row['sites']:>5} {row['params']:>10,} {sp:>13.2f} {ff:>22.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[5, 10], help="site counts (default: 5 10)")
    parser.add_argument("--params", type=float, nargs="+", default=[1e6, 1e7],
                        help="vector sizes in float32 parameters (default: 1e6 1e7)")
    parser.add_argument("--methods", nargs="+", default=["plain", "feddem", "flower"],
                        choices=["plain", "feddem", "flower"])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run; the first is warm-up (default: 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vector-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="feddem's vector-dtype: plain uploads in it, and a 16-bit ring where it allows "
                             "(default float32; Flower's SecAgg+ is unchanged)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.rounds < 1 or min(args.sites) < 3:
        parser.error("--rounds must be >= 1 and every --sites >= 3 (secure aggregation with min-peers 2)")

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ["FEDDEM_HOME"] = tempfile.mkdtemp(prefix="feddem-bench-")  # the sites' stored vectors
    results = []
    for sites in args.sites:
        for params in args.params:
            for method in args.methods:
                t0 = time.perf_counter()
                print(f"{method}: {sites} sites, {int(params):,} parameters, {args.rounds} rounds ...", flush=True)
                results.append(run_one(method, args.seed, sites, int(params), args.rounds, args.vector_dtype))
                print(f"  {results[-1]['seconds_per_round']:.3f} s/round ({time.perf_counter() - t0:.1f} s in all)",
                      flush=True)
    rows = ratios(results)
    print_table(results, rows)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "ratios": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
