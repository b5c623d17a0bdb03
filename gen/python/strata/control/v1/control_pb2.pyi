from strata.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_SUCCESS: _ClassVar[Outcome]
    OUTCOME_FAILURE: _ClassVar[Outcome]
    OUTCOME_CANCELLED: _ClassVar[Outcome]
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_SUCCESS: Outcome
OUTCOME_FAILURE: Outcome
OUTCOME_CANCELLED: Outcome

class AdmitRequest(_message.Message):
    __slots__ = ("request_id", "api_key", "model", "estimated_input_tokens", "max_output_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    api_key: str
    model: str
    estimated_input_tokens: int
    max_output_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., api_key: _Optional[str] = ..., model: _Optional[str] = ..., estimated_input_tokens: _Optional[int] = ..., max_output_tokens: _Optional[int] = ...) -> None: ...

class PlanCandidate(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class AdmitResponse(_message.Message):
    __slots__ = ("tenant_id", "key_id", "plan", "reserved_tokens")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    RESERVED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    key_id: str
    plan: _containers.RepeatedCompositeFieldContainer[PlanCandidate]
    reserved_tokens: int
    def __init__(self, tenant_id: _Optional[str] = ..., key_id: _Optional[str] = ..., plan: _Optional[_Iterable[_Union[PlanCandidate, _Mapping]]] = ..., reserved_tokens: _Optional[int] = ...) -> None: ...

class SettleRequest(_message.Message):
    __slots__ = ("request_id", "tenant_id", "key_id", "outcome", "model", "usage", "cost", "cache_status")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    CACHE_STATUS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tenant_id: str
    key_id: str
    outcome: Outcome
    model: str
    usage: _common_pb2.Usage
    cost: _common_pb2.Cost
    cache_status: _common_pb2.CacheStatus
    def __init__(self, request_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., key_id: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., model: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost: _Optional[_Union[_common_pb2.Cost, _Mapping]] = ..., cache_status: _Optional[_Union[_common_pb2.CacheStatus, str]] = ...) -> None: ...

class SettleResponse(_message.Message):
    __slots__ = ("applied",)
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    def __init__(self, applied: _Optional[bool] = ...) -> None: ...
