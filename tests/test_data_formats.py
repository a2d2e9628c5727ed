"""Site data in the formats SFTTrainer takes: every file kind and column format on small files written here, the
held-out cap and warning, clear errors on bad input, and the chat rendering whose labels count assistant tokens
only (checked token by token)."""

import json

import datasets
import pytest
import torch

from feddem.common.chat_format import PLAIN_CHAT_TEMPLATE, encode_conversation, split_for_generation
from feddem.common.data import (
    MIN_HELDOUT, SyntheticSizes, encode_examples, encode_train, list_shards, load_shard, load_site_data,
)
from feddem.common.errors import FeddemError
from feddem.common.tokenizer import build_byte_tokenizer

SIZES = SyntheticSizes(eval_examples=200, seed=0)


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _one(path, sizes=SIZES):
    """The shard of a folder holding just `path`."""
    return load_shard(str(path.parent), 0, sizes)


CHAT = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(20)]


@pytest.mark.parametrize("rows, expected", [
    ([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)], ("p3", "c3")),
    ([{"prompt": f"p{i}", "response": f"r{i}"} for i in range(20)], ("p3", "r3")),
    ([{"instruction": f"i{i}", "input": "", "output": f"o{i}"} for i in range(20)], ("i3", "o3")),
    ([{"instruction": f"i{i}", "input": f"x{i}", "output": f"o{i}"} for i in range(20)], ("i3\n\nx3", "o3")),
    (CHAT, ("q3", "a3")),
])
def test_instruction_formats_become_conversations(tmp_path, rows, expected):
    shard = _one(_jsonl(tmp_path / "site.jsonl", rows))
    assert shard.kind == "chat" and len(shard.train) + len(shard.heldout) == 20 and len(shard.heldout) == 2
    every = {tuple(m["content"] for m in conv): conv for conv in list(shard.train["messages"]) + list(shard.heldout["messages"])}
    assert [m["role"] for m in every[expected]] == ["user", "assistant"]


def test_text_column_option_and_file_kinds(tmp_path):
    rows = [{"body": f"line {i}", "id": i} for i in range(20)]
    path = _jsonl(tmp_path / "a" / "notes.jsonl", rows)
    with pytest.raises(FeddemError, match="no known columns"):
        _one(path)
    shard = _one(path, SyntheticSizes(seed=0, text_column="body"))
    assert shard.kind == "text" and sorted(list(shard.train["text"]) + list(shard.heldout["text"])) == sorted(r["body"] for r in rows)

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "pairs.json").write_text(json.dumps([{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(10)]))
    assert _one(tmp_path / "b" / "pairs.json").kind == "chat"

    (tmp_path / "c").mkdir()
    datasets.Dataset.from_dict({"text": [f"t{i}" for i in range(10)]}).to_parquet(str(tmp_path / "c" / "t.parquet"))
    assert len(_one(tmp_path / "c" / "t.parquet").train) == 9

    (tmp_path / "d").mkdir()  # CSV cells stay strings: a numeric answer is text, not an int
    (tmp_path / "d" / "qa.csv").write_text("prompt,completion\n" + "".join(f"what is {i}+{i}?,{2 * i}\n" for i in range(10)))
    shard = _one(tmp_path / "d" / "qa.csv")
    answers = {conv[1]["content"] for conv in list(shard.train["messages"]) + list(shard.heldout["messages"])}
    assert answers == {str(2 * i) for i in range(10)}

    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "lines.txt").write_text("one\ntwo\n\nthree\n")
    assert load_site_data(str(tmp_path / "e" / "lines.txt"), 0, SIZES).kind == "text"


