"""End to end: `feddem simulate` with the default secure aggregation (Flower Simulation Engine, Ray on loopback)
gives the same merged model as `--aggregation plain` on the same seed, within the bound the report states."""

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import simulate_cli


@pytest.mark.slow
def test_secure_simulation_equals_plain_within_the_reported_bound(tmp_path, tiny_base, monkeypatch):
    # each run at sites of its own (FEDDEM_HOME holds the sites' work dirs): a site whose vector was in a secure sum
    # never sends that vector in the clear, and one that re-trains on spent data and seed draws fresh randomness
    monkeypatch.setenv("FEDDEM_HOME", str(tmp_path / "secure-home"))
    secure, result = simulate_cli(tmp_path / "secure", "--sites", "3", "--model", str(tiny_base))  # secure: default
    monkeypatch.setenv("FEDDEM_HOME", str(tmp_path / "plain-home"))
    plain, _ = simulate_cli(tmp_path / "plain", "--sites", "3", "--aggregation", "plain", "--model", str(tiny_base))
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
