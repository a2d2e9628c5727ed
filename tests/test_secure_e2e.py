"""End to end: `feddem simulate` with the default secure aggregation (Flower Simulation Engine, Ray on loopback)
gives the same merged model as `--aggregation plain` on the same seed, within the bound the report states."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_BASE_STEPS

SMALL = ["--steps", "20", "--train-examples", "200", "--eval-examples", "40", "--base-steps", str(TINY_BASE_STEPS)]


def _simulate(out, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "server.cli", "simulate", "--out", str(out), *SMALL, *args],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return json.loads((out / "report.json").read_text()), result


@pytest.mark.slow
def test_secure_simulation_equals_plain_within_the_reported_bound(tmp_path, tiny_base):
    secure, result = _simulate(tmp_path / "secure", "--sites", "3")  # secure is the default
    plain, _ = _simulate(tmp_path / "plain", "--sites", "3", "--aggregation", "plain")
    assert secure["aggregation"] == "secure" and plain["aggregation"] == "plain"
    assert "secure_aggregation" not in plain
    details = secure["secure_aggregation"]
    bound = details["error_bound"]
    assert 0 < bound < 1e-5 and details["threshold"] == 2 and details["dropped"] == {}
    assert details["clipped_elements"] == {f"site-{i}": 0 for i in range(3)}
    assert secure["failures"] == {} and secure["weights"] == pytest.approx(plain["weights"])
    assert "secure aggregation: 3 of 3 sites in the sum" in result.stdout + result.stderr

    # same seed, same training: the sums differ only by the quantization bound (plus float32 rounding of the
    # plain sum and of base + sum, a few ulp)
    secure_sum, plain_sum = load_file(tmp_path / "secure" / "aggregate.safetensors"), \
        load_file(tmp_path / "plain" / "aggregate.safetensors")
    assert secure_sum.keys() == plain_sum.keys()
    for name, t in secure_sum.items():
        assert (t - plain_sum[name]).abs().max().item() <= bound + 1e-9, name
    secure_model = load_file(tmp_path / "secure" / "model" / "model.safetensors")
    plain_model = load_file(tmp_path / "plain" / "model" / "model.safetensors")
    eps = torch.finfo(torch.float32).eps
    for name, p in secure_model.items():
        q = plain_model[name]
        assert ((p - q).abs() <= bound + 2 * eps * q.abs()).all(), name

    for domain in ("arithmetic", "records", "prose"):
        base, merged = (secure["eval"][k][domain]["loss"] for k in ("base", "merged"))
        assert merged < base, (domain, base, merged)
        assert merged == pytest.approx(plain["eval"]["merged"][domain]["loss"], abs=1e-4)
