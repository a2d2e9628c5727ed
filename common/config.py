"""The run config: every setting of a DEM run, its default, its help text and its check, in one place.

The same names (kebab-case) are used by `feddem simulate` options, by `[tool.flwr.app.config]` for `flwr run`,
and in the ConfigRecord the server sends to the sites.
"""

import math
from dataclasses import dataclass, field, fields

from feddem.common.errors import FeddemError
from feddem.common.weighting import WEIGHTINGS, parameter

AGGREGATIONS = ("secure", "plain")  # how the weighted vectors reach the server


def _opt(default, help_text: str, **extra):
    return field(default=default, metadata={"help": help_text, **extra})


def _strategy_opt(name: str):
    """A field a weighting strategy owns: its default, help and range are the strategy's (`Parameter`)."""
    p = parameter(name)
    return field(default=p.default, metadata={"help": p.help, "strategy_parameter": p})


MAX_TIMEOUT = 30 * 24 * 3600.0  # seconds: beyond this, a wait is a mistake (and overflows some timers)
VECTOR_DTYPES = ("float32", "bfloat16", "float16")  # names of torch dtypes: `RunConfig.torch_vector_dtype`


@dataclass
class RunConfig:
    sites: int = _opt(4, "number of sites (one shard/domain each); the run waits for this many nodes")
    model: str = _opt("", "base model: a local Hugging Face folder, a hub name (the local cache when offline), a GGUF "
                      "file (converted once into $FEDDEM_HOME/models/) or a preset (smollm2-135m); empty = the "
                      "embedded tiny model")
    data: str = _opt("synthetic", "'synthetic', 'synthetic:DOMAIN,...', a folder with one entry per site (a "
                     ".jsonl/.json/.parquet/.txt/.csv file, a train/test subfolder or a save_to_disk folder) or "
                     "'hf:ORG/NAME[:CONFIG][@SPLIT]'; text, prompt/completion, alpaca or messages data")
    train_examples: int = _opt(2000, "synthetic domains: train examples per site")
    eval_examples: int = _opt(400, "held-out examples per site: generated for synthetic domains, a cap for any "
                              "other data (first half: validation for the weight search; second half: the test "
                              "split of the report)")
    text_column: str = _opt("text", "the column of plain-text data (when no instruction/chat columns are present)")
    gen_examples: int = _opt(8, "instruction/chat data: held-out prompts answered greedily for the generation "
                             "metric (exact match, ROUGE-L) of the base, local and merged models; 0 = off")
    steps: int = _opt(200, "local fine-tuning steps per site")
    lr: float = _opt(3e-4, "peak learning rate of local fine-tuning (warm-up then cosine decay)")
    batch_size: int = _opt(16, "sequences per micro-batch")
    seq_len: int = _opt(128, "tokens per training sequence")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    tokens_per_step: int = _opt(0, "gradient accumulation to a token budget: when > 0, micro-batches per optimizer "
                                "step are raised (above grad-accum) until a step sees at least this many tokens")
    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward pass: less memory for long "
                                        "sequences or large models, about a third slower")
    compile: bool = _opt(False, "torch.compile the model for fine-tuning (pays off for long runs on a GPU)")
    lora: bool = _opt(False, "fine-tune LoRA adapters (peft) and send LoRA vectors instead of full weights")
    lora_r: int = _opt(8, "LoRA rank")
    lora_alpha: int = _opt(16, "LoRA alpha")
    weighting: str = _opt("uniform", "how the server weights the sites' vectors")
    weights: str = _strategy_opt("weights")
    rounds: int = _opt(1, "rounds of local fine-tuning from the current merged model followed by a weighted merge "
                       "(1 = DEM)")
    chameleon_lambda: float = _strategy_opt("chameleon-lambda")
    chameleon_tau: float = _strategy_opt("chameleon-tau")
    chameleon_inverse: bool = _strategy_opt("chameleon-inverse")
    dga_eta: float = _strategy_opt("dga-eta")
    dga_ema: float = _strategy_opt("dga-ema")
    target: str = _strategy_opt("target")
    target_examples: int = _strategy_opt("target-examples")
    search_budget: int = _strategy_opt("search-budget")
    search_step: float = _strategy_opt("search-step")
    sparsify: str = _opt("none", "site-side sparsification of each site's vector before it is stored, with any "
                         "weighting: none, dare:P (drop a random fraction P of each tensor's entries with the "
                         "site's own randomness, rescale the rest by 1/(1-P)) or topk:F (keep the fraction F of "
                         "largest magnitudes per tensor)")
    keep_pool: bool = _opt(False, "plain (trusted) runs: keep each site's vector in the run folder (pool/) for "
                           "`feddem ablate`")
    ablate: str = _opt("", "rank candidate mixtures at the end of the run by merging: K (every subset of up to K "
                       "sites) or 'site-0,site-1;site-2,site-3'; in secure runs each is one more aggregation")
    device: str = _opt("auto", "training device of the sites: auto, cpu or cuda")
    seed: int = _opt(0, "seed of data generation, training order and initialisation (0 to 2^32 - 1)")
    base_steps: int = _opt(300, "embedded model only: pre-training steps of the cached base")
    max_shard_size: str = _opt("5GB", "largest weight file of the exported model (e.g. 500MB, 5GB); a larger model "
                               "is written in shards with a model.safetensors.index.json, as save_pretrained does")
    out_dir: str = _opt("", "run folder for the merged model and report; empty = $FEDDEM_HOME/runs/<time>")
    timeout: float = _opt(3600.0, "seconds to wait for the sites at each stage (more than 0, at most 30 days)")
    aggregation: str = _opt("secure", "how weighted vectors reach the server: 'secure' (SecAgg+: the server "
                            "learns only the sum) or 'plain' (each site's weighted vector in the clear)")
    merge: str = _opt("weighted-sum", "merge rule, computed from sums alone (common.merging): 'weighted-sum' "
                      "(DEM: sum_i w_i d_i), 'fisher' (Fisher-weighted averaging: the sites also sum w_i F_i d_i "
                      "and w_i F_i, 2x the upload) or 'regmean' (RegMean for linear layers: the sites also sum "
                      "their input Gram matrices; about 2.2x the upload on the embedded model)")
    merge_examples: int = _opt(32, "fisher and regmean: how many of each site's train examples (rows of its train "
                               "blocks; all of them when it has fewer) the rule's statistics are computed on: one "
                               "backward pass per example for the Fisher, forward passes for the Gram matrices")
    vector_dtype: str = _opt("float32", "dtype of the sites' stored vectors and of their uploads: float32, "
                             "bfloat16 or float16 (half the bytes on disk and on the wire; sums are formed in "
                             "float32). In secure runs a 16-bit ring is used where its error, at most n/2^16 of "
                             "2 * clip * n per element for n sites, is within the 16-bit float's rounding of clip "
                             "(bfloat16: up to 11 sites, float16: up to 4); else 32 bits")
    upload_parts: int = _opt(1, "secure aggregation: messages each site's masked upload is split into. The server "
                             "holds its ring accumulator plus one message, so K parts lower its peak from 2 to "
                             "1 + 1/K vectors (32-bit ring), and a site's from 1 to 1/K; but a site that fails "
                             "after its first part fails the round (a partial masked input cannot be removed from "
                             "the sum). 1 = one message, a dropout tolerated at any stage")
    clip: float = _opt(1.0, "secure aggregation: bound on each element of w_i * d_i; larger elements are clipped "
                       "at the site (the count is reported)")
    min_peers: int = _opt(2, "secure aggregation: a site refuses unless at least this many OTHER sites are in "
                          "the aggregation")
    weight_min: float = _opt(0.0, "secure aggregation: a site refuses a weight below this")
    weight_max: float = _opt(1.0, "secure aggregation: a site refuses a weight above this")
    secagg_threshold: int = _opt(0, "secure aggregation: sites needed to unmask the sum (Shamir threshold); "
                                 "0 = max(2, ceil(2n/3)) of the n sites that trained")
    noise: float = _opt(0.0, "secure aggregation: standard deviation of the Gaussian noise in the sum, added by "
                        "the sites in equal parts (distributed noise); 0 = none")
    aggregation_budget: int = _opt(1, "secure aggregation: how many times a site lets the same vector be "
                                   "aggregated in one run; more than 1 needs --noise > 0 (two noiseless sums with "
                                   "different weights reveal a vector)")

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
        from feddem.common.devices import DEVICES
        from feddem.common.sparsify import parse_sparsify

        self._validate_types()
        for name in ("sites", "steps", "batch_size", "grad_accum", "train_examples", "eval_examples", "lora_r",
                     "lora_alpha", "merge_examples"):
            if getattr(self, name) < 1:
                raise FeddemError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.tokens_per_step < 0:
            raise FeddemError(f"tokens-per-step must be 0 (off) or positive, got {self.tokens_per_step}")
        if self.seq_len < 8:
            raise FeddemError(f"seq-len must be at least 8, got {self.seq_len}")
        if not self.lr > 0:
            raise FeddemError(f"lr must be positive, got {self.lr}")
        if not 0 < self.timeout <= MAX_TIMEOUT:
            raise FeddemError(f"timeout must be more than 0 and at most {MAX_TIMEOUT:.0f} seconds (30 days), "
                              f"got {self.timeout}")
        if not 0 <= self.seed < 2**32:
            raise FeddemError(f"seed must be between 0 and 2^32 - 1, got {self.seed}")
        if self.base_steps < 0:
            raise FeddemError(f"base-steps must be 0 or more, got {self.base_steps}")
        if self.weighting not in WEIGHTINGS:
            raise FeddemError(f"unknown weighting '{self.weighting}': choose one of {', '.join(WEIGHTINGS)}")
        if self.device not in DEVICES:
            raise FeddemError(f"unknown device '{self.device}': choose one of {', '.join(DEVICES)}")
        self.max_shard_bytes  # a size save_pretrained understands
        if self.vector_dtype not in VECTOR_DTYPES:
            raise FeddemError(f"unknown vector-dtype '{self.vector_dtype}': choose one of {', '.join(VECTOR_DTYPES)}")
        self._validate_aggregation()
        self._validate_weighting()
        parse_sparsify(self.sparsify)
        if self.gen_examples < 0 or not self.text_column:
            raise FeddemError(f"gen-examples must be 0 or more and text-column non-empty, got {self.gen_examples}, "
                              f"{self.text_column!r}")

    def _validate_types(self) -> None:
        """Every value has its field's type (a bool is no number here), and every number is finite: an inf or nan
        would pass the range checks below or fail only once the run has started."""
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            key = f.name.replace("_", "-")
            accepted = (int, float) if kind is float else kind  # an int is a float here, a bool no number
            if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):
                raise FeddemError(f"{key} must be a {kind.__name__}, got {value!r}")
            if kind is float and not math.isfinite(value):
                raise FeddemError(f"{key} must be a finite number, got {value}")

    def _validate_weighting(self) -> None:
        """The weighting's options: each strategy's parameters in their declared ranges (checked for every strategy,
        so a bad value is named even for a strategy not chosen), then the chosen strategy's own rules."""
        if self.rounds < 1:
            raise FeddemError(f"rounds must be at least 1, got {self.rounds}")
        for each in WEIGHTINGS.values():
            each.check_parameters(self)
        chosen = WEIGHTINGS[self.strategy_name]
        chosen.validate(self)
        if self.eval_examples < 2:
            raise FeddemError(f"eval-examples must be at least 2 (half validation, half test), got "
                              f"{self.eval_examples}")
        if self.aggregation == "secure":
            needed = chosen.aggregations(self) + (
                count_candidates(self.ablate, self.sites, self.min_peers + 1) if self.ablate else 0)
            if needed > self.aggregation_budget:
                raise FeddemError(f"this secure run needs {needed} aggregations of the same vectors (weighting and "
                                  f"ablation candidates) but aggregation-budget is {self.aggregation_budget}: "
                                  f"raise it (with --noise > 0) or use --aggregation plain")

    @property
    def strategy_name(self) -> str:
        """The weighting in effect: `manual` whenever weights are given by hand."""
        return "manual" if self.weights else self.weighting

    def _validate_aggregation(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise FeddemError(f"unknown aggregation '{self.aggregation}': choose one of {', '.join(AGGREGATIONS)}")
        from feddem.common.merging import RULE_NAMES

        if self.merge not in RULE_NAMES:
            raise FeddemError(f"unknown merge rule '{self.merge}': choose one of {', '.join(RULE_NAMES)}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise FeddemError(f"clip must be a positive finite number, got {self.clip}")
        if self.min_peers < 1:
            raise FeddemError(f"min-peers must be at least 1 (a sum of one site is that site's vector), "
                              f"got {self.min_peers}")
        if not (math.isfinite(self.weight_min) and math.isfinite(self.weight_max)):
            raise FeddemError(f"weight-min/weight-max must be finite, got {self.weight_min}/{self.weight_max}")
        if self.weight_min > self.weight_max:
            raise FeddemError(f"weight-min ({self.weight_min}) is larger than weight-max ({self.weight_max})")
        if self.secagg_threshold != 0 and not 2 <= self.secagg_threshold <= self.sites:
            raise FeddemError(f"secagg-threshold must be 0 (automatic) or between 2 and sites ({self.sites}), "
                              f"got {self.secagg_threshold}")
        if not (math.isfinite(self.noise) and self.noise >= 0):
            raise FeddemError(f"noise must be a finite number >= 0, got {self.noise}")
        if self.aggregation_budget < 1:
            raise FeddemError(f"aggregation-budget must be at least 1, got {self.aggregation_budget}")
        if self.upload_parts < 1:
            raise FeddemError(f"upload-parts must be at least 1, got {self.upload_parts}")
        if self.upload_parts > 1 and self.aggregation != "secure":
            raise FeddemError(f"upload-parts {self.upload_parts} splits secure aggregation's masked uploads; "
                              f"--aggregation {self.aggregation} sends each vector in one message (use 1)")
        if self.aggregation_budget > 1 and self.noise == 0:
            raise FeddemError(f"aggregation-budget {self.aggregation_budget} needs distributed noise (--noise > 0): "
                              f"without noise, two sums whose weights differ in one site reveal its vector")
        if self.aggregation == "secure" and self.sites - 1 < self.min_peers:
            raise FeddemError(f"secure aggregation with min-peers {self.min_peers} needs at least "
                              f"{self.min_peers + 1} sites, got --sites {self.sites} (or use --aggregation plain)")

    @property
    def torch_vector_dtype(self):
        """`vector-dtype` as a torch dtype."""
        import torch

        return getattr(torch, self.vector_dtype)

    @property
    def max_shard_bytes(self) -> int:
        """`max-shard-size` in bytes."""
        return shard_size_bytes(self.max_shard_size)

    def threshold_for(self, participants: int) -> int:
        """The Shamir threshold for an aggregation over `participants` sites (see `secagg-threshold`)."""
        if self.secagg_threshold:
            return self.secagg_threshold
        return max(2, math.ceil(2 * participants / 3))


def shard_size_bytes(size: str) -> int:
    """A shard size such as 500MB or 5GB in bytes, read as `save_pretrained` reads it (huggingface_hub's parser:
    KB/MB/GB/TB); a clear error for anything else."""
    from huggingface_hub.serialization._base import parse_size_to_int  # not transformers: 1.2 s per config check

    try:
        size_bytes = parse_size_to_int(size)
    except (ValueError, TypeError, AttributeError):
        size_bytes = 0
    if size_bytes < 1:
        raise FeddemError(f"max-shard-size must be a size such as 500MB or 5GB, got {size!r}")
    return size_bytes


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


def count_candidates(spec: str, n_sites: int, min_size: int = 1) -> int:
    """How many candidate mixtures an `ablate` spec names for `n_sites` sites (`server.ablation` parses them)."""
    spec = spec.strip()
    if spec.isdigit():
        return sum(math.comb(n_sites, k) for k in range(min_size, min(int(spec), n_sites) + 1))
    return len([part for part in spec.split(";") if part.strip()])
