from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatusRequest(_message.Message):
    __slots__ = ("verify",)
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    verify: bool
    def __init__(self, verify: _Optional[bool] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("version", "store", "schema_version", "runs_by_status", "artefacts", "artefact_bytes", "verified", "problems")
    class RunsByStatusEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUNS_BY_STATUS_FIELD_NUMBER: _ClassVar[int]
    ARTEFACTS_FIELD_NUMBER: _ClassVar[int]
    ARTEFACT_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    version: str
    store: str
    schema_version: int
    runs_by_status: _containers.ScalarMap[str, int]
    artefacts: int
    artefact_bytes: int
    verified: bool
    problems: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[str] = ..., store: _Optional[str] = ..., schema_version: _Optional[int] = ..., runs_by_status: _Optional[_Mapping[str, int]] = ..., artefacts: _Optional[int] = ..., artefact_bytes: _Optional[int] = ..., verified: _Optional[bool] = ..., problems: _Optional[_Iterable[str]] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[Run]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[Run, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class Site(_message.Message):
    __slots__ = ("site", "domain", "examples", "tokens", "heldout_examples", "train_loss", "vector_stored")
    SITE_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    VECTOR_STORED_FIELD_NUMBER: _ClassVar[int]
    site: str
    domain: str
    examples: int
    tokens: int
    heldout_examples: int
    train_loss: float
    vector_stored: bool
    def __init__(self, site: _Optional[str] = ..., domain: _Optional[str] = ..., examples: _Optional[int] = ..., tokens: _Optional[int] = ..., heldout_examples: _Optional[int] = ..., train_loss: _Optional[float] = ..., vector_stored: _Optional[bool] = ...) -> None: ...

class Weight(_message.Message):
    __slots__ = ("round", "site", "weight")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    round: int
    site: str
    weight: float
    def __init__(self, round: _Optional[int] = ..., site: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class Metric(_message.Message):
    __slots__ = ("round", "stage", "domain", "name", "value")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    round: int
    stage: str
    domain: str
    name: str
    value: float
    def __init__(self, round: _Optional[int] = ..., stage: _Optional[str] = ..., domain: _Optional[str] = ..., name: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class Artefact(_message.Message):
    __slots__ = ("name", "kind", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class Run(_message.Message):
    __slots__ = ("run_id", "status", "reason", "kind", "parent_run", "flower_run_id", "created", "ended", "aggregation", "weighting", "base_ref", "base_checksum", "base_parameters", "out_dir", "config_json", "remergeable", "has_model", "sites", "weights", "metrics", "artefacts")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARENT_RUN_FIELD_NUMBER: _ClassVar[int]
    FLOWER_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTING_FIELD_NUMBER: _ClassVar[int]
    BASE_REF_FIELD_NUMBER: _ClassVar[int]
    BASE_CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    BASE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    OUT_DIR_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    REMERGEABLE_FIELD_NUMBER: _ClassVar[int]
    HAS_MODEL_FIELD_NUMBER: _ClassVar[int]
    SITES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    ARTEFACTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    status: str
    reason: str
    kind: str
    parent_run: str
    flower_run_id: int
    created: float
    ended: float
    aggregation: str
    weighting: str
    base_ref: str
    base_checksum: str
    base_parameters: int
    out_dir: str
    config_json: str
    remergeable: bool
    has_model: bool
    sites: _containers.RepeatedCompositeFieldContainer[Site]
    weights: _containers.RepeatedCompositeFieldContainer[Weight]
    metrics: _containers.RepeatedCompositeFieldContainer[Metric]
    artefacts: _containers.RepeatedCompositeFieldContainer[Artefact]
    def __init__(self, run_id: _Optional[str] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ..., kind: _Optional[str] = ..., parent_run: _Optional[str] = ..., flower_run_id: _Optional[int] = ..., created: _Optional[float] = ..., ended: _Optional[float] = ..., aggregation: _Optional[str] = ..., weighting: _Optional[str] = ..., base_ref: _Optional[str] = ..., base_checksum: _Optional[str] = ..., base_parameters: _Optional[int] = ..., out_dir: _Optional[str] = ..., config_json: _Optional[str] = ..., remergeable: _Optional[bool] = ..., has_model: _Optional[bool] = ..., sites: _Optional[_Iterable[_Union[Site, _Mapping]]] = ..., weights: _Optional[_Iterable[_Union[Weight, _Mapping]]] = ..., metrics: _Optional[_Iterable[_Union[Metric, _Mapping]]] = ..., artefacts: _Optional[_Iterable[_Union[Artefact, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("run_id", "kind", "parent_run", "aggregation", "weights", "size", "remergeable", "created")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARENT_RUN_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    REMERGEABLE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    kind: str
    parent_run: str
    aggregation: str
    weights: _containers.RepeatedCompositeFieldContainer[Weight]
    size: int
    remergeable: bool
    created: float
    def __init__(self, run_id: _Optional[str] = ..., kind: _Optional[str] = ..., parent_run: _Optional[str] = ..., aggregation: _Optional[str] = ..., weights: _Optional[_Iterable[_Union[Weight, _Mapping]]] = ..., size: _Optional[int] = ..., remergeable: _Optional[bool] = ..., created: _Optional[float] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "next_page_token")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    next_page_token: str
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ExportModelRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("path", "offset", "data", "size", "sha256", "last")
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    path: str
    offset: int
    data: bytes
    size: int
    sha256: str
    last: bool
    def __init__(self, path: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., last: _Optional[bool] = ...) -> None: ...

class RemergeModelRequest(_message.Message):
    __slots__ = ("run_id", "weights")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    weights: _containers.ScalarMap[str, float]
    def __init__(self, run_id: _Optional[str] = ..., weights: _Optional[_Mapping[str, float]] = ...) -> None: ...

class EvaluateModelRequest(_message.Message):
    __slots__ = ("run_id", "data")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    data: str
    def __init__(self, run_id: _Optional[str] = ..., data: _Optional[str] = ...) -> None: ...

class DomainLoss(_message.Message):
    __slots__ = ("domain", "loss", "perplexity", "tokens")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    domain: str
    loss: float
    perplexity: float
    tokens: int
    def __init__(self, domain: _Optional[str] = ..., loss: _Optional[float] = ..., perplexity: _Optional[float] = ..., tokens: _Optional[int] = ...) -> None: ...

class EvaluateModelResponse(_message.Message):
    __slots__ = ("run_id", "data", "results")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    data: str
    results: _containers.RepeatedCompositeFieldContainer[DomainLoss]
    def __init__(self, run_id: _Optional[str] = ..., data: _Optional[str] = ..., results: _Optional[_Iterable[_Union[DomainLoss, _Mapping]]] = ...) -> None: ...

class RankPoolRequest(_message.Message):
    __slots__ = ("run_id", "candidates", "data")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    candidates: str
    data: str
    def __init__(self, run_id: _Optional[str] = ..., candidates: _Optional[str] = ..., data: _Optional[str] = ...) -> None: ...

class PoolCandidate(_message.Message):
    __slots__ = ("sites", "mean_loss", "loss", "error")
    class LossEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SITES_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOSS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    sites: _containers.RepeatedScalarFieldContainer[str]
    mean_loss: float
    loss: _containers.ScalarMap[str, float]
    error: str
    def __init__(self, sites: _Optional[_Iterable[str]] = ..., mean_loss: _Optional[float] = ..., loss: _Optional[_Mapping[str, float]] = ..., error: _Optional[str] = ...) -> None: ...

class RankPoolResponse(_message.Message):
    __slots__ = ("run_id", "data", "ranking")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    RANKING_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    data: str
    ranking: _containers.RepeatedCompositeFieldContainer[PoolCandidate]
    def __init__(self, run_id: _Optional[str] = ..., data: _Optional[str] = ..., ranking: _Optional[_Iterable[_Union[PoolCandidate, _Mapping]]] = ...) -> None: ...

class DeleteRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class DeleteRunResponse(_message.Message):
    __slots__ = ("run_id", "status", "artefacts", "bytes")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ARTEFACTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    status: str
    artefacts: int
    bytes: int
    def __init__(self, run_id: _Optional[str] = ..., status: _Optional[str] = ..., artefacts: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class BeginRunRequest(_message.Message):
    __slots__ = ("config_json", "flower_run_id", "writer")
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    FLOWER_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    WRITER_FIELD_NUMBER: _ClassVar[int]
    config_json: str
    flower_run_id: int
    writer: str
    def __init__(self, config_json: _Optional[str] = ..., flower_run_id: _Optional[int] = ..., writer: _Optional[str] = ...) -> None: ...

class ArtefactHeader(_message.Message):
    __slots__ = ("run_id", "name", "kind", "size", "sha256")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    name: str
    kind: str
    size: int
    sha256: str
    def __init__(self, run_id: _Optional[str] = ..., name: _Optional[str] = ..., kind: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class PutArtefactRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ArtefactHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ArtefactHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class FinishRunRequest(_message.Message):
    __slots__ = ("run_id", "report_json", "out_dir")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    OUT_DIR_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    report_json: str
    out_dir: str
    def __init__(self, run_id: _Optional[str] = ..., report_json: _Optional[str] = ..., out_dir: _Optional[str] = ...) -> None: ...

class FailRunRequest(_message.Message):
    __slots__ = ("run_id", "reason")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    reason: str
    def __init__(self, run_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...
