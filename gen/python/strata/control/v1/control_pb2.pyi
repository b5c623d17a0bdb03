import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from strata.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GuardrailAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GUARDRAIL_ACTION_UNSPECIFIED: _ClassVar[GuardrailAction]
    GUARDRAIL_ACTION_BLOCK: _ClassVar[GuardrailAction]
    GUARDRAIL_ACTION_REDACT: _ClassVar[GuardrailAction]
    GUARDRAIL_ACTION_FLAG: _ClassVar[GuardrailAction]

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_SUCCESS: _ClassVar[Outcome]
    OUTCOME_FAILURE: _ClassVar[Outcome]
    OUTCOME_CANCELLED: _ClassVar[Outcome]
GUARDRAIL_ACTION_UNSPECIFIED: GuardrailAction
GUARDRAIL_ACTION_BLOCK: GuardrailAction
GUARDRAIL_ACTION_REDACT: GuardrailAction
GUARDRAIL_ACTION_FLAG: GuardrailAction
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_SUCCESS: Outcome
OUTCOME_FAILURE: Outcome
OUTCOME_CANCELLED: Outcome

class AuthenticateRequest(_message.Message):
    __slots__ = ("api_key", "api_key_sha256")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    API_KEY_SHA256_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    api_key_sha256: str
    def __init__(self, api_key: _Optional[str] = ..., api_key_sha256: _Optional[str] = ...) -> None: ...

class AuthenticateResponse(_message.Message):
    __slots__ = ("tenant_id", "key_id", "team_id", "tier")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    key_id: str
    team_id: str
    tier: str
    def __init__(self, tenant_id: _Optional[str] = ..., key_id: _Optional[str] = ..., team_id: _Optional[str] = ..., tier: _Optional[str] = ...) -> None: ...

class AdmitRequest(_message.Message):
    __slots__ = ("request_id", "api_key", "model", "estimated_input_tokens", "max_output_tokens", "priority", "max_cost_usd_micros", "candidates", "messages", "guardrail_profile", "api_key_sha256")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_USD_MICROS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    GUARDRAIL_PROFILE_FIELD_NUMBER: _ClassVar[int]
    API_KEY_SHA256_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    api_key: str
    model: str
    estimated_input_tokens: int
    max_output_tokens: int
    priority: _common_pb2.Priority
    max_cost_usd_micros: int
    candidates: _containers.RepeatedScalarFieldContainer[str]
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    guardrail_profile: str
    api_key_sha256: str
    def __init__(self, request_id: _Optional[str] = ..., api_key: _Optional[str] = ..., model: _Optional[str] = ..., estimated_input_tokens: _Optional[int] = ..., max_output_tokens: _Optional[int] = ..., priority: _Optional[_Union[_common_pb2.Priority, str]] = ..., max_cost_usd_micros: _Optional[int] = ..., candidates: _Optional[_Iterable[str]] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., guardrail_profile: _Optional[str] = ..., api_key_sha256: _Optional[str] = ...) -> None: ...

class PlanCandidate(_message.Message):
    __slots__ = ("model", "probe")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    model: str
    probe: bool
    def __init__(self, model: _Optional[str] = ..., probe: _Optional[bool] = ...) -> None: ...

class GuardrailFinding(_message.Message):
    __slots__ = ("rule", "action", "message_index")
    RULE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    rule: str
    action: GuardrailAction
    message_index: int
    def __init__(self, rule: _Optional[str] = ..., action: _Optional[_Union[GuardrailAction, str]] = ..., message_index: _Optional[int] = ...) -> None: ...

