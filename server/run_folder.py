"""The run folder of `feddem simulate` (`--out`), checked before anything starts.

It must be creatable and writable: not a file, not under a file, not somewhere nothing can be created (/proc) — a
probe file is written and removed, and any folder made for the probe is removed again, so a refused run leaves no
trace. An existing folder must be empty: a run into an old run's folder would leave the old `pool/` (and other files)
beside the new model and report. `--overwrite` clears it, but only when it holds nothing but what a run writes
(`RUN_ENTRIES`), and never `/`, `$HOME`, `$FEDDEM_HOME`, or a folder above them or above the working directory.
"""

import os
import shutil
from pathlib import Path

from feddem.common.errors import FeddemError
from feddem.common.paths import feddem_home
from feddem.server.manifest import RUN_ENTRIES  # what a run (and `feddem ablate` into the run folder) writes there



def check_run_folder(out: str, overwrite: bool = False) -> Path:
    """The folder a run will write to (`out`, or `$FEDDEM_HOME/runs` where each run makes its own), checked as the
    module says; a FeddemError names the problem. Nothing is cleared here: see `clear_run_folder`."""
    if not out:
        runs = feddem_home().expanduser().resolve() / "runs"
        check_writable(runs, f"the default run folder '{runs}' ($FEDDEM_HOME/runs; or give --out)")
        return runs
    path = Path(out).expanduser().resolve()
    label = f"--out '{out}'"
    check_writable(path, label)
    if not path.exists():
        return path  # a new folder: the run makes it
    try:
        entries = sorted(p.name for p in path.iterdir())
    except OSError as exc:
        raise FeddemError(f"{label} cannot be read ({exc.strerror or exc})") from None
    if entries and not overwrite:
        raise FeddemError(f"{label} is not empty (it holds {_listing(entries)}): a run there would mix its files with "
                          f"the old ones; give a new folder, or --overwrite to clear a previous run's folder")
    if entries:
        check_clearable(path, label)
    return path


def check_writable(path: Path, label: str) -> None:
    """`path` (absolute) is a folder, or can be made one, in which a file can be created; leaves nothing behind."""
    created: list[Path] = []
    try:
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            where = "is a file" if existing == path else f"is under '{existing}', which is a file"
            raise FeddemError(f"{label} {where}: give a folder")
        for folder in [*reversed(path.parents), path]:
            if not folder.exists():
                folder.mkdir()
                created.append(folder)
        probe = path / f".feddem-probe-{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            probe.unlink()
    except OSError as exc:
        raise FeddemError(f"{label} cannot be created or written here ({exc.strerror or exc}): give a folder you "
                          f"can write to") from None
    finally:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass


def check_clearable(path: Path, label: str) -> None:
    """`--overwrite` may clear `path`: it holds only what a run writes, and it is no protected folder."""
    protected = [p.expanduser().resolve() for p in (Path("/"), Path.home(), feddem_home())]
    for folder in [*protected, Path.cwd().resolve()]:
        if path in folder.parents or (path == folder and folder in protected):
            raise FeddemError(f"--overwrite will not clear {label}: it is /, $HOME or $FEDDEM_HOME, or a folder "
                              f"above them or above the working directory")
    foreign = sorted(p.name for p in path.iterdir() if p.name not in RUN_ENTRIES)
    if foreign:
        raise FeddemError(f"--overwrite clears only a previous run's folder, and {label} also holds "
                          f"{_listing(foreign)}, which a run does not write: give a new folder, or empty it yourself")


def clear_run_folder(path: Path) -> None:
    """Empty a run folder that `check_run_folder(..., overwrite=True)` accepted (checked again: it may have changed).
    Links are removed, never followed."""
    check_clearable(path, f"--out '{path}'")
    try:
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    except OSError as exc:
        raise FeddemError(f"--overwrite could not clear '{path}': {exc}") from None


def _listing(names: list[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")