def test_saved_datasets_and_split_folders(tmp_path):
    datasets.Dataset.from_list(CHAT).save_to_disk(str(tmp_path / "sites" / "chat"))
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"prompt": ["a", "b", "c"], "completion": ["1", "2", "3"]}),
        "test": datasets.Dataset.from_dict({"prompt": ["d"], "completion": ["4"]}),
    }).save_to_disk(str(tmp_path / "sites" / "pairs"))
    _jsonl(tmp_path / "sites" / "split" / "train.jsonl", CHAT[:5])
    _jsonl(tmp_path / "sites" / "split" / "validation.jsonl", CHAT[5:7])
    assert list_shards(str(tmp_path / "sites")) == ["chat", "pairs", "split"]
    chat = load_shard(str(tmp_path / "sites"), 0, SIZES)
    assert chat.kind == "chat" and (len(chat.train), len(chat.heldout)) == (18, 2)
    pairs = load_shard(str(tmp_path / "sites"), 1, SIZES)
    assert (len(pairs.train), list(pairs.heldout["messages"])) == (3, [[{"role": "user", "content": "d"},
                                                                   {"role": "assistant", "content": "4"}]])
    split = load_shard(str(tmp_path / "sites"), 2, SIZES)
    assert (len(split.train), len(split.heldout)) == (5, 2)
    # a deployed site's data-path may name the saved folder itself
    assert len(load_site_data(str(tmp_path / "sites" / "pairs"), 0, SIZES).train) == 3


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert list_shards("hf:no-such-org/no-such-set:cfg@train") == ["no-such-set"]
    with pytest.raises(FeddemError, match="could not load hub dataset 'hf:no-such-org/no-such-set@train'.*no network"):
        load_shard("hf:no-such-org/no-such-set@train", 0, SIZES)


def test_heldout_cap_and_small_heldout_warning(tmp_path):
    _jsonl(tmp_path / "big" / "train.jsonl", CHAT)
    _jsonl(tmp_path / "big" / "test.jsonl", CHAT * 3)  # 60 held-out rows
    capped = load_shard(str(tmp_path), 0, SyntheticSizes(eval_examples=10, seed=0))
    assert len(capped.heldout) == 10 and len(capped.train) == 20
    assert any(f"has 5 example(s), under {MIN_HELDOUT}" in w for w in capped.warnings)
    roomy = load_shard(str(tmp_path), 0, SyntheticSizes(eval_examples=100, seed=0))
    assert len(roomy.heldout) == 60 and roomy.warnings == []


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p"}, r"row 2: no known columns \(found: prompt\); accepted formats: 'text'"),
    ({"messages": []}, r"row 2: 'messages' must be a non-empty list.*an empty list"),
    ({"messages": "hello"}, r"row 2: 'messages' must be a non-empty list of \{role, content\}, got str"),
    ({"messages": [{"role": "user"}]}, r"row 2: messages\[0\] must be an object with 'role' and 'content'"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"row 2: messages\[0\] has unknown role 'robot' \(accepted: system, user, assistant\)"),
    ({"messages": [{"role": "user", "content": "x"}]}, r"row 2: 'messages' has no assistant turn"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, r"row 2: field 'messages\[0\].content' must be a string, got int"),
    ({"prompt": "p", "completion": 7}, r"row 2: field 'completion' must be a string, got int"),
])
def test_bad_instruction_rows_are_named(tmp_path, row, message):
    first = {"messages": CHAT[0]["messages"]} if "messages" in row else {"prompt": "p0", "completion": "c0"}
    path = tmp_path / "bad.json"  # a json list keeps each row's own structure
    path.write_text(json.dumps([first, row]))
    with pytest.raises(FeddemError, match=r"data file '.*bad.json', " + message):
        load_shard(str(tmp_path), 0, SIZES)


def test_non_string_text_and_mixed_formats_are_named(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"text": "fine"}, {"text": 12}]))
    with pytest.raises(FeddemError, match=r"bad.json', row 2: field 'text' must be a string, got int"):
        load_shard(str(tmp_path), 0, SIZES)
    _jsonl(path.with_suffix(".jsonl"), [{"text": "plain"}, {"prompt": "p", "completion": "c"}, {"text": "more"}])
    path.unlink()
    with pytest.raises(FeddemError, match=r"bad.jsonl' mixes formats in one shard: prompt/completion \(first at row 2\), "
                                          r"text \(first at row 1\)"):
        load_shard(str(tmp_path), 0, SIZES)
    (tmp_path / "bad.jsonl").unlink()
    _jsonl(tmp_path / "site" / "train.jsonl", CHAT[:4])
    _jsonl(tmp_path / "site" / "test.jsonl", [{"text": "plain"}])
    with pytest.raises(FeddemError, match=r"site' mixes formats: its train split is chat data, its held-out split text"):
        load_shard(str(tmp_path), 0, SIZES)


