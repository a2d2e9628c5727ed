"""`feddem`: the command line. `feddem simulate` runs a whole federated DEM run on this machine; `feddem certs`
writes a deployment's certificates and site keys (`server.certs`); `feddem server` serves the run store over the
admin API (`server.admin.serve`). A site operator's commands are `feddem-site`'s (`client.cli`: `feddem-site prune`).

Exit codes (README, "Exit codes"): 0 the command succeeded; 1 a run started and failed; 2 bad usage (a bad option or
input, named before anything starts); 3 the run diverged (a site's training loss became inf or nan: lower --lr);
130 interrupted (Ctrl-C)."""

import argparse
import logging
import sys
from dataclasses import fields

import feddem
from feddem.common.config import AGGREGATIONS, VECTOR_DTYPES, RunConfig
from feddem.common.devices import DEVICES
from feddem.common.errors import (  # noqa: F401 (EXIT_INTERRUPTED, EXIT_USAGE: this program's codes too)
    EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, FeddemError, run_command,
)
from feddem.common.merging import RULE_NAMES
from feddem.common.weighting import WEIGHTINGS
from feddem.server import certs
from feddem.server.admin import serve
from feddem.server.precheck import check_shards_fill_a_block, check_simulation_inputs
from feddem.server.run_folder import check_run_folder, clear_run_folder

EXIT_FAILED, EXIT_DIVERGED = 1, 3  # and common.errors' EXIT_OK 0, EXIT_USAGE 2, EXIT_INTERRUPTED 130
DIVERGED = "training diverged"  # how common.training words a site's inf/nan loss (kept in the run's error)

RENAMED = {"out_dir": "out"}  # option names that differ from the run-config key
CHOICES = {"weighting": list(WEIGHTINGS), "device": list(DEVICES), "aggregation": list(AGGREGATIONS), "merge": list(RULE_NAMES),
           "vector_dtype": list(VECTOR_DTYPES)}
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
        epilog="exit codes: 0 ok, 1 a run failed, 2 bad usage, 3 a run diverged (inf/nan loss), 130 interrupted",
    )
    parser.add_argument("--version", action="version", version=f"feddem {feddem.__version__}")
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
    sim.add_argument("--overwrite", action="store_true",
                     help="clear a non-empty --out first; only a previous run's folder (nothing in it but what a run "
                     "writes) is cleared, never /, $HOME or $FEDDEM_HOME")
    sim.add_argument("--verbose", action="store_true", help="also show the library logs (Flower, Ray, the sites), "
                     "which otherwise go only to run.log in the run folder")
    certs.add_parser(sub)
    serve.add_parser(sub)
    sub.add_parser("sites", help="moved: a site operator's commands are `feddem-site` (feddem-site prune)",
                   add_help=False, prefix_chars="\0").add_argument(
        "rest", nargs=argparse.REMAINDER, help="what followed `feddem sites` (repeated in the error's hint)")
    abl = sub.add_parser(
        "ablate",
        help="rank candidate data mixtures (subsets of sites) by merging a trusted run's pool of vectors",
        description="Data-ablation approximation: for each candidate subset S of the sites, merge base + mean of "
        "their vectors and evaluate it on the test splits of the data this machine holds; writes ablation.json and "
        "ablation.png (ranked, best first). Needs a plain (trusted) run made with --keep-pool; a secure run ranks "
        "mixtures during the run with --ablate instead.",
    )
    abl.add_argument("run", metavar="RUN_DIR", help="the run folder (holds report.json and pool/)")
    abl.add_argument("--candidates", required=True, metavar="SPEC",
                     help="K (every subset of up to K sites) or 'site-0,site-1;site-2,site-3'")
    abl.add_argument("--data", default="", metavar="SPEC", help="evaluation data (default: the run's data spec)")
    abl.add_argument("--domains", default="", help="comma-separated evaluation domains (default: all)")
    abl.add_argument("--out", default="", metavar="DIR", help="where to write the table (default: the run folder)")
    abl.add_argument("--verbose", action="store_true", help="also show the library logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("simulate", "ablate"):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_command("feddem", lambda: dispatch(args))


def dispatch(args) -> int | None:
    """The chosen command; its exit code (None: done)."""
    if args.command == "simulate":
        return run_simulate(args)
    if args.command == "certs":
        certs.run(args)
    elif args.command == "server":
        serve.run(args)
    elif args.command == "sites":
        raise FeddemError("`feddem sites ...` moved to `feddem-site`: run `feddem-site "
                          f"{' '.join(args.rest) or 'prune --help'}`")
    elif args.command == "ablate":
        from feddem.server.ablation import ablate_pool
        from feddem.server.console import display_for

        with display_for(0, 0, args.verbose) as display:
            rows = ablate_pool(args.run, args.candidates, args.data,
                               [d.strip() for d in args.domains.split(",") if d.strip()] or None, args.out or None)
            display.ranking(rows)
    return None


def run_simulate(args: argparse.Namespace) -> int:
    """Check everything that can be checked (a FeddemError: bad usage, nothing started), then run; a run that
    fails is EXIT_FAILED, one whose training diverged EXIT_DIVERGED."""
    cfg = RunConfig(**{f.name: getattr(args, f.name) for f in fields(RunConfig)})
    check_simulation_inputs(cfg)  # no torch, no Ray yet: well under a second
    out = check_run_folder(cfg.out_dir, args.overwrite)
    from feddem.server.console import display_for
    from feddem.server.simulation import Interrupted, check_local_inputs, simulate
    from feddem.server.workflow import preflight

    preflight(cfg)
    check_local_inputs(cfg)  # every shard loaded and the model's config read, before Ray starts
    check_shards_fill_a_block(cfg)
    if cfg.out_dir and args.overwrite and out.is_dir():
        clear_run_folder(out)
    with display_for(cfg.sites, cfg.steps, args.verbose, rounds=cfg.rounds) as display:
        try:
            result = simulate(cfg, display)
        except Interrupted as exc:
            display.stage(f"feddem: {exc}", logging.WARNING)
            return exc.exit_code
        except FeddemError as exc:
            display.stage(f"feddem: error: {exc}", logging.ERROR)
            return EXIT_DIVERGED if DIVERGED in str(exc) else EXIT_FAILED
        display.close()
        display.summary(result.report, result.out_dir)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
