"""The messages between the feddem ServerApp and its sites: each one's content defined once, typed and versioned.

Every message content is a small dataclass with `to_record()` (a Flower RecordDict of ConfigRecord, MetricRecord
and ArrayRecord) and `from_record()` (which names any required field that is missing or mistyped). The server and
the ClientApp build and read contents only through these classes (docs/architecture.md, "Messages").

Every request and every reply carries the protocol version (`feddem-protocol` = MAJOR.MINOR in the `protocol`
record). A request also carries the `Envelope`: the site's settings (`SiteSettings`, the part of the run config a
site uses, not the whole of it) and the base model's reference. Versioning rule: a minor version adds only optional
fields (with a default here) or settings an older site may ignore; anything else (a field removed, renamed, made
required or given another meaning) is a new major. So a site accepts a request of its own major whatever its minor
(settings it does not know are ignored and logged once), and refuses another major with both versions named.
A `Failure` is readable by every version: its layout never changes.
"""

import logging
import math
import typing
from dataclasses import MISSING, dataclass, field, fields

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from feddem.common.errors import FeddemError
from feddem.common.secagg.params import SecAggParams

log = logging.getLogger("feddem.messages")

# --- message types ---
TRAIN = "train"  # fine-tune locally, keep the vector, report metadata
UPLOAD = "train.upload"  # send weight * vector (plain aggregation)
EVALUATE = "evaluate"  # evaluate base + aggregate on the held-out split
# Secure aggregation (SecAgg+ over the Message API; see client/secure_upload.py and server/secure_aggregation.py)
SA_KEYS = "query.sa_keys"  # stage 1: round parameters + this site's id and weight -> the site's two public keys
SA_SHARE = "query.sa_share"  # stage 2: everyone's public keys -> encrypted Shamir shares for the peers
SA_MASKED = "query.sa_masked"  # stage 3: the shares routed to this site -> its masked, quantized w_i * d_i
SA_UNMASK = "query.sa_unmask"  # stage 4: survivors and dropped sites -> shares that remove the masks

# --- record names (what a RecordDict key means; the classes below say what each record holds) ---
PROTOCOL = "protocol"  # ConfigRecord {feddem-protocol: "MAJOR.MINOR"}: every request and reply
SETTINGS = "settings"  # ConfigRecord: SiteSettings (every request)
BASE = "base"  # ConfigRecord: model-ref, model-checksum (every request)
SITE = "site"  # ConfigRecord: a site's result, its strings (train/evaluate reply)
METRICS = "metrics"  # MetricRecord: a site's result, its numbers (train/evaluate/masked reply)
TRAIN_OPTIONS = "train"  # ConfigRecord (train request): what the server wants back besides the vector
WEIGHT = "weight"  # ConfigRecord: weight (upload request)
VECTOR = "vector"  # ArrayRecord: the weighted vector (upload reply)
AGGREGATE = "aggregate"  # ArrayRecord: sum_i w_i d_i (evaluate request)
FAILURE = "failure"  # ConfigRecord: reason (and site), when a site refuses or fails cleanly
START = "start"  # ArrayRecord (train request, rounds > 1): the merged model so far, as a vector on the base
TARGET = "target"  # ArrayRecord (train request, dga): the target direction, minus the target-task gradient
EMBEDDING = "embedding"  # ArrayRecord (train reply, chameleon): the site's domain embedding
EVAL = "eval"  # ConfigRecord (evaluate request): split = validation | test
LAYOUT = "layout"  # ConfigRecord (train reply): names of the vector's parameters, sorted
SA_PARAMS = "sa-params"  # ConfigRecord: SecAggParams.to_dict()
SA_ROUND = "sa-round"  # ConfigRecord: this site's client id, weight, everyone's weights, the vector's names
SA = "sa"  # ConfigRecord: the stage's payload (keys, shares, survivors...) both ways
MASKED = "masked"  # ArrayRecord: the masked ring vector in chunks named by their ring offset

# --- the protocol version ---
PROTOCOL_KEY = "feddem-protocol"


@dataclass(frozen=True, order=True)
class Version:
    """A protocol version MAJOR.MINOR: the same major understands each other; a higher minor only adds."""

    major: int
    minor: int

    @classmethod
    def parse(cls, text) -> "Version":
        parts = str(text).split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise FeddemError(f"malformed {PROTOCOL_KEY} version {text!r} (expected MAJOR.MINOR, e.g. 1.0)")
        return cls(int(parts[0]), int(parts[1]))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


