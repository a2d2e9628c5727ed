"""Site data: deterministic synthetic domains with disjoint splits, folder specs, packing, and clear errors."""

import json

import pytest

from feddem.common.data import SyntheticSizes, list_shards, load_shard, pack_blocks
from feddem.common.errors import FeddemError
from feddem.common.synthetic import DOMAINS, make_domain
from feddem.common.tokenizer import build_byte_tokenizer


def test_at_least_four_distinct_domains():
    assert len(DOMAINS) >= 4
    samples = {name: make_domain(name, 50, 0, seed=0)[0] for name in DOMAINS}
    for a in DOMAINS:
        for b in DOMAINS:
            if a != b:
                assert not set(samples[a]) & set(samples[b])
    # clearly different distributions: their byte alphabets differ
    alphabets = {name: set("".join(s)) for name, s in samples.items()}
    assert alphabets["arithmetic"] <= set("0123456789+-*=")
    assert "{" in alphabets["records"] and "." in alphabets["prose"] and ";" in alphabets["code"]


@pytest.mark.parametrize("name", list(DOMAINS))
def test_generation_is_deterministic_and_splits_do_not_overlap(name):
    train, heldout = make_domain(name, 300, 60, seed=7)
    assert (train, heldout) == make_domain(name, 300, 60, seed=7)
    assert make_domain(name, 300, 60, seed=8) != (train, heldout)
    assert len(train) == 300 and len(heldout) == 60
    assert not set(train) & set(heldout)
    assert len(set(train)) == 300


def test_synthetic_shard_per_site_and_domain_selection():
    assert list_shards("synthetic") == list(DOMAINS)
    assert list_shards("synthetic:code,prose") == ["code", "prose"]
    shard = load_shard("synthetic:code,prose", 1, SyntheticSizes(20, 5, 0))
    assert shard.name == "prose" and len(shard.train) == 20 and len(shard.heldout) == 5
    with pytest.raises(FeddemError, match="unknown synthetic domain"):
        list_shards("synthetic:code,poetry")
    with pytest.raises(FeddemError, match="site 2 has no data"):
        load_shard("synthetic:code,prose", 2, SyntheticSizes())


def test_folder_of_per_site_files(tmp_path):
    (tmp_path / "alpha.jsonl").write_text("\n".join(json.dumps({"text": f"alpha line {i}"}) for i in range(30)))
    (tmp_path / "beta.txt").write_text("\n".join(f"beta {i}" for i in range(20)) + "\n\n")
    site = tmp_path / "gamma"
    site.mkdir()
    (site / "train.txt").write_text("g1\ng2\ng3\n")
    (site / "test.txt").write_text("g4\n")
    (tmp_path / "notes.md").write_text("ignored")
    assert list_shards(str(tmp_path)) == ["alpha", "beta", "gamma"]
    alpha = load_shard(str(tmp_path), 0, SyntheticSizes(seed=1))
    assert len(alpha.train) == 27 and len(alpha.heldout) == 3
    assert not set(alpha.train["text"]) & set(alpha.heldout["text"])
    beta = load_shard(str(tmp_path), 1, SyntheticSizes())
    assert len(beta.train) + len(beta.heldout) == 20  # the empty lines are dropped
    gamma = load_shard(str(tmp_path), 2, SyntheticSizes())
    assert gamma.train["text"] == ["g1", "g2", "g3"] and gamma.heldout["text"] == ["g4"]


def test_bad_data_is_named(tmp_path):
    with pytest.raises(FeddemError, match="does not exist"):
        list_shards(str(tmp_path / "missing"))
    with pytest.raises(FeddemError, match="holds no site data"):
        list_shards(str(tmp_path))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(FeddemError, match="is empty"):
        load_shard(str(tmp_path), 0, SyntheticSizes())
    (tmp_path / "empty.jsonl").unlink()
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    with pytest.raises(FeddemError, match="no non-empty examples"):
        load_shard(str(tmp_path), 0, SyntheticSizes())
    (tmp_path / "blank.txt").unlink()
    (tmp_path / "cols.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(FeddemError, match=r"cols.jsonl', row 1: no known columns \(found: body\); accepted formats"):
        load_shard(str(tmp_path), 0, SyntheticSizes())
    (tmp_path / "cols.jsonl").unlink()
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "train.txt").write_text("a\n")
    with pytest.raises(FeddemError, match="needs a train file and a held-out file"):
        load_shard(str(tmp_path), 0, SyntheticSizes())


def test_pack_blocks_joins_examples_with_eos():
    tok = build_byte_tokenizer()
    blocks = pack_blocks(["ab", "cd"], tok, seq_len=3)
    assert blocks.tolist() == [[97, 98, tok.eos_token_id], [99, 100, tok.eos_token_id]]
    padded = pack_blocks(["abcd"], tok, seq_len=4, pad_last=True)
    assert padded.tolist() == [[97, 98, 99, 100], [tok.eos_token_id] + [tok.pad_token_id] * 3]
    with pytest.raises(FeddemError, match="fewer than one block"):
        pack_blocks(["a"], tok, seq_len=16)


def test_heldout_split_policy_lives_in_common_data():
    """The held-out part splits in two halves, validation first, test second; one example serves as both; the
    server reaches this policy without importing the client."""
    import datasets

    from feddem.common.data import Shard, heldout_indices, heldout_texts

    shard = Shard("d", datasets.Dataset.from_dict({"text": ["t"]}),
                  datasets.Dataset.from_dict({"text": [f"h{i}" for i in range(5)]}))
    assert heldout_indices(shard, "validation") == [0, 1]
    assert heldout_indices(shard, "test") == [2, 3, 4]
    assert heldout_texts(shard, "test") == ["h2", "h3", "h4"]
    shard.heldout = shard.heldout.select([0])
    assert heldout_indices(shard, "validation") == heldout_indices(shard, "test") == [0]
    with pytest.raises(FeddemError, match="unknown evaluation split 'train'"):
        heldout_indices(shard, "train")


def test_server_modules_do_not_import_the_client_for_data():
    """`server.ablation` scores pools on the held-out test halves through `common.data` alone."""
    import ast
    from pathlib import Path

    import feddem.server.ablation as ablation

    tree = ast.parse(Path(ablation.__file__).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert imported and not [m for m in imported if m.startswith("feddem.client")]
