"""Running a DEM run on one machine with Flower's Simulation Engine (Ray, kept on loopback).

`simulate` is the driver: it checks the inputs, then starts the simulation in a child process (its own session,
so a terminal's Ctrl-C reaches only the driver) and watches it: the child's stdout/stderr (Flower, Ray, the sites'
library output) go to `run.log` in the run folder, the ServerApp's stage lines come back over a pipe as JSON
events, and the sites' training progress comes from files they replace in `<run>/.progress/`
(`common.progress`). On SIGINT or SIGTERM the driver stops every process of the run (all carry a tag in their
environment), marks the run folder `INTERRUPTED` and raises `Interrupted`.

Flower 1.42 offers one supported way to run a simulation, `flwr run` through a SuperLink (README, "With Flower's
CLI"); in-process it has only `flwr.simulation.run_simulation`, deprecated, which the child uses, with its
deprecation warning filtered out of the log (it is addressed to Flower's own users, not to feddem's).
"""

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from feddem.common.atomic import write_atomic
from feddem.common.config import RunConfig
from feddem.common.errors import FeddemError
from feddem.common.data import SyntheticSizes, load_shard
from feddem.common.modeling import check_model_ref
from feddem.common.paths import feddem_home
from feddem.common.progress import PROGRESS_VAR, read_progress
from feddem.server.base_ref import resolve_base_ref
from feddem.server.workflow import RunResult, preflight

RUN_LOG = "run.log"
PROGRESS_DIR = ".progress"
INTERRUPTED = "INTERRUPTED"
EVENTS_FD_VAR = "FEDDEM_EVENTS_FD"
STOP_GRACE = 3.0  # seconds the run's processes get to end after SIGTERM, before SIGKILL
# The sites' ClientApp, by the same reference as pyproject.toml's [tool.flwr.app.components] clientapp: the
# simulation composes the two apps as Flower's engine does (`flwr run`), so server code never imports client code.
CLIENT_APP = "feddem.client.app:app"


def loopback_environment() -> None:
    """Keep Ray and Flower local: every Ray port binds 127.0.0.1; no telemetry, no runtime installs."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # the sites' lines in run.log without colour codes


TAG_VAR = "FEDDEM_SIMULATION_TAG"  # inherited by every process the simulation starts (Ray's raylet, workers, ...)


def _tagged_pids(tag: str) -> list[int]:
    """Live processes (other than this one) whose environment carries the tag (Linux /proc)."""
    needle = f"{TAG_VAR}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def stop_leftovers(tag: str, grace: float = 10.0) -> int:
    """Wait up to `grace` seconds for the simulation's processes to end, then terminate (and kill) the rest: Ray can
    leave a busy actor process behind after shutdown, and with many sites those pile up. Returns how many are
    still alive after that (0: all gone)."""
    deadline = time.monotonic() + grace
    while (pids := _tagged_pids(tag)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return terminate_tagged(tag, pids)


def terminate_tagged(tag: str, pids: list[int] | None = None, grace: float = STOP_GRACE) -> int:
    """SIGTERM every process carrying the tag, SIGKILL what is left after `grace` seconds; returns how many are
    still alive after that (0: all gone)."""
    pids = _tagged_pids(tag) if pids is None else pids
    if not pids:
        return 0
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (left := _tagged_pids(tag)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        _signal_all(left, signal.SIGKILL)
        deadline = time.monotonic() + 2.0
        while (left := _tagged_pids(tag)) and time.monotonic() < deadline:
            time.sleep(0.1)
    return len(left)


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


class Interrupted(Exception):
    """The run was stopped by a signal; its processes are gone and its folder is marked."""

    def __init__(self, signum: int, out_dir: Path | None):
        self.signum, self.out_dir = signum, out_dir
        name = signal.Signals(signum).name
        where = f": run folder {out_dir} marked {INTERRUPTED}" if out_dir else ""
        super().__init__(f"interrupted by {name}{where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _Stop(BaseException):
    """Raised in the driver's main thread by its signal handler."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class NullDisplay:
    """What `simulate` reports to, when nobody watches: stage lines to the `feddem.server` logger."""

    def stage(self, text: str, level: int = logging.INFO) -> None:
        logging.getLogger("feddem.server").log(level, "%s", text)

    def progress(self, sites: dict) -> None:
        pass

    def log_line(self, line: str) -> None:
        pass


def run_folder(cfg: RunConfig) -> Path:
    """The run folder: `--out`, or a new one under $FEDDEM_HOME/runs/."""
    if cfg.out_dir:
        return Path(cfg.out_dir).expanduser().resolve()
    return (feddem_home() / "runs" / f"{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}").resolve()


