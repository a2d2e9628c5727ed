"""The run config: every setting of a DEM run, its default, its help text and its check, in one place.

The same names (kebab-case) are used by `feddem simulate` options, by `[tool.flwr.app.config]` for `flwr run`,
and in the ConfigRecord the server sends to the sites.
"""

from dataclasses import dataclass, field, fields

from common.errors import FeddemError


def _opt(default, help_text: str, **extra):
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass
class RunConfig:
    sites: int = _opt(4, "number of sites (one shard/domain each); the run waits for this many nodes")
    model: str = _opt("", "base model: a local Hugging Face folder or a hub name; empty = the embedded tiny model")
    data: str = _opt("synthetic", "'synthetic', 'synthetic:DOMAIN,...' or a folder of per-site files")
    train_examples: int = _opt(2000, "synthetic domains: train examples per site")
    eval_examples: int = _opt(200, "synthetic domains: held-out examples per site")
    steps: int = _opt(200, "local fine-tuning steps per site")
    lr: float = _opt(1e-4, "peak learning rate of local fine-tuning (warm-up then cosine decay)")
    batch_size: int = _opt(16, "sequences per micro-batch")
    seq_len: int = _opt(128, "tokens per training sequence")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lora: bool = _opt(False, "fine-tune LoRA adapters (peft) and send LoRA vectors instead of full weights")
    lora_r: int = _opt(8, "LoRA rank")
    lora_alpha: int = _opt(16, "LoRA alpha")
    weighting: str = _opt("uniform", "how the server weights the sites' vectors")
    device: str = _opt("auto", "training device of the sites: auto, cpu or cuda")
    seed: int = _opt(0, "seed of data generation, training order and initialisation")
    base_steps: int = _opt(300, "embedded model only: pre-training steps of the cached base")
    out_dir: str = _opt("", "run folder for the merged model and report; empty = $FEDDEM_HOME/runs/<time>")
    timeout: float = _opt(3600.0, "seconds to wait for the sites at each stage")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name.replace("_", "-") for f in fields(cls)]

    def to_record(self) -> dict:
        """Flat kebab-case dict of primitives (for a ConfigRecord or a run_config)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_record(cls, record: dict) -> "RunConfig":
        """Build from a flat kebab-case dict; unknown keys and wrong types are errors, missing keys take defaults."""
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in dict(record).items():
            name = key.replace("-", "_")
            if name not in known:
                raise FeddemError(f"unknown run-config key '{key}' (known: {', '.join(cls.keys())})")
            values[name] = _coerce(key, value, type(known[name].default))
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        from common.weighting import WEIGHTINGS  # late import: weighting imports nothing from here
        from common.devices import DEVICES

        for name in ("sites", "steps", "batch_size", "grad_accum", "train_examples", "eval_examples", "lora_r"):
            if getattr(self, name) < 1:
                raise FeddemError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 8:
            raise FeddemError(f"seq-len must be at least 8, got {self.seq_len}")
        if not self.lr > 0:
            raise FeddemError(f"lr must be positive, got {self.lr}")
        if self.base_steps < 0:
            raise FeddemError(f"base-steps must be 0 or more, got {self.base_steps}")
        if self.weighting not in WEIGHTINGS:
            raise FeddemError(f"unknown weighting '{self.weighting}': choose one of {', '.join(WEIGHTINGS)}")
        if self.device not in DEVICES:
            raise FeddemError(f"unknown device '{self.device}': choose one of {', '.join(DEVICES)}")


def _coerce(key: str, value, kind: type):
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise FeddemError(f"run-config '{key}' must be true or false, got {value!r}")
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise FeddemError(f"run-config '{key}' must be a {kind.__name__}, got {value!r}") from None
