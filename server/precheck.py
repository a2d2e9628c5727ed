"""The first checks of a `feddem simulate` run: those that need no heavy import (no torch, datasets, transformers,
flwr or Ray), so that bad input is named within a second. They cover the run config (`RunConfig.validate`), the
data, target and model paths, and the site names that `--weights` and `--ablate` use; the full checks (every shard
loaded, the model's config read: `server.simulation.check_local_inputs`, and `check_shards_fill_a_block`, which
tokenizes) follow them, still before Ray starts."""

from pathlib import Path

from feddem.common.config import RunConfig
from feddem.common.errors import FeddemError
from feddem.common.synthetic import DOMAINS
from feddem.server.ablation import parse_candidates

SYNTHETIC = "synthetic"


def simulated_site_names(sites: int) -> list[str]:
    """The names the simulation gives its virtual sites (`common.site_context`: site-<partition id>)."""
    return [f"site-{i}" for i in range(sites)]


def check_simulation_inputs(cfg: RunConfig) -> None:
    """Raise a FeddemError naming the option for anything in `cfg` that would fail once the run has started."""
    cfg.validate()
    shards = _check_data_spec(cfg.data, "data")
    if shards is not None and cfg.sites > shards:
        raise FeddemError(f"--sites {cfg.sites} is more than the {shards} shard(s) that data '{cfg.data}' provides: "
                          f"one site per shard")
    if cfg.target:
        _check_data_spec(cfg.target, "target")
    _check_model(cfg.model)
    names = simulated_site_names(cfg.sites)
    if cfg.weights:
        from feddem.common.weighting.weights import parse_weights

        given = parse_weights(cfg.weights)
        unknown, missing = sorted(set(given) - set(names)), [n for n in names if n not in given]
        if unknown or missing:
            raise FeddemError(f"--weights: unknown site(s) {unknown}, missing site(s) {missing}; give one weight for "
                              f"each simulated site: {', '.join(names)}")
    if cfg.ablate:
        parse_candidates(cfg.ablate, names, cfg.min_peers + 1 if cfg.aggregation == "secure" else 1)


def _check_data_spec(spec: str, option: str) -> int | None:
    """A synthetic spec names known domains (returns how many), a folder spec names an existing folder (None: its
    entries are counted when the shards are loaded)."""
    if spec == SYNTHETIC or spec.startswith(SYNTHETIC + ":"):
        if spec == SYNTHETIC:
            return len(DOMAINS)
        names = [n.strip() for n in spec[len(SYNTHETIC) + 1:].split(",") if n.strip()]
        unknown = [n for n in names if n not in DOMAINS]
        if unknown or not names:
            raise FeddemError(f"--{option} '{spec}': unknown synthetic domain(s) {unknown or '(none given)'}; "
                              f"built-in domains: {', '.join(DOMAINS)}")
        return len(names)
    if spec.startswith("hf:"):  # a hub dataset: its loader (common.data.load_hub) names it when it cannot be read
        return None
    root = Path(spec).expanduser()
    if not root.exists():
        raise FeddemError(f"{option} path '{spec}' does not exist (expected 'synthetic' or a folder of per-site "
                          f"files)")
    if not root.is_dir():
        raise FeddemError(f"{option} path '{spec}' is a file; give a folder with one file or subfolder per site")
    return None


def _check_model(ref: str) -> None:
    """A model given as a path (or a name that exists here) must be a Hugging Face folder; a hub name is checked
    when the model's config is read."""
    if not ref:
        return  # the embedded model
    path = Path(ref).expanduser()
    if (path.exists() or ref.startswith((".", "/", "~"))) and not (path / "config.json").is_file():
        raise FeddemError(f"model folder '{ref}' does not exist or has no config.json (not a Hugging Face model)")


def check_shards_fill_a_block(cfg: RunConfig, chunk: int = 256) -> None:
    """Every site's plain-text train split gives at least one block of `seq-len` tokens (else each site's training
    fails once the run has started; instruction and chat examples are one per row, padded, and need no block).
    Runs after `check_local_inputs` (the base is built, the shards load); it tokenizes only as many examples as
    that takes."""
    from feddem.common.chat_format import TEXT
    from feddem.common.data import SyntheticSizes, load_shard
    from feddem.common.modeling import load_tokenizer
    from feddem.server.base_ref import resolve_base_ref

    tokenizer = load_tokenizer(resolve_base_ref(cfg))
    sizes = SyntheticSizes(cfg.train_examples, cfg.eval_examples, cfg.seed, cfg.text_column)
    for index, name in enumerate(simulated_site_names(cfg.sites)):
        shard = load_shard(cfg.data, index, sizes)
        if shard.kind != TEXT:
            continue
        train = shard.train
        tokens = 0  # as common.data.pack_blocks counts them: each example's tokens and one EOS
        for start in range(0, len(train), chunk):
            ids = tokenizer(train[start:start + chunk]["text"], add_special_tokens=False)["input_ids"]
            tokens += sum(len(row) + 1 for row in ids)
            if tokens >= cfg.seq_len:
                break
        if tokens < cfg.seq_len:
            raise FeddemError(f"{name}'s training data gives {tokens} tokens, fewer than one block of --seq-len "
                              f"{cfg.seq_len}: lower --seq-len or give the site more examples")
