"""A site on instruction data: its result carries the data format, the truncation count, the held-out warnings and
the generation metric of the base and local models; the merged model's evaluation carries `gen_exact_match`,
`gen_rouge_l` and `samples` (the keys the server's report reads). The held-out loss counts answer tokens only."""

import json

import torch

from feddem.common.data import heldout_blocks
from feddem.client.site import evaluate_merged, fine_tune, load_site_shard
from feddem.common.site_context import SiteContext
from feddem.common.config import RunConfig
from feddem.common.evaluation import evaluate_loss
from feddem.common.modeling import load_model, load_tokenizer, model_checksum
from feddem.common.vector_io import load_vector


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_chat_site_reports_truncation_warnings_and_generation(tmp_path, tiny_base):
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(10) for b in range(6)]
    test = [{"prompt": f"{a}+{a}=", "completion": str(2 * a)} for a in range(5)] + [{"prompt": "9" * 80,
                                                                                     "completion": "1"}]
    _write(tmp_path / "data" / "sums" / "train.jsonl", rows)
    _write(tmp_path / "data" / "sums" / "test.jsonl", test)  # its second half is the test split: 3, 4 and the long one
    cfg = RunConfig(data=str(tmp_path / "data"), steps=2, batch_size=4, seq_len=48, eval_examples=6, gen_examples=2)
    site = SiteContext.from_node_config({"partition-id": 0, "work-dir": str(tmp_path / "site")})
    ref = str(tiny_base)
    checksum = model_checksum(load_model(ref))

    result = fine_tune(cfg, site, ref, checksum, run_id=1)
    assert result["data_format"] == "chat" and result["heldout_examples"] == 3
    assert result["truncated_examples"] == 1  # the 80-digit prompt, cut to 48 tokens, counted
    assert "held-out test split has 3 example(s), under 20" in result["warnings"]
    assert "1 example(s) longer than seq-len 48 were truncated" in result["warnings"]
    for prefix in ("base_", "local_"):
        assert 0.0 <= result[f"{prefix}gen_exact_match"] <= 1.0 and 0.0 <= result[f"{prefix}gen_rouge_l"] <= 1.0
        samples = json.loads(result[f"{prefix}samples"])
        assert len(samples) == 2 and set(samples[0]) == {"prompt", "reference", "answer"}

    # the held-out loss is over answer tokens only (answer digits + the end-of-turn text, no prompt token); the
    # long example's answer was cut off, so it scores nothing
    shard = load_site_shard(cfg, site)
    tokenizer = load_tokenizer(ref)
    heldout = heldout_blocks(shard, tokenizer, cfg)
    scored = int((heldout.labels[:, 1:] != -100).sum())
    ends = len(tokenizer(tokenizer.eos_token + "\n", add_special_tokens=False)["input_ids"])
    answers = ["6", "8"]
    assert scored == sum(len(a) + ends for a in answers)
    assert evaluate_loss(load_model(ref), heldout, None, torch.device("cpu"))["tokens"] == scored

    merged = evaluate_merged(cfg, site, ref, checksum, load_vector(site.vector_path(1)))
    assert isinstance(merged["gen_exact_match"], float) and isinstance(merged["gen_rouge_l"], float)
    assert [s["reference"] for s in json.loads(merged["samples"])] == answers[:2]
    assert "gen_exact_match" not in evaluate_merged(cfg, site, ref, checksum, load_vector(site.vector_path(1)),
                                                    split="validation")


def test_text_site_has_no_generation_and_no_warning(tmp_path, tiny_base):
    _write(tmp_path / "data" / "notes.jsonl", [{"text": f"note number {i} about the weather"} for i in range(400)])
    cfg = RunConfig(data=str(tmp_path / "data"), steps=2, batch_size=4, seq_len=32, eval_examples=40)
    site = SiteContext.from_node_config({"partition-id": 0, "work-dir": str(tmp_path / "site")})
    result = fine_tune(cfg, site, str(tiny_base), "", run_id=1)
    assert result["data_format"] == "text" and result["truncated_examples"] == 0 and result["warnings"] == ""
    assert "base_gen_exact_match" not in result
    # 2 steps x 4 sequences x 32 tokens: the shard (360 train texts) is tokenised only that far, plus one block
    assert 8 * 32 <= result["tokens"] <= 10 * 32