class AdmitResponse(_message.Message):
    __slots__ = ("tenant_id", "key_id", "plan", "reserved_tokens", "reserved_usd_micros", "team_id", "guardrail_findings", "redacted_messages", "guardrail_profile", "admission")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    RESERVED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_USD_MICROS_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    GUARDRAIL_FINDINGS_FIELD_NUMBER: _ClassVar[int]
    REDACTED_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    GUARDRAIL_PROFILE_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    key_id: str
    plan: _containers.RepeatedCompositeFieldContainer[PlanCandidate]
    reserved_tokens: int
    reserved_usd_micros: int
    team_id: str
    guardrail_findings: _containers.RepeatedCompositeFieldContainer[GuardrailFinding]
    redacted_messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    guardrail_profile: str
    admission: int
    def __init__(self, tenant_id: _Optional[str] = ..., key_id: _Optional[str] = ..., plan: _Optional[_Iterable[_Union[PlanCandidate, _Mapping]]] = ..., reserved_tokens: _Optional[int] = ..., reserved_usd_micros: _Optional[int] = ..., team_id: _Optional[str] = ..., guardrail_findings: _Optional[_Iterable[_Union[GuardrailFinding, _Mapping]]] = ..., redacted_messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., guardrail_profile: _Optional[str] = ..., admission: _Optional[int] = ...) -> None: ...

class SettleRequest(_message.Message):
    __slots__ = ("request_id", "tenant_id", "key_id", "outcome", "model", "usage", "cost", "cache_status", "team_id", "attempts", "guardrail_findings", "admission")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    CACHE_STATUS_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    GUARDRAIL_FINDINGS_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tenant_id: str
    key_id: str
    outcome: Outcome
    model: str
    usage: _common_pb2.Usage
    cost: _common_pb2.Cost
    cache_status: _common_pb2.CacheStatus
    team_id: str
    attempts: _containers.RepeatedCompositeFieldContainer[Attempt]
    guardrail_findings: _containers.RepeatedCompositeFieldContainer[GuardrailFinding]
    admission: int
    def __init__(self, request_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., key_id: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., model: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost: _Optional[_Union[_common_pb2.Cost, _Mapping]] = ..., cache_status: _Optional[_Union[_common_pb2.CacheStatus, str]] = ..., team_id: _Optional[str] = ..., attempts: _Optional[_Iterable[_Union[Attempt, _Mapping]]] = ..., guardrail_findings: _Optional[_Iterable[_Union[GuardrailFinding, _Mapping]]] = ..., admission: _Optional[int] = ...) -> None: ...

class Attempt(_message.Message):
    __slots__ = ("model", "success", "error_reason", "latency", "usage")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_REASON_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    model: str
    success: bool
    error_reason: str
    latency: _duration_pb2.Duration
    usage: _common_pb2.Usage
    def __init__(self, model: _Optional[str] = ..., success: _Optional[bool] = ..., error_reason: _Optional[str] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...

class CheckOutputRequest(_message.Message):
    __slots__ = ("request_id", "tenant_id", "text", "guardrail_profile")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    GUARDRAIL_PROFILE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tenant_id: str
    text: str
    guardrail_profile: str
    def __init__(self, request_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., text: _Optional[str] = ..., guardrail_profile: _Optional[str] = ...) -> None: ...

class CheckOutputResponse(_message.Message):
    __slots__ = ("blocked", "findings", "redacted_text")
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    REDACTED_TEXT_FIELD_NUMBER: _ClassVar[int]
    blocked: bool
    findings: _containers.RepeatedCompositeFieldContainer[GuardrailFinding]
    redacted_text: str
    def __init__(self, blocked: _Optional[bool] = ..., findings: _Optional[_Iterable[_Union[GuardrailFinding, _Mapping]]] = ..., redacted_text: _Optional[str] = ...) -> None: ...

class SettleResponse(_message.Message):
    __slots__ = ("applied",)
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    def __init__(self, applied: _Optional[bool] = ...) -> None: ...

class SettleBatchRequest(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[SettleBatchEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[SettleBatchEntry, _Mapping]]] = ...) -> None: ...

class SettleBatchEntry(_message.Message):
    __slots__ = ("settlement", "traceparent")
    SETTLEMENT_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    settlement: SettleRequest
    traceparent: str
    def __init__(self, settlement: _Optional[_Union[SettleRequest, _Mapping]] = ..., traceparent: _Optional[str] = ...) -> None: ...

class SettleBatchResponse(_message.Message):
    __slots__ = ("applied",)
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    applied: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, applied: _Optional[_Iterable[bool]] = ...) -> None: ...
