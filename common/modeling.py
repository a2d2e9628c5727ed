"""Loading the base causal LM: the embedded tiny Llama built from a config, a local HF folder, a hub name, a GGUF
file or a preset (the last two converted once into a local folder: `common.model_sources`).

Also the model checksum that sites compare with the run config before they train.
"""

import hashlib
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel

from feddem.common.chat_format import PLAIN_CHAT_TEMPLATE
from feddem.common.errors import FeddemError
from feddem.common.model_sources import resolve_model_ref
from feddem.common.hf_weights import open_tensors, save_sharded
from feddem.common.vectors import LazyVector, Vector, merged_tensors, specs_of
from feddem.common.tokenizer import build_byte_tokenizer

# The embedded default: a ~1M-parameter Llama-style model over the byte tokenizer (259 tokens).
TINY_LLAMA = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def tiny_llama_config(**overrides) -> LlamaConfig:
    """The config of the embedded default model (overrides change any field, e.g. for smaller test models)."""
    tok = build_byte_tokenizer()
    fields = dict(TINY_LLAMA, **overrides)
    return LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **fields,
    )


def build_model(config: LlamaConfig, seed: int) -> PreTrainedModel:
    """A randomly initialised causal LM from a config, deterministic in the seed."""
    torch.manual_seed(seed)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config)


def _is_local(ref: str) -> bool:
    return Path(ref).expanduser().exists() or ref.startswith((".", "/", "~"))


def _load(loader, ref: str, **kwargs):
    """Call a `from_pretrained` on a local folder, hub name, GGUF file or preset; a missing model becomes a clear
    FeddemError."""
    ref = resolve_model_ref(ref)
    if _is_local(ref):
        path = Path(ref).expanduser()
        if not (path / "config.json").is_file():
            raise FeddemError(f"model folder '{ref}' does not exist or has no config.json (not a Hugging Face model)")
        ref = str(path)
    try:
        return loader(ref, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        from feddem.common.model_sources import PRESETS

        raise FeddemError(
            f"could not load model '{ref}': not a local model folder, GGUF file or preset ({', '.join(PRESETS)}), "
            f"and not loadable from the hub (no network here, or no such model): {first}"
        ) from None


def check_model_ref(ref: str) -> None:
    """Fail early, without loading weights, when `ref` names no loadable model."""
    _load(AutoConfig.from_pretrained, ref)


def load_model(ref: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a causal LM from a local HF folder or a hub name, with a clear error when it cannot be found."""
    return _load(AutoModelForCausalLM.from_pretrained, ref, dtype=dtype, attn_implementation="sdpa")


def load_tokenizer(ref: str):
    """The tokenizer saved with a model (local folder, hub name, GGUF file or preset). One without a chat template
    gets the plain one chat data is rendered with (`common.chat_format`), one without a pad token pads with EOS."""
    resolved = resolve_model_ref(ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(Path(resolved).expanduser()) if _is_local(resolved) else resolved)
    except (OSError, ValueError) as exc:
        raise FeddemError(f"could not load the tokenizer of model '{ref}': {exc}") from None
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_checksum(model: torch.nn.Module) -> str:
    """SHA-256 over the model's parameters (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_folder(ref: str) -> Path | None:
    """The local folder holding a model's files: the folder itself, or the hub cache's snapshot of a hub name that
    was loaded before (no download); None when there is none."""
    ref = resolve_model_ref(ref)
    if _is_local(ref):
        return Path(ref).expanduser()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True))
    except Exception:  # not in the cache: the caller falls back to a loaded model
        return None


def model_tensors(model: torch.nn.Module) -> LazyVector:
    """A loaded model's state (what `save_pretrained` writes: a tied weight once, under its first name)."""
    state, seen, specs = model.state_dict(), set(), {}
    for name, t in state.items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        specs[name] = (t.dtype, tuple(t.shape))
    return LazyVector(specs, lambda name: state[name].detach().cpu())


def base_tensors(ref: str, names=()) -> LazyVector:
    """The base model's weights, lazily and in their stored dtype: straight from its safetensors files when they hold
    every name in `names` (one tensor in memory at a time), else from the loaded model."""
    folder = model_folder(ref)
    stored = open_tensors(folder) if folder is not None else None
    if stored is not None and all(name in stored for name in names):
        return stored
    return model_tensors(load_model(ref))


def export_merged(ref: str, vector: Vector, out_dir: str | Path, max_shard_size: int) -> list[str]:
    """Write base + vector as a Hugging Face model folder (config and weights; the caller adds the tokenizer),
    streaming: one base tensor and one vector tensor at a time, into shards of at most `max_shard_size` bytes with
    a `model.safetensors.index.json` when there are several. Weights keep the base's stored dtype (a bf16 base
    gives a bf16 model; the sum is formed in float32). Returns the weight files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = base_tensors(ref, list(vector))
    files = save_sharded(out_dir, specs_of(base), merged_tensors(base, vector), max_shard_size)
    _load(AutoConfig.from_pretrained, ref).save_pretrained(out_dir)
    folder = model_folder(ref)
    if folder is not None and (folder / "generation_config.json").is_file():
        shutil.copyfile(folder / "generation_config.json", out_dir / "generation_config.json")
    return files
