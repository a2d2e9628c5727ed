"""Logging configuration, done by the entry points (never at import time).

- `feddem simulate`'s child process sends everything to run.log: `configure_file_logging`.
- The Flower apps, when Flower's own processes run them (`flwr run`, a deployment) and nobody configured logging:
  `ensure_app_logging`, called at the start of each handler, shows feddem's INFO lines on stderr, which Flower
  forwards (`flwr log`).
- The command line: `configure_cli_logging`.
"""

import logging
import sys

QUIET = ("httpx", "httpcore", "urllib3", "filelock", "alembic", "asyncio")
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _quiet_libraries() -> None:
    # the root logger at INFO would also show httpx's line for every request; under `flwr run` the ServerApp
    # process pushes its logs to the SuperLink over HTTP, so each push would log (and push) one more line
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)


def _plain_flower() -> None:
    """Flower's logger keeps its own coloured console handler; drop it, so its records reach the root's handler."""
    from flwr.common.logger import ConsoleHandler

    flower = logging.getLogger("flwr")
    for handler in list(flower.handlers):
        if isinstance(handler, ConsoleHandler):
            flower.removeHandler(handler)
    flower.propagate = True


def configure_file_logging(stream) -> None:
    """Every logger at INFO to `stream` (a file), with timestamps and logger names, no colour codes; Python
    warnings too."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    _quiet_libraries()
    _plain_flower()


def ensure_app_logging() -> None:
    """Under Flower's processes: feddem's INFO lines on stderr, unless an entry point configured logging already;
    Flower's own lines without colour codes when stderr is not a terminal (a Ray worker's goes to run.log)."""
    if not sys.stderr.isatty():
        from flwr.common.logger import update_console_handler

        update_console_handler(colored=False)
    if logging.getLogger().handlers:
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    _quiet_libraries()


def configure_cli_logging(verbose: bool = False) -> None:
    """The `feddem` command: messages as they are (the console shows feddem's stages itself)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    _quiet_libraries()