def _tokens(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_assistant_only_labels_token_by_token():
    tok = build_byte_tokenizer()
    assert tok.chat_template == PLAIN_CHAT_TEMPLATE
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "ok"}]
    enc = encode_conversation(tok, conv, seq_len=512)
    eos = tok.eos_token
    pieces = [("<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n", False), (f"yo{eos}\n", True),
              ("<|user|>\nand?\n<|assistant|>\n", False), (f"ok{eos}\n", True)]
    want_ids, want_labels = [], []
    for text, scored in pieces:
        ids = _tokens(tok, text)
        want_ids += ids
        want_labels += ids if scored else [-100] * len(ids)
    assert enc.input_ids == want_ids and enc.labels == want_labels and not enc.truncated
    assert tok.decode([t for t, l in zip(enc.input_ids, enc.labels) if l != -100]) == f"yo{eos}\nok{eos}\n"

    cut = encode_conversation(tok, conv, seq_len=20)
    assert cut.truncated and cut.input_ids == want_ids[:20] and cut.labels == want_labels[:20]
    assert split_for_generation(conv) == (conv[:4], "ok")


def test_model_chat_template_is_used_with_its_own_system_turn():
    """A ChatML template that adds a default system turn (as SmolLM2's does): only the answer and its end marker
    are scored."""
    tok = build_byte_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
                         "{{ '<|im_start|>system\nYou help.<|im_end|>\n' }}{% endif %}"
                         "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    enc = encode_conversation(tok, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], 512)
    prompt = "<|im_start|>system\nYou help.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    n = len(_tokens(tok, prompt))
    assert enc.input_ids == _tokens(tok, prompt + "4<|im_end|>\n")
    assert enc.labels[:n] == [-100] * n and enc.labels[n:] == enc.input_ids[n:]
    assert tok.decode(enc.input_ids[n:]) == "4<|im_end|>\n"


def test_encoded_batches_pad_and_count_truncation(tmp_path):
    tok = build_byte_tokenizer()
    rows = CHAT[:9] + [{"messages": [{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "y"}]}]
    _jsonl(tmp_path / "train.jsonl", rows)
    _jsonl(tmp_path / "test.jsonl", CHAT[:2])
    shard = load_site_data(str(tmp_path), 0, SIZES)
    batch = encode_examples(shard, "train", tok, seq_len=48)
    assert batch.truncated == 1 and batch.input_ids.shape == (10, 48)
    lengths = batch.attention_mask.sum(dim=1)
    assert (batch.labels[batch.attention_mask == 0] == -100).all()
    assert int(lengths.max()) == 48 and int(lengths.min()) < 48
    # a few training steps draw 2 x 3 sequences: only 6 of the 10 rows are tokenised, in file order
    few = encode_train(shard, tok, seq_len=48, needed_sequences=6, seed=0)
    assert len(few) == 6
    # plain text: packing into full blocks, only as much as the steps use (one block spare)
    text = load_site_data(str(_jsonl(tmp_path / "t" / "t.jsonl", [{"text": "z" * 30} for _ in range(200)])), 0, SIZES)
    blocks = encode_train(text, tok, seq_len=16, needed_sequences=4, seed=0)
    assert 4 <= len(blocks) <= 7 and bool((blocks.labels == blocks.input_ids).all())
    whole = encode_train(text, tok, seq_len=16, needed_sequences=10_000, seed=0)
    assert len(whole) == (len(text.train) * 31) // 16
    assert torch.equal(whole.input_ids, whole.labels)
