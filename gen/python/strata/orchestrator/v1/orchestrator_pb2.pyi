import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from strata.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RetrievalFailurePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RETRIEVAL_FAILURE_POLICY_UNSPECIFIED: _ClassVar[RetrievalFailurePolicy]
    RETRIEVAL_FAILURE_POLICY_FAIL: _ClassVar[RetrievalFailurePolicy]
    RETRIEVAL_FAILURE_POLICY_ANSWER_WITHOUT_CONTEXT: _ClassVar[RetrievalFailurePolicy]
RETRIEVAL_FAILURE_POLICY_UNSPECIFIED: RetrievalFailurePolicy
RETRIEVAL_FAILURE_POLICY_FAIL: RetrievalFailurePolicy
RETRIEVAL_FAILURE_POLICY_ANSWER_WITHOUT_CONTEXT: RetrievalFailurePolicy

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "routes")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ROUTES_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    routes: _containers.RepeatedCompositeFieldContainer[RouteInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., routes: _Optional[_Iterable[_Union[RouteInfo, _Mapping]]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "kind", "context_window", "max_output_tokens")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    context_window: int
    max_output_tokens: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., context_window: _Optional[int] = ..., max_output_tokens: _Optional[int] = ...) -> None: ...

class RouteInfo(_message.Message):
    __slots__ = ("name", "policy", "candidates")
    NAME_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    name: str
    policy: str
    candidates: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., policy: _Optional[str] = ..., candidates: _Optional[_Iterable[str]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("model", "inputs", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("request_id", "model", "embeddings", "usage", "cost")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    embeddings: _containers.RepeatedCompositeFieldContainer[Embedding]
    usage: _common_pb2.Usage
    cost: _common_pb2.Cost
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., embeddings: _Optional[_Iterable[_Union[Embedding, _Mapping]]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost: _Optional[_Union[_common_pb2.Cost, _Mapping]] = ...) -> None: ...

class Embedding(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "messages", "params", "request_id", "cache_policy", "priority", "max_cost_usd_micros", "route", "tags", "template", "retrieval")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CACHE_POLICY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_USD_MICROS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    params: _common_pb2.GenerationParams
    request_id: str
    cache_policy: _common_pb2.CachePolicy
    priority: _common_pb2.Priority
    max_cost_usd_micros: int
    route: str
    tags: _containers.ScalarMap[str, str]
    template: TemplateRef
    retrieval: RetrievalSettings
    def __init__(self, model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., params: _Optional[_Union[_common_pb2.GenerationParams, _Mapping]] = ..., request_id: _Optional[str] = ..., cache_policy: _Optional[_Union[_common_pb2.CachePolicy, _Mapping]] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ..., max_cost_usd_micros: _Optional[int] = ..., route: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., template: _Optional[_Union[TemplateRef, _Mapping]] = ..., retrieval: _Optional[_Union[RetrievalSettings, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "model", "text", "finish_reason", "usage", "cost", "cache_status", "tool_calls", "cache_match", "citations", "prompt", "retrieval_degraded")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    CACHE_STATUS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    CACHE_MATCH_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_DEGRADED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    text: str
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    cost: _common_pb2.Cost
    cache_status: _common_pb2.CacheStatus
    tool_calls: _containers.RepeatedCompositeFieldContainer[_common_pb2.ToolCall]
    cache_match: _common_pb2.CacheMatch
    citations: _containers.RepeatedCompositeFieldContainer[Citation]
    prompt: PromptInfo
    retrieval_degraded: bool
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost: _Optional[_Union[_common_pb2.Cost, _Mapping]] = ..., cache_status: _Optional[_Union[_common_pb2.CacheStatus, str]] = ..., tool_calls: _Optional[_Iterable[_Union[_common_pb2.ToolCall, _Mapping]]] = ..., cache_match: _Optional[_Union[_common_pb2.CacheMatch, str]] = ..., citations: _Optional[_Iterable[_Union[Citation, _Mapping]]] = ..., prompt: _Optional[_Union[PromptInfo, _Mapping]] = ..., retrieval_degraded: _Optional[bool] = ...) -> None: ...

class TemplateRef(_message.Message):
    __slots__ = ("name", "version", "variables")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VARIABLES_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    variables: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., variables: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class RetrievalSettings(_message.Message):
    __slots__ = ("collection", "top_k", "min_score", "max_age", "metadata_filter", "on_failure")
    class MetadataFilterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    MAX_AGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FILTER_FIELD_NUMBER: _ClassVar[int]
    ON_FAILURE_FIELD_NUMBER: _ClassVar[int]
    collection: str
    top_k: int
    min_score: float
    max_age: _duration_pb2.Duration
    metadata_filter: _containers.ScalarMap[str, str]
    on_failure: RetrievalFailurePolicy
    def __init__(self, collection: _Optional[str] = ..., top_k: _Optional[int] = ..., min_score: _Optional[float] = ..., max_age: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., metadata_filter: _Optional[_Mapping[str, str]] = ..., on_failure: _Optional[_Union[RetrievalFailurePolicy, str]] = ...) -> None: ...

class Citation(_message.Message):
    __slots__ = ("document_id", "version", "chunk", "score")
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    document_id: str
    version: str
    chunk: int
    score: float
    def __init__(self, document_id: _Optional[str] = ..., version: _Optional[str] = ..., chunk: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class PromptInfo(_message.Message):
    __slots__ = ("route", "template", "prompt_hash")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_HASH_FIELD_NUMBER: _ClassVar[int]
    route: str
    template: str
    prompt_hash: str
    def __init__(self, route: _Optional[str] = ..., template: _Optional[str] = ..., prompt_hash: _Optional[str] = ...) -> None: ...

class StreamGenerateRequest(_message.Message):
    __slots__ = ("model", "messages", "params", "request_id", "cache_policy", "priority", "max_cost_usd_micros", "route", "tags", "template", "retrieval")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CACHE_POLICY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_USD_MICROS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    RETRIEVAL_FIELD_NUMBER: _ClassVar[int]
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    params: _common_pb2.GenerationParams
    request_id: str
    cache_policy: _common_pb2.CachePolicy
    priority: _common_pb2.Priority
    max_cost_usd_micros: int
    route: str
    tags: _containers.ScalarMap[str, str]
    template: TemplateRef
    retrieval: RetrievalSettings
    def __init__(self, model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., params: _Optional[_Union[_common_pb2.GenerationParams, _Mapping]] = ..., request_id: _Optional[str] = ..., cache_policy: _Optional[_Union[_common_pb2.CachePolicy, _Mapping]] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ..., max_cost_usd_micros: _Optional[int] = ..., route: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., template: _Optional[_Union[TemplateRef, _Mapping]] = ..., retrieval: _Optional[_Union[RetrievalSettings, _Mapping]] = ...) -> None: ...

class StreamGenerateResponse(_message.Message):
    __slots__ = ("start", "delta", "final")
    class Start(_message.Message):
        __slots__ = ("request_id", "model", "cache_status", "cache_match", "prompt")
        REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
        MODEL_FIELD_NUMBER: _ClassVar[int]
        CACHE_STATUS_FIELD_NUMBER: _ClassVar[int]
        CACHE_MATCH_FIELD_NUMBER: _ClassVar[int]
        PROMPT_FIELD_NUMBER: _ClassVar[int]
        request_id: str
        model: str
        cache_status: _common_pb2.CacheStatus
        cache_match: _common_pb2.CacheMatch
        prompt: PromptInfo
        def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., cache_status: _Optional[_Union[_common_pb2.CacheStatus, str]] = ..., cache_match: _Optional[_Union[_common_pb2.CacheMatch, str]] = ..., prompt: _Optional[_Union[PromptInfo, _Mapping]] = ...) -> None: ...
    class Delta(_message.Message):
        __slots__ = ("text", "tool_calls")
        TEXT_FIELD_NUMBER: _ClassVar[int]
        TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
        text: str
        tool_calls: _containers.RepeatedCompositeFieldContainer[_common_pb2.ToolCallDelta]
        def __init__(self, text: _Optional[str] = ..., tool_calls: _Optional[_Iterable[_Union[_common_pb2.ToolCallDelta, _Mapping]]] = ...) -> None: ...
    class Final(_message.Message):
        __slots__ = ("finish_reason", "usage", "cost", "cache_status", "citations", "retrieval_degraded")
        FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
        USAGE_FIELD_NUMBER: _ClassVar[int]
        COST_FIELD_NUMBER: _ClassVar[int]
        CACHE_STATUS_FIELD_NUMBER: _ClassVar[int]
        CITATIONS_FIELD_NUMBER: _ClassVar[int]
        RETRIEVAL_DEGRADED_FIELD_NUMBER: _ClassVar[int]
        finish_reason: _common_pb2.FinishReason
        usage: _common_pb2.Usage
        cost: _common_pb2.Cost
        cache_status: _common_pb2.CacheStatus
        citations: _containers.RepeatedCompositeFieldContainer[Citation]
        retrieval_degraded: bool
        def __init__(self, finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost: _Optional[_Union[_common_pb2.Cost, _Mapping]] = ..., cache_status: _Optional[_Union[_common_pb2.CacheStatus, str]] = ..., citations: _Optional[_Iterable[_Union[Citation, _Mapping]]] = ..., retrieval_degraded: _Optional[bool] = ...) -> None: ...
    START_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    start: StreamGenerateResponse.Start
    delta: StreamGenerateResponse.Delta
    final: StreamGenerateResponse.Final
    def __init__(self, start: _Optional[_Union[StreamGenerateResponse.Start, _Mapping]] = ..., delta: _Optional[_Union[StreamGenerateResponse.Delta, _Mapping]] = ..., final: _Optional[_Union[StreamGenerateResponse.Final, _Mapping]] = ...) -> None: ...
