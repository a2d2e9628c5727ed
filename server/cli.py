"""`feddem`: the command line. `feddem simulate` runs a whole federated DEM run on this machine; `feddem certs`
writes a deployment's certificates and site keys (`server.certs`)."""

import argparse
import logging
import sys
from dataclasses import fields

from common.config import AGGREGATIONS, RunConfig
from common.devices import DEVICES
from common.errors import FeddemError
from common.weighting import WEIGHTINGS
from server import certs

RENAMED = {"out_dir": "out"}  # option names that differ from the run-config key
CHOICES = {"weighting": list(WEIGHTINGS), "device": list(DEVICES), "aggregation": list(AGGREGATIONS)}
METAVARS = {"model": "NAME_OR_DIR", "data": "SPEC", "out_dir": "DIR", "sites": "N"}


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """One option per RunConfig field, with its default and help text."""
    for f in fields(RunConfig):
        flag = "--" + RENAMED.get(f.name, f.name.replace("_", "-"))
        help_text = f.metadata["help"]
        if f.type is bool or isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            continue
        default = f.default
        parser.add_argument(
            flag, dest=f.name, type=type(default), default=default, choices=CHOICES.get(f.name),
            metavar=METAVARS.get(f.name), help=f"{help_text} (default: {default!r})",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="feddem",
        description="feddem: federated Distribution Edited Models. Sites fine-tune a shared base model on private "
        "data; the server merges theta_base + sum_i w_i (theta_i - theta_base) without seeing the data.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser(
        "simulate",
        help="run a federated DEM run with virtual sites on this machine (Flower Simulation Engine)",
        description="Run one federated DEM round on this machine: each virtual site fine-tunes the base model on its "
        "own shard, the server weights and sums the sites' distribution vectors, merges, evaluates every domain, "
        "and writes the merged model (model/), report.json and report.png to the run folder. With no options it "
        "runs the embedded default: a ~1M-parameter Llama-style model (pre-trained once and cached in "
        "$FEDDEM_HOME, default ~/.cache/feddem) on 4 built-in synthetic domains.",
    )
    _add_run_options(sim)
    certs.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "simulate":
            from server.simulation import simulate

            cfg = RunConfig(**{f.name: getattr(args, f.name) for f in fields(RunConfig)})
            result = simulate(cfg)
            print(f"\nmerged model: {result.out_dir / 'model'}\nreport: {result.out_dir / 'report.json'}, "
                  f"{result.out_dir / 'report.png'}")
        elif args.command == "certs":
            certs.run(args)
    except FeddemError as exc:
        print(f"feddem: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("feddem: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