class _Launch:
    """The processes and descriptors of one simulation, for `simulate` to start, watch and clean up."""

    def __init__(self):
        self.tag = uuid.uuid4().hex  # a fresh tag per run: only this run's processes carry it
        self.out = self.child = self.progress_dir = None
        self.read_end = self.write_end = -1

    def prepare(self, cfg: RunConfig, display) -> RunConfig:
        """Checks, then the run folder (with a fresh progress folder); returns `cfg` with its `out_dir`."""
        preflight(cfg)
        check_local_inputs(cfg)
        self.out = out = run_folder(cfg)
        cfg = replace(cfg, out_dir=str(out))
        out.mkdir(parents=True, exist_ok=True)
        self.progress_dir = out / PROGRESS_DIR
        shutil.rmtree(self.progress_dir, ignore_errors=True)
        self.progress_dir.mkdir()
        (out / INTERRUPTED).unlink(missing_ok=True)
        display.stage(f"library logs: {out / RUN_LOG}")
        return cfg

    def run(self, cfg: RunConfig, display):
        """Start the run's process, send it the configuration, and watch it to its outcome."""
        out, progress_dir = self.out, self.progress_dir
        self.read_end, self.write_end = os.pipe()
        env = dict(os.environ, **{TAG_VAR: self.tag, PROGRESS_VAR: str(progress_dir),
                                  EVENTS_FD_VAR: str(self.write_end), "PYTHONUNBUFFERED": "1"})
        events: queue.Queue = queue.Queue()
        with open(out / RUN_LOG, "ab") as log_file:
            self.child = child = subprocess.Popen(
                [sys.executable, "-m", "feddem.server.simulation"], stdin=subprocess.PIPE, stdout=log_file,
                stderr=subprocess.STDOUT, env=env, pass_fds=(self.write_end,), start_new_session=True,
            )
        os.close(self.write_end)
        self.write_end = -1
        reader = threading.Thread(target=_read_events, args=(self.read_end, events), daemon=True)
        self.read_end = -1  # the reader owns it now
        reader.start()
        child.stdin.write(json.dumps(cfg.to_record()).encode())
        child.stdin.close()
        outcome = _watch(child, events, progress_dir, out / RUN_LOG, display)
        reader.join(timeout=5)
        return _drain(events, display) or outcome

    def stop(self, stop: "_Stop", previous: dict, display) -> "Interrupted":
        """SIGINT/SIGTERM: stop every process of the run, mark its folder interrupted."""
        for s in previous:  # a second signal while stopping changes nothing
            signal.signal(s, signal.SIG_IGN)
        display.stage(f"{signal.Signals(stop.signum).name}: stopping the run", logging.WARNING)
        if self.child is not None:
            _kill_group(self.child)
        terminate_tagged(self.tag)
        out = self.out
        if out is not None and out.is_dir():
            _mark_interrupted(out, stop.signum)
        return Interrupted(stop.signum, out if out is not None and out.is_dir() else None)

    def close(self, stopped: bool) -> None:
        """Descriptors closed, the progress folder removed, no process of the run left."""
        for fd in (self.read_end, self.write_end):
            if fd >= 0:
                os.close(fd)
        if self.progress_dir is not None:
            shutil.rmtree(self.progress_dir, ignore_errors=True)
        child = self.child
        if child is not None and child.poll() is None:
            _kill_group(child)
        if child is not None:
            stop_leftovers(self.tag, grace=0.0 if stopped else 10.0)

    def result(self, outcome) -> RunResult:
        if outcome and outcome.get("kind") == "result":
            return RunResult(Path(outcome["out_dir"]), outcome["report"])
        if outcome and outcome.get("kind") == "error":
            raise FeddemError(outcome["message"])
        raise FeddemError(f"the simulation ended without a result (exit code {self.child.returncode}); its log: "
                          f"{self.out / RUN_LOG}\n{_tail(self.out / RUN_LOG)}")


