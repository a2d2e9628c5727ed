"""Site-side sparsification (`--sparsify`): DARE and top-k on hand-made tensors with known answers, the config's
errors, and a site that stores its sparsified vector (full and LoRA)."""

import pytest
import torch

from feddem.client.site import fine_tune
from feddem.common.site_context import SiteContext
from feddem.common.config import RunConfig
from feddem.common.errors import FeddemError
from feddem.common.sparsify import dare, parse_sparsify, sparsify, topk
from feddem.common.vector_io import load_vector
from feddem.common.vectors import scaled
from feddem.server.precheck import check_simulation_inputs


def _dense(shape, seed=0) -> torch.Tensor:
    """Random values with no zero among them (so a zero is an entry the rule dropped)."""
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return t + torch.sign(t) * 0.1


def test_parse_names_each_rule_and_refuses_the_rest():
    assert parse_sparsify("none") == ("none", 0.0) and parse_sparsify("") == ("none", 0.0)
    assert parse_sparsify("dare:0.9") == ("dare", 0.9) and parse_sparsify("TopK:0.2") == ("topk", 0.2)
    for bad, message in [("dare", "is not none, dare:P or topk:F"), ("drop:0.5", "is not none"),
                         ("dare:x", "'x' in 'dare:x' is not a number"), ("dare:1", r"must be in \[0, 1\)"),
                         ("dare:-0.1", r"must be in \[0, 1\)"), ("topk:0", r"must be in \(0, 1\]"),
                         ("topk:1.5", r"must be in \(0, 1\]")]:
        with pytest.raises(FeddemError, match=message):
            parse_sparsify(bad)


def test_config_and_precheck_refuse_a_bad_sparsify_before_anything_starts():
    assert RunConfig.from_record({"sparsify": "dare:0.5"}).sparsify == "dare:0.5"
    assert RunConfig().sparsify == "none"
    with pytest.raises(FeddemError, match="sparsify: DARE's drop rate P"):
        RunConfig.from_record({"sparsify": "dare:1.2"})
    with pytest.raises(FeddemError, match="sparsify: 'topk' is not none, dare:P or topk:F"):
        check_simulation_inputs(RunConfig(sparsify="topk", aggregation="plain"))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dare_zeroes_exactly_the_right_count_and_rescales_the_rest(p):
    t = _dense((37, 11))
    out = dare(t, p, torch.Generator().manual_seed(1))
    dropped = out == 0
    assert int(dropped.sum()) == round(p * t.numel())
    assert torch.allclose(out[~dropped], t[~dropped] / (1 - p))
    assert out.shape == t.shape and out.dtype == t.dtype
    assert torch.equal(dare(t, 0.0, torch.Generator().manual_seed(1)), t)


def test_dare_keeps_the_expectation():
    """The mean over many masks is the original tensor (each entry kept with probability 1 - p, scaled 1/(1-p))."""
    t, p, draws = _dense((8, 8), seed=3), 0.75, 4000
    total = torch.zeros_like(t)
    for seed in range(draws):
        total += dare(t, p, torch.Generator().manual_seed(seed))
    mean = total / draws
    # per-entry std of the mean: |t| sqrt(p/(1-p)) / sqrt(draws) ~ 0.027 |t|; 6 sigma
    assert torch.all((mean - t).abs() <= 6 * t.abs() * (p / (1 - p)) ** 0.5 / draws ** 0.5)
    assert not torch.allclose(mean, torch.zeros_like(t))


def test_topk_keeps_exactly_the_largest_magnitudes():
    t = torch.tensor([[0.5, -3.0, 0.1], [2.0, -0.2, 1.0], [-0.05, 0.7, -4.0]])
    out = topk(t, 0.34)  # round(0.34 * 9) = 3 entries: -4, -3, 2
    assert torch.equal(out, torch.tensor([[0.0, -3.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, -4.0]]))
    assert torch.equal(topk(t, 1.0), t)
    assert int((topk(t, 0.01) != 0).sum()) == 1 and topk(t, 0.01)[2, 2] == -4.0  # at least one entry stays
    big = _dense((50, 40), seed=5)
    kept = topk(big, 0.2)
    mask = kept != 0
    assert int(mask.sum()) == 400 and torch.equal(kept[mask], big[mask])
    assert big[mask].abs().min() >= big[~mask].abs().max()


