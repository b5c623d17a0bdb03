import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from strata.common.v1 import common_pb2 as _common_pb2
from strata.orchestrator.v1 import orchestrator_pb2 as _orchestrator_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetTraceRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class GetTraceResponse(_message.Message):
    __slots__ = ("record",)
    RECORD_FIELD_NUMBER: _ClassVar[int]
    record: RequestRecord
    def __init__(self, record: _Optional[_Union[RequestRecord, _Mapping]] = ...) -> None: ...

class RequestRecord(_message.Message):
    __slots__ = ("request_id", "tenant_id", "trace_id", "create_time", "model", "prompt", "request", "cache_status", "cache", "sources", "attempts", "outcome", "finish_reason", "output", "output_truncated", "usage", "cost", "stages", "latency")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CACHE_STATUS_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tenant_id: str
    trace_id: str
    create_time: _timestamp_pb2.Timestamp
    model: str
    prompt: _orchestrator_pb2.PromptInfo
    request: _orchestrator_pb2.GenerateRequest
    cache_status: _common_pb2.CacheStatus
    cache: CacheDecision
    sources: _containers.RepeatedCompositeFieldContainer[_orchestrator_pb2.Citation]
    attempts: _containers.RepeatedCompositeFieldContainer[AttemptRecord]
    outcome: str
    finish_reason: _common_pb2.FinishReason
    output: str
    output_truncated: bool
    usage: _common_pb2.Usage
    cost: _common_pb2.Cost
    stages: _containers.RepeatedCompositeFieldContainer[StageTiming]
    latency: _duration_pb2.Duration
    def __init__(self, request_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., trace_id: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model: _Optional[str] = ..., prompt: _Optional[_Union[_orchestrator_pb2.PromptInfo, _Mapping]] = ..., request: _Optional[_Union[_orchestrator_pb2.GenerateRequest, _Mapping]] = ..., cache_status: _Optional[_Union[_common_pb2.CacheStatus, str]] = ..., cache: _Optional[_Union[CacheDecision, _Mapping]] = ..., sources: _Optional[_Iterable[_Union[_orchestrator_pb2.Citation, _Mapping]]] = ..., attempts: _Optional[_Iterable[_Union[AttemptRecord, _Mapping]]] = ..., outcome: _Optional[str] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., output: _Optional[str] = ..., output_truncated: _Optional[bool] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost: _Optional[_Union[_common_pb2.Cost, _Mapping]] = ..., stages: _Optional[_Iterable[_Union[StageTiming, _Mapping]]] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class CacheDecision(_message.Message):
    __slots__ = ("match", "similarity")
    MATCH_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    match: _common_pb2.CacheMatch
    similarity: float
    def __init__(self, match: _Optional[_Union[_common_pb2.CacheMatch, str]] = ..., similarity: _Optional[float] = ...) -> None: ...

class AttemptRecord(_message.Message):
    __slots__ = ("model", "outcome", "latency", "time_to_first_token", "usage")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    model: str
    outcome: str
    latency: _duration_pb2.Duration
    time_to_first_token: _duration_pb2.Duration
    usage: _common_pb2.Usage
    def __init__(self, model: _Optional[str] = ..., outcome: _Optional[str] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., time_to_first_token: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...

class StageTiming(_message.Message):
    __slots__ = ("stage", "duration")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    stage: str
    duration: _duration_pb2.Duration
    def __init__(self, stage: _Optional[str] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...