VERSION = Version(1, 2)  # this code's protocol: bump the minor for an optional addition, the major for a break

_told: set = set()  # (peer, what) already logged: skew is logged once per process, not once per message


def _once(key, text: str, *args) -> None:
    if key not in _told:
        _told.add(key)
        log.warning(text, *args)


def stamp(content: RecordDict, version: Version = VERSION) -> RecordDict:
    """`content` with the protocol version of its sender."""
    content[PROTOCOL] = ConfigRecord({PROTOCOL_KEY: str(version)})
    return content


def peer_version(content: RecordDict, peer: str, me: str) -> Version:
    """The protocol version of a message `me` ("this site") received from `peer` ("the server"); a FeddemError
    naming both versions for another major, or for a message that names none (a sender from before versioned
    messages)."""
    if PROTOCOL not in content.config_records or PROTOCOL_KEY not in content.config_records[PROTOCOL]:
        raise FeddemError(f"the message from {peer} carries no {PROTOCOL_KEY} version (a feddem release from before "
                          f"versioned messages); {me} speaks {PROTOCOL_KEY} {VERSION}: upgrade {peer}")
    theirs = Version.parse(content.config_records[PROTOCOL][PROTOCOL_KEY])
    if theirs.major != VERSION.major:
        behind = me if theirs > VERSION else peer
        raise FeddemError(f"{peer} speaks {PROTOCOL_KEY} {theirs} and {me} {VERSION}: a different major version "
                          f"cannot be understood (upgrade {behind} to {max(theirs, VERSION).major}.x)")
    if theirs.minor > VERSION.minor:
        _once((peer, theirs), "%s speaks %s %s, newer than %s's %s: what %s does not know is ignored", peer,
              PROTOCOL_KEY, theirs, me, VERSION, me)
    return theirs


# --- reading fields, with the message and the field named in every error ---
def _record(content: RecordDict, name: str, what: str, kind: str = "config"):
    records = {"config": content.config_records, "metric": content.metric_records,
               "array": content.array_records}[kind]
    if name not in records:
        raise FeddemError(f"{what}: missing required record '{name}'")
    return records[name]


def _value(record, key: str, what: str, kind, default=MISSING):
    """`record[key]` as `kind` (int, float, str, bool, bytes, or list[...] of these); `default` when it is absent
    (MISSING: a required field, named in the error)."""
    if key not in record:
        if default is MISSING:
            raise FeddemError(f"{what}: missing required field '{key}'")
        return default
    value = record[key]
    if typing.get_origin(kind) is list:
        if not isinstance(value, (list, tuple)):
            raise FeddemError(f"{what}: field '{key}' must be a list, got {type(value).__name__}")
        item = typing.get_args(kind)[0]
        return [_scalar(v, key, what, item) for v in value]
    return _scalar(value, key, what, kind)


def _scalar(value, key: str, what: str, kind):
    if kind is float and isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if kind is bytes and isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if kind in (str, bool) and type(value) is kind:
        return value
    raise FeddemError(f"{what}: field '{key}' must be {kind.__name__}, got {type(value).__name__} {value!r:.60}")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