def simulate(cfg: RunConfig, display=None) -> RunResult:
    """Run one DEM run with `cfg.sites` virtual sites; raises FeddemError with the reason if it fails, and
    Interrupted when SIGINT or SIGTERM stopped it. `display` (server.console.RunConsole) shows the stages and the
    sites' progress; with `display.verbose`, also run.log as it grows."""
    display = display or NullDisplay()
    stopped: list[int] = []

    def on_signal(signum, frame):
        if not stopped:
            stopped.append(signum)
            raise _Stop(signum)

    previous = ({s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
                if threading.current_thread() is threading.main_thread() else {})
    launch = _Launch()
    try:
        outcome = launch.run(launch.prepare(cfg, display), display)
    except _Stop as stop:
        raise launch.stop(stop, previous, display) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        launch.close(bool(stopped))
    return launch.result(outcome)


def _kill_group(child: subprocess.Popen) -> None:
    """SIGTERM the child's process group, SIGKILL it after the grace period."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(child.pid, sig)
        except OSError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _mark_interrupted(out: Path, signum: int) -> None:
    """Leave a note that the folder's contents are incomplete; a finished run's report.json is never half there
    (the report is written last), so a folder without report.json is an unfinished run."""
    text = (f"interrupted by {signal.Signals(signum).name} at {datetime.now().isoformat(timespec='seconds')}; "
            f"the outputs here are incomplete (see {RUN_LOG})\n")
    write_atomic(out / INTERRUPTED, text, private=False)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _read_events(fd: int, events: queue.Queue) -> None:
    """The child's JSON events, one per line, into the queue; None at the end."""
    with os.fdopen(fd, "rb") as stream:
        for line in stream:
            try:
                events.put(json.loads(line))
            except ValueError:
                continue
    events.put(None)


def _drain(events: queue.Queue, display) -> dict | None:
    """Show the waiting stage events; return the outcome event if one came."""
    outcome = None
    while True:
        try:
            event = events.get_nowait()
        except queue.Empty:
            return outcome
        if event is None:
            continue
        if event.get("kind") == "log":
            display.stage(event["message"], event.get("level", logging.INFO))
        else:
            outcome = event


def _watch(child: subprocess.Popen, events: queue.Queue, progress_dir: Path, log_path: Path, display) -> dict | None:
    """Until the child exits: stage events and site progress to the display (and run.log's new lines when
    verbose)."""
    outcome = None
    verbose = getattr(display, "verbose", False)
    position = 0
    while True:
        done = child.poll() is not None
        outcome = _drain(events, display) or outcome
        display.progress(read_progress(progress_dir))
        if verbose:
            position = _follow(log_path, position, display)
        if done:
            return outcome
        time.sleep(0.2)


def _follow(path: Path, position: int, display) -> int:
    try:
        with open(path, "rb") as f:
            f.seek(position)
            chunk = f.read()
    except OSError:
        return position
    end = chunk.rfind(b"\n") + 1
    for line in chunk[:end].decode(errors="replace").splitlines():
        display.log_line(line)
    return position + end


# --- the child: runs the simulation, its output goes to run.log -------------------------------------------------


class _EventHandler(logging.Handler):
    """feddem.server's records as JSON lines on the events pipe."""

    def __init__(self, stream):
        super().__init__(logging.INFO)
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            send_event(self.stream, {"kind": "log", "level": record.levelno, "message": record.getMessage()})
        except Exception:  # noqa: BLE001 - a display problem must not end the run
            self.handleError(record)


_events_lock = threading.Lock()


def send_event(stream, event: dict) -> None:
    with _events_lock:
        stream.write((json.dumps(event, default=str) + "\n").encode())
        stream.flush()


class _DropDeprecation(logging.Filter):
    """Flower's warning that `run_simulation` is deprecated: meant for Flower's users (see the module doc)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def configure_child_logging(events) -> None:
    """Everything to stderr (run.log) with timestamps and no colour; feddem.server's records also as events."""
    from feddem.common.logsetup import configure_file_logging

    configure_file_logging(sys.stderr)
    logging.getLogger("feddem.server").addHandler(_EventHandler(events))
    logging.getLogger("flwr").addFilter(_DropDeprecation())


def _child() -> int:
    fd = int(os.environ.pop(EVENTS_FD_VAR))
    os.set_inheritable(fd, False)  # Ray's processes must not hold the pipe open
    events = os.fdopen(fd, "wb")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))  # the driver cleans up: end without Ray's teardown
    configure_child_logging(events)
    try:
        cfg = RunConfig.from_record(json.loads(sys.stdin.read()))
        loopback_environment()
        from flwr.simulation import run_simulation
        from flwr.supercore.object_ref import load_app

        from feddem.server.app import build_server_app

        outcome: dict = {}
        client_app = load_app(CLIENT_APP, FeddemError)  # by reference, as Flower's engine composes apps
        run_simulation(server_app=build_server_app(cfg.to_record(), outcome), client_app=client_app,
                       num_supernodes=cfg.sites, backend_config=backend_config(cfg))
    except FeddemError as exc:
        outcome = {"error": str(exc)}
    if "result" in outcome:
        from feddem.server.cross_domain import complete_in_simulation

        # the ServerApp of a secure run withholds the cross-domain matrix; here one user owns every site's vector
        result = complete_in_simulation(cfg, outcome["result"])
        send_event(events, {"kind": "result", "out_dir": str(result.out_dir), "report": result.report})
    elif "error" in outcome:
        send_event(events, {"kind": "error", "message": outcome["error"]})
    events.close()
    return 0


if __name__ == "__main__":
    sys.exit(_child())
