import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from strata.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DocumentRef(_message.Message):
    __slots__ = ("id", "version")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: str
    def __init__(self, id: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class SemanticPolicy(_message.Message):
    __slots__ = ("disabled", "min_similarity", "allow_high_temperature")
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    MIN_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    ALLOW_HIGH_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    disabled: bool
    min_similarity: float
    allow_high_temperature: bool
    def __init__(self, disabled: _Optional[bool] = ..., min_similarity: _Optional[float] = ..., allow_high_temperature: _Optional[bool] = ...) -> None: ...

class CacheScope(_message.Message):
    __slots__ = ("tenant_id", "model", "params", "documents", "semantic")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    model: str
    params: _common_pb2.GenerationParams
    documents: _containers.RepeatedCompositeFieldContainer[DocumentRef]
    semantic: SemanticPolicy
    def __init__(self, tenant_id: _Optional[str] = ..., model: _Optional[str] = ..., params: _Optional[_Union[_common_pb2.GenerationParams, _Mapping]] = ..., documents: _Optional[_Iterable[_Union[DocumentRef, _Mapping]]] = ..., semantic: _Optional[_Union[SemanticPolicy, _Mapping]] = ...) -> None: ...

class CachedAnswer(_message.Message):
    __slots__ = ("text", "finish_reason", "usage", "create_time", "request_id", "tool_calls")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    text: str
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    create_time: _timestamp_pb2.Timestamp
    request_id: str
    tool_calls: _containers.RepeatedCompositeFieldContainer[_common_pb2.ToolCall]
    def __init__(self, text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ..., tool_calls: _Optional[_Iterable[_Union[_common_pb2.ToolCall, _Mapping]]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("scope", "messages")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    scope: CacheScope
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    def __init__(self, scope: _Optional[_Union[CacheScope, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("match", "answer", "similarity", "rejected_by", "entry_id", "exact_key")
    MATCH_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    REJECTED_BY_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    EXACT_KEY_FIELD_NUMBER: _ClassVar[int]
    match: _common_pb2.CacheMatch
    answer: CachedAnswer
    similarity: float
    rejected_by: str
    entry_id: str
    exact_key: str
    def __init__(self, match: _Optional[_Union[_common_pb2.CacheMatch, str]] = ..., answer: _Optional[_Union[CachedAnswer, _Mapping]] = ..., similarity: _Optional[float] = ..., rejected_by: _Optional[str] = ..., entry_id: _Optional[str] = ..., exact_key: _Optional[str] = ...) -> None: ...

class StoreRequest(_message.Message):
    __slots__ = ("scope", "messages", "answer", "ttl")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    scope: CacheScope
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    answer: CachedAnswer
    ttl: _duration_pb2.Duration
    def __init__(self, scope: _Optional[_Union[CacheScope, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., answer: _Optional[_Union[CachedAnswer, _Mapping]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class StoreResponse(_message.Message):
    __slots__ = ("entry_id",)
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    def __init__(self, entry_id: _Optional[str] = ...) -> None: ...

class StoreBatchRequest(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[StoreRequest]
    def __init__(self, entries: _Optional[_Iterable[_Union[StoreRequest, _Mapping]]] = ...) -> None: ...

class StoreBatchResponse(_message.Message):
    __slots__ = ("entry_ids",)
    ENTRY_IDS_FIELD_NUMBER: _ClassVar[int]
    entry_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, entry_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AuditRequest(_message.Message):
    __slots__ = ("tenant_id", "entry_id", "answer_text")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TEXT_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    entry_id: str
    answer_text: str
    def __init__(self, tenant_id: _Optional[str] = ..., entry_id: _Optional[str] = ..., answer_text: _Optional[str] = ...) -> None: ...

class AuditResponse(_message.Message):
    __slots__ = ("agreed", "similarity")
    AGREED_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    agreed: bool
    similarity: float
    def __init__(self, agreed: _Optional[bool] = ..., similarity: _Optional[float] = ...) -> None: ...

class InvalidateRequest(_message.Message):
    __slots__ = ("request_id", "tenant_id", "model", "older_than", "document_id", "all")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OLDER_THAN_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tenant_id: str
    model: str
    older_than: _timestamp_pb2.Timestamp
    document_id: str
    all: bool
    def __init__(self, request_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., model: _Optional[str] = ..., older_than: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., document_id: _Optional[str] = ..., all: _Optional[bool] = ...) -> None: ...

class InvalidateResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    def __init__(self, removed: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("tenant_id",)
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    def __init__(self, tenant_id: _Optional[str] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("exact_hits", "semantic_hits", "misses", "stores", "entries", "guard_rejections", "audits", "audit_disagreements")
    class GuardRejectionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    EXACT_HITS_FIELD_NUMBER: _ClassVar[int]
    SEMANTIC_HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    STORES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    GUARD_REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    AUDITS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_DISAGREEMENTS_FIELD_NUMBER: _ClassVar[int]
    exact_hits: int
    semantic_hits: int
    misses: int
    stores: int
    entries: int
    guard_rejections: _containers.ScalarMap[str, int]
    audits: int
    audit_disagreements: int
    def __init__(self, exact_hits: _Optional[int] = ..., semantic_hits: _Optional[int] = ..., misses: _Optional[int] = ..., stores: _Optional[int] = ..., entries: _Optional[int] = ..., guard_rejections: _Optional[_Mapping[str, int]] = ..., audits: _Optional[int] = ..., audit_disagreements: _Optional[int] = ...) -> None: ...
