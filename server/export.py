"""Exporting a merge as an ordinary model of its base's kind: base + vector as Hugging Face weights
(`common.modeling.export_merged`, streaming), the base's config (tied embeddings stay tied: the config keeps
`tie_word_embeddings` and a tied weight is stored once, as the base stores it), its tokenizer with its chat template,
its generation config, and one permission policy for every file (that of the `config.json` that `save_pretrained`
writes: readable by the owner's group under the usual umask). The model card is `server.model_card`.
"""

import logging
from pathlib import Path

from feddem.common.errors import FeddemError
from feddem.common.model_sources import resolve_model_ref
from feddem.common.modeling import export_merged, load_tokenizer

log = logging.getLogger("feddem.server")

GENERATION_CONFIG = "generation_config.json"


def _copy_generation_config(ref: str, model_dir: Path) -> None:
    """The base's generation config, when `export_merged` found none in a local folder (a hub name)."""
    if (model_dir / GENERATION_CONFIG).is_file():
        return
    from transformers import GenerationConfig

    try:
        GenerationConfig.from_pretrained(ref).save_pretrained(model_dir)
    except (OSError, ValueError):  # the base has none: transformers derives one from the config when loading
        pass


def same_permissions(model_dir: Path) -> None:
    """Give every file in the folder the mode of its config.json (written with the process's umask, as
    `save_pretrained` writes every file), so the weights are not the one file its owner's group cannot read."""
    mode = (model_dir / "config.json").stat().st_mode & 0o777
    for path in model_dir.rglob("*"):
        if path.is_file():
            path.chmod(mode)


def check_tied(ref: str, model_dir: Path) -> None:
    """The export's config ties the embeddings exactly when the base's does."""
    from transformers import AutoConfig

    base = getattr(AutoConfig.from_pretrained(ref), "tie_word_embeddings", None)
    merged = getattr(AutoConfig.from_pretrained(model_dir), "tie_word_embeddings", None)
    if base != merged:
        raise FeddemError(f"export to '{model_dir}': tie_word_embeddings is {merged}, the base's is {base}")


def tied_names(ref: str) -> tuple[str, str] | None:
    """(output, input) embedding weight names when the base's config ties them, else None (the model is built on
    the meta device: no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(ref)
    if not getattr(config, "tie_word_embeddings", False):
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {id(module): name for name, module in model.named_modules()}
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None:
        return None
    return f"{names[id(out)]}.weight", f"{names[id(inp)]}.weight"


def with_tied_copy(ref: str, vector):
    """A base that ties its embeddings but stores both weights (some checkpoints do) would give an export whose
    stored output embedding is the base's, unchanged, beside the merged input embedding: transformers then refuses
    to tie them. The output weight gets the input's delta too, so both are stored equal and load tied."""
    from feddem.common.modeling import base_tensors

    names = tied_names(ref)
    if names is None or names[0] in vector or names[1] not in vector:
        return vector
    stored = base_tensors(ref, [])
    if names[0] not in stored:  # stored once, as save_pretrained does: nothing to do
        return vector
    return {**vector, names[0]: vector[names[1]]}


def export_model(ref: str, vector, model_dir: str | Path, max_shard_bytes: int) -> Path:
    """Write base + vector to `model_dir` as a Hugging Face model folder with the base's tokenizer (and chat
    template) and generation config, every file under one permission policy. Returns the folder."""
    model_dir = Path(model_dir)
    ref = resolve_model_ref(ref)  # a preset or GGUF file: its converted folder, as the sites load it
    export_merged(ref, with_tied_copy(ref, vector), model_dir, max_shard_bytes)
    load_tokenizer(ref).save_pretrained(model_dir)
    _copy_generation_config(ref, model_dir)
    check_tied(ref, model_dir)
    same_permissions(model_dir)
    return model_dir