def test_sparsify_is_lazy_per_tensor_and_its_masks_are_the_sites_own():
    vector = {"a.weight": _dense((30, 20), 1), "b.bias": _dense((20,), 2)}
    assert sparsify(vector, "none") is vector
    once = sparsify(vector, "dare:0.5", b"site-secret|7")
    assert set(once) == set(vector) and once["a.weight"].shape == (30, 20)
    assert torch.equal(once["a.weight"], once["a.weight"])  # the same mask on every read (upload, alignment)
    again = sparsify(vector, "dare:0.5", b"site-secret|7")
    other = sparsify(vector, "dare:0.5", b"another-secret|7")
    assert torch.equal(again["a.weight"], once["a.weight"])
    assert not torch.equal((other["a.weight"] == 0), (once["a.weight"] == 0))  # another key, another mask
    assert not torch.equal((once["a.weight"] == 0).flatten()[:20], (once["b.bias"] == 0))  # per tensor
    lazy = sparsify(scaled(vector, 2.0), "topk:0.1")  # a lazy source (as extract_vector gives) works the same
    assert int((lazy["a.weight"] != 0).sum()) == 60 and int((lazy["b.bias"] != 0).sum()) == 2


@pytest.mark.parametrize("spec,lora", [("topk:0.2", False), ("dare:0.5", False), ("topk:0.2", True)])
def test_a_site_stores_its_sparsified_vector(tmp_path, tiny_base, spec, lora):
    """The stored vector (what plain and secure uploads send) is the sparsified one; with LoRA the dense update of
    each adapted layer is sparsified like any tensor."""
    cfg = RunConfig(train_examples=24, eval_examples=4, data="synthetic:arithmetic", steps=2, seq_len=32,
                    batch_size=4, device="cpu", sparsify=spec, lora=lora)
    site = SiteContext.from_node_config({"partition-id": 0, "work-dir": str(tmp_path / "site")})
    fine_tune(cfg, site, str(tiny_base), "", run_id=7)
    vector = load_vector(site.vector_path(7))
    kind, amount = parse_sparsify(spec)
    for name, t in vector.items():
        zeros = int((t == 0).sum())
        if kind == "topk":
            assert t.numel() - zeros == max(1, round(amount * t.numel())), name
        else:  # at least the dropped entries (a trained entry may itself be exactly 0: an untouched row)
            assert zeros >= round(amount * t.numel()), name
    if lora:
        assert all(name.endswith(".weight") and t.dim() == 2 for name, t in vector.items())


def test_plain_and_secure_runs_merge_the_same_sparsified_vectors(tmp_path, tiny_base):
    """Top-k is deterministic, so a plain and a secure run of the same sites merge the same sparsified vectors: their
    merged losses agree within secure aggregation's quantisation, and differ from a dense run's."""
    import json

    from feddem.server.workflow import run_dem
    from tests.fakegrid import RUN_ID, FakeGrid, task_identity

    def run(name, **kw):
        cfg = RunConfig(sites=3, model=str(tiny_base), steps=3, lr=1e-3, train_examples=32, eval_examples=8,
                        batch_size=4, seq_len=32, base_steps=30, device="cpu", timeout=5.0,
                        out_dir=str(tmp_path / name / "run"), min_peers=2, **kw)
        with task_identity():
            run_dem(FakeGrid(tmp_path / name / "sites", [9_000_000_011, 9_000_000_022, 9_000_000_033]), cfg, RUN_ID)
        report = json.loads((tmp_path / name / "run" / "report.json").read_text())
        return {d: v["loss"] for d, v in report["eval"]["merged"].items()}

    plain = run("plain", aggregation="plain", sparsify="topk:0.05")
    secure = run("secure", sparsify="topk:0.05")
    dense = run("dense", aggregation="plain")
    assert plain.keys() == secure.keys() == dense.keys() and len(plain) == 3
    assert all(abs(plain[d] - secure[d]) < 1e-3 for d in plain)
    assert any(abs(plain[d] - dense[d]) > 1e-3 for d in plain)
