"""A deployed site's node config: `data-path` (its own data), `device`, `domain`, `site-name`; clear errors when the
data is missing, and the synthetic domains only when a site asks for them."""

import json

import pytest

from feddem.common.site_context import SiteContext
from feddem.client.site import load_site_shard
from feddem.common.config import RunConfig
from feddem.common.errors import FeddemError


def _jsonl(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def _site(**node_config) -> SiteContext:
    return SiteContext.from_node_config(node_config)


CFG = RunConfig(train_examples=30, eval_examples=7, data="synthetic:code")


def test_site_folder_with_train_and_test(tmp_path):
    _jsonl(tmp_path / "clinic" / "train.jsonl", [f"train {i}" for i in range(12)])
    _jsonl(tmp_path / "clinic" / "test.jsonl", [f"test {i}" for i in range(3)])
    site = _site(**{"data-path": str(tmp_path / "clinic"), "site-name": "north", "device": "cpu"})
    assert (site.name, site.index, site.device) == ("north", 0, "cpu")
    assert site.resolve_device(RunConfig(device="auto")).type == "cpu"  # the site's device wins over the run's
    shard = load_site_shard(CFG, site)  # the run's data spec ("synthetic:code") is not what a deployed site reads
    assert shard.name == "clinic" and len(shard.train) == 12 and shard.heldout["text"] == ["test 0", "test 1", "test 2"]


def test_folder_with_one_file_a_file_and_domain_name(tmp_path):
    _jsonl(tmp_path / "own" / "notes.jsonl", [f"note {i}" for i in range(20)])
    shard = load_site_shard(CFG, _site(**{"data-path": str(tmp_path / "own")}))
    assert shard.name == "notes" and len(shard.train) + len(shard.heldout) == 20 and len(shard.heldout) == 2
    shard = load_site_shard(CFG, _site(**{"data-path": str(tmp_path / "own" / "notes.jsonl"), "domain": "legal"}))
    assert shard.name == "legal" and len(shard.train) == 18


def test_synthetic_only_when_asked(tmp_path):
    shard = load_site_shard(CFG, _site(**{"data-path": "synthetic:prose"}))
    assert shard.name == "prose" and (len(shard.train), len(shard.heldout)) == (30, 7)
    shard = load_site_shard(CFG, _site(**{"data-path": "synthetic:prose,records", "partition-id": 1}))
    assert shard.name == "records"


def test_missing_or_ambiguous_data_is_a_clear_error(tmp_path):
    with pytest.raises(FeddemError, match=r"site-gone: node config data-path: '.*gone' does not exist at this site"):
        load_site_shard(CFG, _site(**{"data-path": str(tmp_path / "gone"), "site-name": "site-gone"}))
    _jsonl(tmp_path / "two" / "a.jsonl", ["x", "y"])
    _jsonl(tmp_path / "two" / "b.jsonl", ["x", "y"])
    with pytest.raises(FeddemError, match=r"holds 2 entries \(a.jsonl, b.jsonl\)"):
        load_site_shard(CFG, _site(**{"data-path": str(tmp_path / "two")}))
    with pytest.raises(FeddemError, match="no 'data-path'.*no 'partition-id'"):
        _site(**{"site-name": "x"})
    with pytest.raises(FeddemError, match="unknown device 'tpu'"):
        _site(**{"data-path": "synthetic:prose", "device": "tpu"}).resolve_device(CFG)


def test_simulated_sites_unchanged():
    site = _site(**{"partition-id": 0, "num-partitions": 1})
    assert (site.name, site.data_path, site.device) == ("site-0", None, None)
    assert load_site_shard(CFG, site).name == "code"  # the shard of the run's data spec
