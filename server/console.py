"""What `feddem simulate` and `feddem ablate` show a person: one line per stage, a live progress line per site
(step, loss, tokens/s, ETA) with an overall ETA, and a closing table (rich).

On a terminal the site lines are live bars. Written to a file or a pipe there are no colour codes and no redrawn
lines: each site's progress is printed at each quarter of its steps, with the overall line. Library logs are not
shown here; they go to run.log in the run folder (with `--verbose`, also here).
"""

import logging
import re
import sys
import time
from dataclasses import replace

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from feddem.common.progress import SiteProgress

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _rate(tokens_per_second: float) -> str:
    return f"{tokens_per_second / 1000:.1f}k tok/s" if tokens_per_second >= 1000 else f"{tokens_per_second:.0f} tok/s"


def site_text(p: SiteProgress) -> str:
    return (f"{p.site} ({p.domain}): step {p.step}/{p.steps}, loss {p.loss:.4f}, {_rate(p.tokens_per_second)}, "
            f"ETA {_clock(p.eta_seconds)}")


class Overall:
    """Training progress over all sites: steps done of sites x steps, and an ETA from the rate since the first
    step seen (sites that wait for a free CPU count as not started, so the rate covers the queueing)."""

    def __init__(self, sites: int, steps: int):
        self.total = sites * steps
        self.first: float | None = None
        self.first_done = 0

    def update(self, progress: dict[str, SiteProgress], now: float | None = None) -> tuple[int, float | None]:
        now = time.monotonic() if now is None else now
        done = sum(p.step for p in progress.values())
        if done and self.first is None:
            self.first, self.first_done = now, done
        if self.first is None or now <= self.first or done <= self.first_done:
            return done, (0.0 if done >= self.total else None)
        rate = (done - self.first_done) / (now - self.first)
        return done, (self.total - done) / rate

    def text(self, done: int, eta: float | None) -> str:
        pct = 100 * done // max(self.total, 1)
        return f"training: {done}/{self.total} steps ({pct}%)" + (f", ETA {_clock(eta)}" if eta is not None else "")


