"""`feddem-site`: a site operator's commands on this machine. Today `feddem-site prune` deletes old stored vectors
of this machine's sites and keeps the privacy guard's records (`client.retention`).

Exit codes: 0 done; 2 bad usage or a site whose guard record cannot be trusted (named); 130 interrupted."""

import argparse
import logging
import sys

import feddem
from feddem.client import retention
from feddem.common.errors import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feddem-site", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"feddem {feddem.__version__}")
    retention.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_command("feddem-site", lambda: retention.run(args))


if __name__ == "__main__":
    sys.exit(main())
