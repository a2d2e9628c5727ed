"""The feddem ServerApp. `app` serves `flwr run` (settings from the run config); `build_server_app` lets
`feddem simulate` pass its settings directly and collect the result."""

import logging
import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from feddem.common.config import RunConfig
from feddem.common.errors import FeddemError
from feddem.common.logsetup import ensure_app_logging
from feddem.server.admin.recorder import recorded
from feddem.server.workflow import run_dem

log = logging.getLogger("feddem.server")

SETTLE_SECONDS = 3.0  # a simulation registers all its SuperNodes at once: a count unchanged this long is final
DEPLOYMENT_NOTICE_SECONDS = 10.0


def _simulated(grid: Grid) -> bool:
    """Whether the grid is Flower's in-memory simulation grid (its SuperNodes are all there from the start)."""
    try:
        from flwr.superlink.grid import InMemoryGrid
    except ImportError:  # pragma: no cover - a Flower without it
        return False
    return isinstance(grid, InMemoryGrid)


def check_site_count(grid: Grid, wanted: int, timeout: float, poll: float = 0.5) -> None:
    """Say within seconds when fewer sites than `sites` are there. In a simulation the federation's SuperNodes
    register at once: once their count holds still for SETTLE_SECONDS and is short, fail with the settings to
    change. In a deployment sites may still be starting: log a notice after DEPLOYMENT_NOTICE_SECONDS and let the
    workflow wait up to `timeout`."""
    simulated = _simulated(grid)
    started = last_change = time.monotonic()
    count = -1
    while True:
        now = time.monotonic()
        current = len(list(grid.get_node_ids()))
        if current >= wanted:
            return
        if current != count:
            count, last_change = current, now
        if simulated and count > 0 and now - last_change >= SETTLE_SECONDS:
            raise FeddemError(
                f"the run needs {wanted} sites (run config 'sites') but the simulated federation has {count} "
                f"SuperNode(s): run `flwr run . --federation-config \"num-supernodes={wanted}\"`, or lower sites "
                f"(`--run-config \"sites={count}\"`)")
        if not simulated and now - started >= DEPLOYMENT_NOTICE_SECONDS:
            log.warning("%d of %d sites connected after %.0f s; waiting up to %.0f s (timeout) for the others",
                        count, wanted, now - started, timeout)
            return
        if now - started >= timeout:
            return  # the workflow's own wait reports it
        time.sleep(poll)


def build_server_app(overrides: dict | None = None, outcome: dict | None = None) -> ServerApp:
    """A ServerApp running one DEM run. With `outcome`, the result or the FeddemError is stored there instead of
    raised, so a caller can report it without a traceback."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        ensure_app_logging()  # a no-op where an entry point configured logging
        try:
            cfg = RunConfig.from_record(dict(context.run_config) | (overrides or {}))
            check_site_count(grid, cfg.sites, cfg.timeout)
            # recorded in the run store when FEDDEM_STORE or FEDDEM_ADMIN_SERVER names one (server/admin/recorder.py)
            result = recorded(cfg.to_record(), context.run_id, lambda: run_dem(grid, cfg, context.run_id))
        except FeddemError as exc:
            if outcome is None:
                log.error("run failed: %s", exc)
                raise
            outcome["error"] = str(exc)
            return
        if outcome is not None:
            outcome["result"] = result

    return app


app = build_server_app()