# --- what every request carries ---
@dataclass(frozen=True)
class SiteSettings:
    """The settings of a run that a site uses (data, training, its vector, its privacy guard's inputs): a site
    is sent these, not the whole run config. Fields without a default are required (version 1.0); a field added in
    a later minor version must take a default, which is what a site assumes when an older server omits it.

    The names are those of `RunConfig`, so a site's code reads `settings.steps` as it would `cfg.steps`."""

    data: str
    train_examples: int
    eval_examples: int
    text_column: str
    gen_examples: int
    seed: int
    steps: int
    lr: float
    batch_size: int
    seq_len: int
    grad_accum: int
    tokens_per_step: int
    gradient_checkpointing: bool
    compile: bool
    lora: bool
    lora_r: int
    lora_alpha: int
    sparsify: str
    vector_dtype: str
    device: str
    aggregation: str  # the mode the run declares: the guard commits the vector to it
    clip: float
    min_peers: int
    weight_min: float
    weight_max: float
    noise: float
    aggregation_budget: int
    merge: str = "weighted-sum"  # 1.1: the run's merge rule (common.merging): which statistics a site computes
    merge_examples: int = 32  # 1.2: how many of its train examples a site computes those statistics on

    @classmethod
    def from_run_config(cls, cfg) -> "SiteSettings":
        """The site's part of a `RunConfig`."""
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({_kebab(f.name): getattr(self, f.name) for f in fields(self)})

    @classmethod
    def from_record(cls, record: ConfigRecord, what: str = "the server's settings") -> "SiteSettings":
        """Settings this site knows, checked (a missing required one named); those it does not know are ignored
        and logged once (a newer server's)."""
        hints = typing.get_type_hints(cls)
        known = {_kebab(f.name) for f in fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            _once(("settings", tuple(unknown)), "%s include setting(s) this site does not know, ignored: %s", what,
                  ", ".join(unknown))
        missing = [_kebab(f.name) for f in fields(cls)
                   if _kebab(f.name) not in record and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise FeddemError(f"{what} lack required setting(s) {', '.join(missing)} ({PROTOCOL_KEY} {VERSION} needs "
                              f"them)")
        values = {f.name: _value(record, _kebab(f.name), what, hints[f.name], f.default)
                  for f in fields(cls) if _kebab(f.name) in record or f.default is not MISSING}
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """The site's own checks of what it will use (it does not rely on the server's)."""
        from feddem.common.config import AGGREGATIONS, VECTOR_DTYPES
        from feddem.common.devices import DEVICES
        from feddem.common.sparsify import parse_sparsify

        checks = [
            ("steps", self.steps >= 1, "at least 1"), ("batch-size", self.batch_size >= 1, "at least 1"),
            ("grad-accum", self.grad_accum >= 1, "at least 1"), ("lora-r", self.lora_r >= 1, "at least 1"),
            ("lora-alpha", self.lora_alpha >= 1, "at least 1"),
            ("train-examples", self.train_examples >= 1, "at least 1"),
            ("eval-examples", self.eval_examples >= 2, "at least 2"),
            ("tokens-per-step", self.tokens_per_step >= 0, "0 or more"), ("seq-len", self.seq_len >= 8, "at least 8"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "a positive number"),
            ("seed", 0 <= self.seed < 2**32, "between 0 and 2^32 - 1"),
            ("gen-examples", self.gen_examples >= 0, "0 or more"), ("text-column", bool(self.text_column), "set"),
            ("device", self.device in DEVICES, f"one of {', '.join(DEVICES)}"),
            ("vector-dtype", self.vector_dtype in VECTOR_DTYPES, f"one of {', '.join(VECTOR_DTYPES)}"),
            ("aggregation", self.aggregation in AGGREGATIONS, f"one of {', '.join(AGGREGATIONS)}"),
            ("clip", math.isfinite(self.clip) and self.clip > 0, "a positive number"),
            ("min-peers", self.min_peers >= 1, "at least 1"),
            ("weight-min", math.isfinite(self.weight_min) and math.isfinite(self.weight_max)
             and self.weight_min <= self.weight_max, "finite and at most weight-max"),
            ("noise", math.isfinite(self.noise) and self.noise >= 0, "a finite number >= 0"),
            ("aggregation-budget", self.aggregation_budget >= 1, "at least 1"),
            ("merge-examples", self.merge_examples >= 1, "at least 1"),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise FeddemError(f"the server's setting {key}={getattr(self, key.replace('-', '_'))!r}: expected "
                                  f"{expected}")
        if self.aggregation_budget > 1 and self.noise == 0:
            raise FeddemError(f"the server's setting aggregation-budget={self.aggregation_budget} needs distributed "
                              f"noise (noise > 0): without noise, two sums whose weights differ in one site reveal "
                              f"its vector")
        from feddem.common.merging import RULE_NAMES

        if self.merge not in RULE_NAMES:
            raise FeddemError(f"the server's setting merge={self.merge!r}: expected one of {', '.join(RULE_NAMES)}")
        parse_sparsify(self.sparsify)

    @property
    def torch_vector_dtype(self):
        """`vector-dtype` as a torch dtype."""
        import torch

        return getattr(torch, self.vector_dtype)


@dataclass(frozen=True)
class BaseModelRef:
    """The base model every site starts from: where the site finds it and the checksum it must have."""

    ref: str
    checksum: str = ""

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"model-ref": self.ref, "model-checksum": self.checksum})

    @classmethod
    def from_record(cls, record: ConfigRecord, what: str = "the base model record") -> "BaseModelRef":
        return cls(_value(record, "model-ref", what, str), _value(record, "model-checksum", what, str, ""))


@dataclass(frozen=True)
class Envelope:
    """What every request carries besides its own content: the sender's protocol version, the site's settings and
    the base model."""

    settings: SiteSettings
    base: BaseModelRef
    version: Version = VERSION

    def wrap(self, content: RecordDict) -> RecordDict:
        """`content` (one request's own records) with the envelope's records added."""
        content[SETTINGS] = self.settings.to_record()
        content[BASE] = self.base.to_record()
        return stamp(content, self.version)

    @classmethod
    def from_record(cls, content: RecordDict) -> "Envelope":
        """The version is checked first: a request of another major is refused before anything else is read."""
        version = peer_version(content, "the server", "this site")
        what = f"the server's request ({PROTOCOL_KEY} {version})"
        settings = SiteSettings.from_record(_record(content, SETTINGS, what), f"the server's settings "
                                                                              f"({PROTOCOL_KEY} {version})")
        return cls(settings, BaseModelRef.from_record(_record(content, BASE, what)), version)


# --- train ---
@dataclass
class TrainRequest:
    """Fine-tune locally from `start` (rounds > 1), score the vector against `target` (dga), and send the domain
    embedding back when `embedding` (chameleon). Vectors travel as `common.vectors.vector_to_record` ArrayRecords,
    formed once and shared by every site's message."""

    start: ArrayRecord | None = None
    target: ArrayRecord | None = None
    embedding: bool = False

    def to_record(self) -> RecordDict:
        content = RecordDict({TRAIN_OPTIONS: ConfigRecord({"embedding": self.embedding})})
        for name, record in ((START, self.start), (TARGET, self.target)):
            if record is not None:
                content[name] = record
        return content

    @classmethod
    def from_record(cls, content: RecordDict) -> "TrainRequest":
        options = content.config_records.get(TRAIN_OPTIONS, ConfigRecord())
        return cls(content.array_records.get(START), content.array_records.get(TARGET),
                   _value(options, "embedding", "train request", bool, False))


def _split_result(result: dict) -> RecordDict:
    """A site's result: strings in the `site` ConfigRecord, numbers in the `metrics` MetricRecord."""
    text = {k: v for k, v in result.items() if isinstance(v, str)}
    numbers = {k: v for k, v in result.items() if not isinstance(v, str)}
    return RecordDict({SITE: ConfigRecord(text), METRICS: MetricRecord(numbers)})


def _read_result(content: RecordDict, required: tuple[str, ...], what: str) -> dict:
    result = dict(_record(content, SITE, what)) | dict(_record(content, METRICS, what, "metric"))
    missing = [k for k in required if k not in result]
    if missing:
        named = f" from {result['site']}" if "site" in result else ""
        raise FeddemError(f"{what}{named}: missing required field(s) {', '.join(missing)}")
    return result


@dataclass
class TrainReply:
    """A site's training result: `result` (what `client.site.fine_tune` reports: the REQUIRED fields, plus optional
    measurements the report shows), the vector's parameter names (not values: the server lays out a secure sum by
    them) and, when asked, the domain embedding."""

    REQUIRED: typing.ClassVar = ("site", "domain", "examples", "tokens", "train_loss", "base_loss", "local_loss")
    result: dict
    layout: list[str]
    embedding: np.ndarray | None = None

    def to_record(self) -> RecordDict:
        content = _split_result(self.result)
        content[LAYOUT] = ConfigRecord({"names": list(self.layout)})
        if self.embedding is not None:
            content[EMBEDDING] = ArrayRecord({"embedding": Array(np.asarray(self.embedding))})
        return content

    @classmethod
    def from_record(cls, content: RecordDict) -> "TrainReply":
        what = "a site's train reply"
        result = _read_result(content, cls.REQUIRED, what)
        layout = _value(_record(content, LAYOUT, what), "names", what, list[str])
        embedding = content.array_records[EMBEDDING]["embedding"].numpy() if EMBEDDING in content.array_records \
            else None
        return cls(result, layout, embedding)


# --- plain upload ---
@dataclass
class UploadRequest:
    """Send `weight * vector` in the clear (plain aggregation; the site's guard decides)."""

    weight: float

    def to_record(self) -> RecordDict:
        return RecordDict({WEIGHT: ConfigRecord({"weight": float(self.weight)})})

    @classmethod
    def from_record(cls, content: RecordDict) -> "UploadRequest":
        what = "upload request"
        return cls(_value(_record(content, WEIGHT, what), "weight", what, float))


@dataclass
class UploadReply:
    """The weighted vector (`common.vectors.vector_to_record`)."""

    vector: ArrayRecord

    def to_record(self) -> RecordDict:
        return RecordDict({VECTOR: self.vector})

    @classmethod
    def from_record(cls, content: RecordDict) -> "UploadReply":
        return cls(_record(content, VECTOR, "a site's upload reply", "array"))


# --- evaluate ---
@dataclass
class EvaluateRequest:
    """Evaluate base + `aggregate` on the `split` (validation | test) of the site's held-out data."""

    aggregate: ArrayRecord
    split: str = "test"

    def to_record(self) -> RecordDict:
        return RecordDict({AGGREGATE: self.aggregate, EVAL: ConfigRecord({"split": self.split})})

    @classmethod
    def from_record(cls, content: RecordDict) -> "EvaluateRequest":
        what = "evaluate request"
        split = _value(content.config_records.get(EVAL, ConfigRecord()), "split", what, str, "test")
        return cls(_record(content, AGGREGATE, what, "array"), split)


@dataclass
class EvaluateReply:
    """A site's evaluation (`client.site.evaluate_merged`): the REQUIRED fields plus optional generation metrics."""

    REQUIRED: typing.ClassVar = ("site", "domain", "merged_loss")
    result: dict

    def to_record(self) -> RecordDict:
        return _split_result(self.result)

    @classmethod
    def from_record(cls, content: RecordDict) -> "EvaluateReply":
        return cls(_read_result(content, cls.REQUIRED, "a site's evaluate reply"))


# --- a clean refusal or failure (any message) ---
@dataclass
class Failure:
    """Why a site refused or failed, with its name when it knows it. Its layout is the same in every version."""

    reason: str
    site: str | None = None

    def to_record(self) -> RecordDict:
        return RecordDict({FAILURE: ConfigRecord({"reason": self.reason} | ({"site": self.site} if self.site
                                                                             else {}))})

    @classmethod
    def from_record(cls, content: RecordDict) -> "Failure | None":
        """The failure a reply carries, or None when it is a result."""
        if FAILURE not in content.config_records:
            return None
        record = content.config_records[FAILURE]
        site = record.get("site")
        return cls(str(record.get("reason", "no reason given")), None if site is None else str(site))


def site_of(content: RecordDict) -> str | None:
    """The site name a reply carries (in its result or its failure), if any."""
    for name in (SITE, FAILURE):
        if name in content.config_records and "site" in content.config_records[name]:
            return str(content.config_records[name]["site"])
    return None


# --- secure aggregation: the four stages, request and reply each ---
def _sa(content: RecordDict, what: str) -> ConfigRecord:
    return _record(content, SA, what)


@dataclass
class KeysRequest:
    """Stage 1: the round's parameters, this site's client id and weight, every site's weight (the session binds
    them) and the vector's parameter names."""

    params: SecAggParams
    client_id: int
    weight: float
    weights: list[float]
    names: list[str]

    def to_record(self) -> RecordDict:
        return RecordDict({SA_PARAMS: ConfigRecord(self.params.to_dict()), SA_ROUND: ConfigRecord({
            "client-id": self.client_id, "weight": float(self.weight), "weights": [float(w) for w in self.weights],
            "names": list(self.names)})})

    @classmethod
    def from_record(cls, content: RecordDict) -> "KeysRequest":
        what = "secure-aggregation keys request"
        params = SecAggParams.from_dict(dict(_record(content, SA_PARAMS, what)))
        mine = _record(content, SA_ROUND, what)
        return cls(params, _value(mine, "client-id", what, int), _value(mine, "weight", what, float),
                   _value(mine, "weights", what, list[float]), _value(mine, "names", what, list[str]))


@dataclass
class KeysReply:
    """The site's two public keys for the round."""

    pk_c: bytes
    pk_s: bytes

    def to_record(self) -> RecordDict:
        return RecordDict({SA: ConfigRecord({"pk-c": self.pk_c, "pk-s": self.pk_s})})

    @classmethod
    def from_record(cls, content: RecordDict) -> "KeysReply":
        what = "a site's keys reply"
        sa = _sa(content, what)
        return cls(_value(sa, "pk-c", what, bytes), _value(sa, "pk-s", what, bytes))


@dataclass
class ShareRequest:
    """Stage 2: the public keys of every site that advertised them, by client id."""

    session: bytes
    ids: list[int]
    pk_c: list[bytes]
    pk_s: list[bytes]

    def to_record(self) -> RecordDict:
        return RecordDict({SA: ConfigRecord({"session": self.session, "ids": list(self.ids), "pk-c": list(self.pk_c),
                                             "pk-s": list(self.pk_s)})})

    @classmethod
    def from_record(cls, content: RecordDict) -> "ShareRequest":
        what = "secure-aggregation share request"
        sa = _sa(content, what)
        return cls(_value(sa, "session", what, bytes), _value(sa, "ids", what, list[int]),
                   _value(sa, "pk-c", what, list[bytes]), _value(sa, "pk-s", what, list[bytes]))


@dataclass
class ShareReply:
    """The site's encrypted Shamir shares: `ct[k]` for the peer `to[k]`."""

    to: list[int]
    ct: list[bytes]

    def to_record(self) -> RecordDict:
        return RecordDict({SA: ConfigRecord({"to": list(self.to), "ct": list(self.ct)})})

    @classmethod
    def from_record(cls, content: RecordDict) -> "ShareReply":
        what = "a site's share reply"
        sa = _sa(content, what)
        return cls(_value(sa, "to", what, list[int]), _value(sa, "ct", what, list[bytes]))


@dataclass
class MaskedRequest:
    """Stage 3 (one message per upload part): the shares routed to this site, `ct[k]` from the peer `senders[k]`
    (first part only), and the elements [lo, hi) of w * d wanted (`span`; None: all of them)."""

    session: bytes
    span: tuple[int, int] | None = None
    senders: list[int] = field(default_factory=list)
    ct: list[bytes] = field(default_factory=list)

    def to_record(self) -> RecordDict:
        sa = {"session": self.session} | ({"from": list(self.senders), "ct": list(self.ct)} if self.senders else {})
        if self.span is not None:
            sa["span"] = [int(v) for v in self.span]
        return RecordDict({SA: ConfigRecord(sa)})

    @classmethod
    def from_record(cls, content: RecordDict) -> "MaskedRequest":
        what = "secure-aggregation masked request"
        sa = _sa(content, what)
        span = _value(sa, "span", what, list[int], None)
        return cls(_value(sa, "session", what, bytes), None if span is None else tuple(span),
                   _value(sa, "from", what, list[int], []), _value(sa, "ct", what, list[bytes], []))


@dataclass
class MaskedReply:
    """The masked ring chunks (named by their ring offset), each chunk's upload tag, and the clipping count."""

    masked: ArrayRecord
    offsets: list[int]
    tags: list[bytes]
    clipped: int
    elements: int

    def to_record(self) -> RecordDict:
        return RecordDict({MASKED: self.masked,
                           SA: ConfigRecord({"offsets": list(self.offsets), "tags": list(self.tags)}),
                           METRICS: MetricRecord({"clipped": self.clipped, "elements": self.elements})})

    @classmethod
    def from_record(cls, content: RecordDict) -> "MaskedReply":
        what = "a site's masked reply"
        sa, metrics = _sa(content, what), _record(content, METRICS, what, "metric")
        return cls(_record(content, MASKED, what, "array"), _value(sa, "offsets", what, list[int]),
                   _value(sa, "tags", what, list[bytes]), _value(metrics, "clipped", what, int),
                   _value(metrics, "elements", what, int, 0))


@dataclass
class UnmaskRequest:
    """Stage 4: the sites whose masked input is in the sum and those dropped."""

    session: bytes
    survivors: list[int]
    dropped: list[int]

    def to_record(self) -> RecordDict:
        return RecordDict({SA: ConfigRecord({"session": self.session, "survivors": list(self.survivors),
                                             "dropped": list(self.dropped)})})

    @classmethod
    def from_record(cls, content: RecordDict) -> "UnmaskRequest":
        what = "secure-aggregation unmask request"
        sa = _sa(content, what)
        return cls(_value(sa, "session", what, bytes), _value(sa, "survivors", what, list[int]),
                   _value(sa, "dropped", what, list[int]))


@dataclass
class UnmaskReply:
    """The shares that remove the masks: `shares[k]` of the peer `peers[k]`."""

    peers: list[int]
    shares: list[bytes]

    def to_record(self) -> RecordDict:
        return RecordDict({SA: ConfigRecord({"peers": list(self.peers), "shares": list(self.shares)})})

    @classmethod
    def from_record(cls, content: RecordDict) -> "UnmaskReply":
        what = "a site's unmask reply"
        sa = _sa(content, what)
        return cls(_value(sa, "peers", what, list[int]), _value(sa, "shares", what, list[bytes]))


def session_of(content: RecordDict) -> bytes:
    """The secure-aggregation session a stage 2-4 request is for."""
    return _value(_sa(content, "secure-aggregation request"), "session", "secure-aggregation request", bytes)
