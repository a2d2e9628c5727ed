"""A site fine-tunes the base in place (no copy of the base kept in memory) and stores its vector relative to the
weights it started from, read back from the base's files: base (+ the previous round's merge) + vector is exactly
the model it trained, whose held-out loss it reports."""

import pytest
import torch

from feddem.common.data import heldout_blocks
from feddem.client.site import fine_tune, load_site_shard, load_verified_base
from feddem.common.site_context import SiteContext
from feddem.common.config import RunConfig
from feddem.common.evaluation import evaluate_loss
from feddem.common.modeling import load_tokenizer, model_checksum
from feddem.common.vector_io import load_vector
from feddem.common.vectors import apply_vector, parameters_of

CFG = RunConfig(train_examples=40, eval_examples=8, data="synthetic:arithmetic", steps=3, seq_len=64, batch_size=4)


@pytest.mark.parametrize("with_start", [False, True])
def test_stored_vector_on_its_starting_point_is_the_trained_model(tmp_path, tiny_base, with_start):
    ref = str(tiny_base)
    base = load_verified_base(ref, "")
    checksum = model_checksum(base)
    start = None
    if with_start:  # a previous round's merge: a small nonzero vector on every parameter
        gen = torch.Generator().manual_seed(0)
        start = {n: 1e-3 * torch.randn(p.shape, generator=gen) for n, p in parameters_of(base).items()}
    site = SiteContext.from_node_config({"partition-id": 0, "work-dir": str(tmp_path / "site")})
    result = fine_tune(CFG, site, ref, checksum, run_id=7, start_from=start)

    vector = load_vector(site.vector_path(7))
    assert sum(float(t.abs().sum()) for t in vector.values()) > 0  # it trained
    rebuilt = load_verified_base(ref, checksum)  # the base on disk is unchanged by the site's training
    if start is not None:
        apply_vector(rebuilt, start)
    apply_vector(rebuilt, vector)
    tokenizer = load_tokenizer(ref)
    heldout = heldout_blocks(load_site_shard(CFG, site), tokenizer, CFG)
    loss = evaluate_loss(rebuilt, heldout, tokenizer.pad_token_id, torch.device("cpu"))["loss"]
    assert loss == pytest.approx(result["local_loss"], abs=1e-5)
    assert result["local_loss"] != pytest.approx(result["base_loss"], abs=1e-6)
