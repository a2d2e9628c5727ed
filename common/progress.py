"""Training progress from the sites to the `feddem simulate` console.

The sites of a simulation run in Ray actor processes, so their progress reaches the driver through files: when
`FEDDEM_PROGRESS_DIR` is set (by `feddem simulate`, inherited by every process the simulation starts), each site
replaces `<dir>/<site>.json` with its latest step (write to a temporary file, then rename: a reader never sees
half a file). A deployed site has no such variable and writes nothing. The reader (`read_progress`) is what the
console polls.
"""

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from feddem.common.atomic import write_atomic

PROGRESS_VAR = "FEDDEM_PROGRESS_DIR"


@dataclass
class SiteProgress:
    site: str
    domain: str
    step: int
    steps: int
    loss: float
    tokens_per_second: float
    eta_seconds: float
    updated: float  # time.time() of the update


class ProgressWriter:
    """One site's training progress, written at most every `interval` seconds (and always at the last step)."""

    def __init__(self, site: str, domain: str, steps: int, tokens_per_step: int, interval: float = 0.5,
                 folder: str | None = None):
        folder = folder if folder is not None else os.environ.get(PROGRESS_VAR, "")
        self.path = Path(folder) / f"{site}.json" if folder else None
        self.site, self.domain, self.steps, self.tokens_per_step = site, domain, steps, tokens_per_step
        self.interval = interval
        self.started = time.perf_counter()
        self.last_write = 0.0

    def step(self, step: int, loss: float) -> None:
        if self.path is None:
            return
        now = time.perf_counter()
        if step < self.steps and now - self.last_write < self.interval:
            return
        self.last_write = now
        elapsed = max(now - self.started, 1e-9)
        rate = step / elapsed
        record = SiteProgress(self.site, self.domain, step, self.steps, float(loss),
                              step * self.tokens_per_step / elapsed, (self.steps - step) / rate if rate else 0.0,
                              time.time())
        try:
            write_atomic(self.path, json.dumps(asdict(record)), private=False, durable=False)
        except OSError:  # progress is a display aid: never fail training over it
            pass


def read_progress(folder: Path) -> dict[str, SiteProgress]:
    """The latest progress of each site that wrote any, by site name."""
    found = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            record = SiteProgress(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        found[record.site] = record
    return found
