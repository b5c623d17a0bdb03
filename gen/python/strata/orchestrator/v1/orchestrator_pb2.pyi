from strata.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("model", "messages", "params", "request_id", "cache_policy", "priority", "max_cost_usd_micros")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CACHE_POLICY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_USD_MICROS_FIELD_NUMBER: _ClassVar[int]
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    params: _common_pb2.GenerationParams
    request_id: str
    cache_policy: _common_pb2.CachePolicy
    priority: _common_pb2.Priority
    max_cost_usd_micros: int
    def __init__(self, model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., params: _Optional[_Union[_common_pb2.GenerationParams, _Mapping]] = ..., request_id: _Optional[str] = ..., cache_policy: _Optional[_Union[_common_pb2.CachePolicy, _Mapping]] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ..., max_cost_usd_micros: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "model", "text", "finish_reason", "usage", "cost", "cache_status", "tool_calls", "cache_match")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    CACHE_STATUS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    CACHE_MATCH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    text: str
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    cost: _common_pb2.Cost
    cache_status: _common_pb2.CacheStatus
    tool_calls: _containers.RepeatedCompositeFieldContainer[_common_pb2.ToolCall]
    cache_match: _common_pb2.CacheMatch
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost: _Optional[_Union[_common_pb2.Cost, _Mapping]] = ..., cache_status: _Optional[_Union[_common_pb2.CacheStatus, str]] = ..., tool_calls: _Optional[_Iterable[_Union[_common_pb2.ToolCall, _Mapping]]] = ..., cache_match: _Optional[_Union[_common_pb2.CacheMatch, str]] = ...) -> None: ...

class StreamGenerateRequest(_message.Message):
    __slots__ = ("model", "messages", "params", "request_id", "cache_policy", "priority", "max_cost_usd_micros")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CACHE_POLICY_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_USD_MICROS_FIELD_NUMBER: _ClassVar[int]
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    params: _common_pb2.GenerationParams
    request_id: str
    cache_policy: _common_pb2.CachePolicy
    priority: _common_pb2.Priority
    max_cost_usd_micros: int
    def __init__(self, model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., params: _Optional[_Union[_common_pb2.GenerationParams, _Mapping]] = ..., request_id: _Optional[str] = ..., cache_policy: _Optional[_Union[_common_pb2.CachePolicy, _Mapping]] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ..., max_cost_usd_micros: _Optional[int] = ...) -> None: ...

class StreamGenerateResponse(_message.Message):
    __slots__ = ("start", "delta", "final")
    class Start(_message.Message):
        __slots__ = ("request_id", "model", "cache_status", "cache_match")
        REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
        MODEL_FIELD_NUMBER: _ClassVar[int]
        CACHE_STATUS_FIELD_NUMBER: _ClassVar[int]
        CACHE_MATCH_FIELD_NUMBER: _ClassVar[int]
        request_id: str
        model: str
        cache_status: _common_pb2.CacheStatus
        cache_match: _common_pb2.CacheMatch
        def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., cache_status: _Optional[_Union[_common_pb2.CacheStatus, str]] = ..., cache_match: _Optional[_Union[_common_pb2.CacheMatch, str]] = ...) -> None: ...
    class Delta(_message.Message):
        __slots__ = ("text", "tool_calls")
        TEXT_FIELD_NUMBER: _ClassVar[int]
        TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
        text: str
        tool_calls: _containers.RepeatedCompositeFieldContainer[_common_pb2.ToolCallDelta]
        def __init__(self, text: _Optional[str] = ..., tool_calls: _Optional[_Iterable[_Union[_common_pb2.ToolCallDelta, _Mapping]]] = ...) -> None: ...
    class Final(_message.Message):
        __slots__ = ("finish_reason", "usage", "cost", "cache_status")
        FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
        USAGE_FIELD_NUMBER: _ClassVar[int]
        COST_FIELD_NUMBER: _ClassVar[int]
        CACHE_STATUS_FIELD_NUMBER: _ClassVar[int]
        finish_reason: _common_pb2.FinishReason
        usage: _common_pb2.Usage
        cost: _common_pb2.Cost
        cache_status: _common_pb2.CacheStatus
        def __init__(self, finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost: _Optional[_Union[_common_pb2.Cost, _Mapping]] = ..., cache_status: _Optional[_Union[_common_pb2.CacheStatus, str]] = ...) -> None: ...
    START_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    start: StreamGenerateResponse.Start
    delta: StreamGenerateResponse.Delta
    final: StreamGenerateResponse.Final
    def __init__(self, start: _Optional[_Union[StreamGenerateResponse.Start, _Mapping]] = ..., delta: _Optional[_Union[StreamGenerateResponse.Delta, _Mapping]] = ..., final: _Optional[_Union[StreamGenerateResponse.Final, _Mapping]] = ...) -> None: ...
