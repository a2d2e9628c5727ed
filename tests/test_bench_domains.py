"""bench/real_domains.py: site data built from text on this machine (standard-library docstrings, Unicode names,
the Python language reference, installed packages' licences) is deterministic for a seed, holds what was asked, and
loads through `common.data` as the format it claims (instruction/chat or text), held-out part and all."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import real_domains  # noqa: E402

from feddem.common.chat_format import CHAT, TEXT  # noqa: E402
from feddem.common.data import SyntheticSizes, list_shards, load_shard  # noqa: E402

KINDS = {"stdlib_docs": CHAT, "unicode_names": CHAT, "python_reference": TEXT, "licenses": TEXT}


def _read(folder: Path) -> dict[str, list[str]]:
    return {split: (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() for split in ("train", "test")}


def test_every_domain_is_written_deterministically_and_loads_as_its_format(tmp_path):
    spec = real_domains.build_domains(tmp_path / "a", train=60, heldout=40, seed=3)
    again = real_domains.build_domains(tmp_path / "b", train=60, heldout=40, seed=3)
    other = real_domains.build_domains(tmp_path / "c", train=60, heldout=40, seed=4)
    assert list_shards(str(spec)) == sorted(KINDS)
    sizes = SyntheticSizes(eval_examples=400, seed=0)
    for index, name in enumerate(list_shards(str(spec))):
        files = _read(spec / name)
        assert files == _read(again / name)  # same seed, same bytes
        assert files != _read(other / name)  # another seed draws another sample
        assert len(files["train"]) == 60 and len(files["test"]) == 40
        assert not set(files["train"]) & set(files["test"])  # no example both trained on and held out
        shard = load_shard(str(spec), index, sizes)
        assert shard.name == name and shard.kind == KINDS[name]
        assert len(shard.train) == 60 and len(shard.heldout) == 40 and not shard.warnings  # 20 test examples
        rows = [json.loads(line) for line in files["train"]]
        if shard.kind == CHAT:
            conversation = shard.train[0]["messages"]
            assert conversation[-1]["role"] == "assistant" and conversation[-1]["content"].strip()
        else:
            assert all(real_domains.MIN_PARAGRAPH <= len(r["text"]) <= real_domains.MAX_PARAGRAPH for r in rows)


def test_a_rebuild_with_fewer_domains_leaves_no_stale_site(tmp_path):
    real_domains.build_domains(tmp_path, train=5, heldout=4)
    spec = real_domains.build_domains(tmp_path, ["unicode_names", "stdlib_docs"], train=5, heldout=4)
    assert list_shards(str(spec)) == ["stdlib_docs", "unicode_names"]


def test_instruction_answers_are_the_real_sources():
    import textwrap
    import unicodedata

    docs = {r["prompt"]: r["completion"] for r in real_domains.stdlib_docs()}
    assert docs["In Python, what does the function `textwrap.dedent` do?"] == \
        real_domains.first_sentence(textwrap.dedent.__doc__)
    assert docs["In Python, what does the function `textwrap.dedent` do?"].startswith("Remove any common leading")
    names = {r["messages"][1]["content"]: r["messages"][2]["content"] for r in real_domains.unicode_names()}
    assert names["What is the Unicode name of U+00E9 (\u00e9)?"] == unicodedata.name("\u00e9") == \
        "LATIN SMALL LETTER E WITH ACUTE"
    assert len(docs) >= 200 and len(names) >= 200


def test_first_sentence_skips_signatures_and_refuses_unusable_docstrings():
    assert real_domains.first_sentence("sum(iterable, /, start=0)\n\nReturn the sum. More text.") == "Return the sum."
    assert real_domains.first_sentence("Split the path into a pair.\nSecond line.") == "Split the path into a pair."
    assert real_domains.first_sentence(None) is None
    assert real_domains.first_sentence("Short.") is None


def test_a_domain_too_small_for_its_heldout_part_is_refused():
    with pytest.raises(ValueError, match="fewer than"):
        real_domains.domain_rows("stdlib_docs", train=10, heldout=100_000, seed=0)
    with pytest.raises(ValueError, match="unknown domain"):
        real_domains.domain_rows("nope", train=10, heldout=10, seed=0)