class RunConsole:
    """The display of one run. Use as a context manager; `stage`, `progress` and `log_line` come from
    `server.simulation.simulate`."""

    def __init__(self, sites: int, steps: int, verbose: bool = False, stream=None, rounds: int = 1):
        self.console = Console(file=stream or sys.stderr, highlight=False, soft_wrap=True)
        self.live = self.console.is_terminal
        self.verbose = verbose
        self.steps, self.rounds = steps, rounds
        self.overall = Overall(sites, steps * rounds)
        self.last_step: dict[str, int] = {}
        self.rounds_done: dict[str, int] = {}  # a site's step going back down: its next round began
        self.shown: dict[str, int] = {}  # site -> last quarter printed (not a terminal)
        self.overall_shown = 0
        self.tasks: dict[str, int] = {}
        self.bars: Progress | None = None
        self.overall_task = None
        if self.live:
            self.bars = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24),
                                 TextColumn("{task.fields[info]}"), console=self.console, transient=False)

    def __enter__(self) -> "RunConsole":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.bars is not None and self.bars.live.is_started:
            self.bars.stop()

    def stage(self, text: str, level: int = logging.INFO) -> None:
        style = "yellow" if level == logging.WARNING else "red" if level >= logging.ERROR else None
        self.console.print(text, style=style, markup=False)

    def log_line(self, line: str) -> None:
        self.console.print(ANSI.sub("", line), style="dim", markup=False)

    def progress(self, sites: dict[str, SiteProgress]) -> None:
        if not sites:
            return
        for name, p in sites.items():
            if p.step < self.last_step.get(name, 0):
                self.rounds_done[name] = self.rounds_done.get(name, 0) + 1
                self.shown[name] = 0
            self.last_step[name] = p.step
        done, eta = self.overall.update({name: replace(p, step=self.rounds_done.get(name, 0) * p.steps + p.step)
                                         for name, p in sites.items()})
        if self.live:
            self._bars(sites, done, eta)
            return
        for name, p in sorted(sites.items()):
            quarter = 4 * p.step // max(p.steps, 1)
            if quarter > self.shown.get(name, 0):
                self.shown[name] = quarter
                self.console.print(self._round(name) + site_text(p), markup=False)
        quarter = 4 * done // max(self.overall.total, 1)
        if quarter > self.overall_shown:
            self.overall_shown = quarter
            self.console.print(self.overall.text(done, eta), markup=False)

    def _round(self, name: str) -> str:
        return f"round {self.rounds_done.get(name, 0) + 1}/{self.rounds}: " if self.rounds > 1 else ""

    def _bars(self, sites: dict[str, SiteProgress], done: int, eta: float | None) -> None:
        if not self.bars.live.is_started:
            self.bars.start()
            self.overall_task = self.bars.add_task("overall", total=self.overall.total, info="")
        for name, p in sorted(sites.items()):
            if name not in self.tasks:
                self.tasks[name] = self.bars.add_task(f"{p.site} ({p.domain})", total=p.steps, info="")
            self.bars.update(self.tasks[name], completed=p.step,
                             info=f"{self._round(name)}{p.step}/{p.steps}  loss {p.loss:.4f}  {_rate(p.tokens_per_second)}  "
                                  f"ETA {_clock(p.eta_seconds)}")
        self.bars.update(self.overall_task, completed=done, info=self.overall.text(done, eta))
        if done >= self.overall.total:  # training is over: the next stages print lines again
            self.close()

    def summary(self, report: dict, out_dir) -> None:
        """The report's closing table (`server.report.closing_table`: is this merge good?), failures and paths."""
        from feddem.server.report import closing_table

        self.console.print(closing_table(report))
        for name, why in report.get("failures", {}).items():
            self.console.print(f"failed: {name}: {why}", style="yellow", markup=False)
        self.console.print(f"merged model: {out_dir / 'model'}\nreport: {out_dir / 'report.json'}, "
                           f"{out_dir / 'report.png'}", markup=False)

    def ranking(self, rows: list[dict]) -> None:
        """`feddem ablate`'s closing table: candidates best first."""
        table = Table(title="candidate mixtures (best first)", title_justify="left")
        for column in ("rank", "mean loss", "candidate"):
            table.add_column(column, justify="right" if column != "candidate" else "left")
        for i, row in enumerate(rows, 1):
            if "error" in row:
                table.add_row("--", "-", f"{'+'.join(row['candidate'])}: not scored ({row['error']})")
            else:
                table.add_row(str(i), f"{row['mean_loss']:.4f}", "+".join(row["candidate"]))
        self.console.print(table)


class StageHandler(logging.Handler):
    """feddem's own log records in this process (the embedded base's pre-training, ablation) as stage lines."""

    def __init__(self, display: RunConsole):
        super().__init__(logging.INFO)
        self.display = display

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.display.stage(record.getMessage(), record.levelno)
        except Exception:  # noqa: BLE001
            self.handleError(record)


class display_for:  # noqa: N801 - used as `with display_for(...) as display`
    """The console of one `feddem simulate`/`ablate` command, with this process's logging routed to it: feddem's
    records as stage lines; other libraries' warnings and progress bars off (with `verbose`: on, at INFO)."""

    def __init__(self, sites: int, steps: int, verbose: bool = False, stream=None, rounds: int = 1):
        import os

        if not verbose:
            for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
                os.environ.setdefault(var, "1")
            os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        self.display = RunConsole(sites, steps, verbose, stream, rounds)
        self.handler = StageHandler(self.display)
        self.verbose = verbose

    def __enter__(self) -> RunConsole:
        logging.basicConfig(level=logging.INFO if self.verbose else logging.ERROR, format="%(name)s: %(message)s")
        logging.captureWarnings(True)
        feddem = logging.getLogger("feddem")
        feddem.addHandler(self.handler)
        feddem.setLevel(logging.INFO)
        feddem.propagate = False
        return self.display

    def __exit__(self, *exc) -> None:
        self.display.close()
        feddem = logging.getLogger("feddem")
        feddem.removeHandler(self.handler)
        feddem.propagate = True
