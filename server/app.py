"""The feddem ServerApp. `app` serves `flwr run` (settings from the run config); `build_server_app` lets
`feddem simulate` pass its settings directly and collect the result."""

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from feddem.common.config import RunConfig
from feddem.common.errors import FeddemError
from feddem.server.admin.recorder import recorded
from feddem.server.workflow import run_dem

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
# The root logger at INFO would also show httpx's line for every request; under `flwr run` the ServerApp process
# pushes its logs to the SuperLink over HTTP, so each push would log (and push) one more line.
for _noisy in ("httpx", "httpcore"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)


def build_server_app(overrides: dict | None = None, outcome: dict | None = None) -> ServerApp:
    """A ServerApp running one DEM run. With `outcome`, the result or the FeddemError is stored there instead of
    raised, so a caller can report it without a traceback."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            cfg = RunConfig.from_record(dict(context.run_config) | (overrides or {}))
            # recorded in the run store when FEDDEM_STORE or FEDDEM_ADMIN_SERVER names one (server/admin/recorder.py)
            result = recorded(cfg.to_record(), context.run_id, lambda: run_dem(grid, cfg, context.run_id))
        except FeddemError as exc:
            if outcome is None:
                raise
            outcome["error"] = str(exc)
            return
        if outcome is not None:
            outcome["result"] = result

    return app


app = build_server_app()
