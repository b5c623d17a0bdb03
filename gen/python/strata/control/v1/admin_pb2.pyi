import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from strata.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ApiKeyState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    API_KEY_STATE_UNSPECIFIED: _ClassVar[ApiKeyState]
    API_KEY_STATE_ACTIVE: _ClassVar[ApiKeyState]
    API_KEY_STATE_REVOKED: _ClassVar[ApiKeyState]

class Scope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCOPE_UNSPECIFIED: _ClassVar[Scope]
    SCOPE_TENANT: _ClassVar[Scope]
    SCOPE_TEAM: _ClassVar[Scope]
    SCOPE_KEY: _ClassVar[Scope]
    SCOPE_MODEL: _ClassVar[Scope]

class Period(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PERIOD_UNSPECIFIED: _ClassVar[Period]
    PERIOD_DAY: _ClassVar[Period]
    PERIOD_MONTH: _ClassVar[Period]
    PERIOD_TOTAL: _ClassVar[Period]

class BreakerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BREAKER_STATE_UNSPECIFIED: _ClassVar[BreakerState]
    BREAKER_STATE_CLOSED: _ClassVar[BreakerState]
    BREAKER_STATE_OPEN: _ClassVar[BreakerState]
    BREAKER_STATE_HALF_OPEN: _ClassVar[BreakerState]
API_KEY_STATE_UNSPECIFIED: ApiKeyState
API_KEY_STATE_ACTIVE: ApiKeyState
API_KEY_STATE_REVOKED: ApiKeyState
SCOPE_UNSPECIFIED: Scope
SCOPE_TENANT: Scope
SCOPE_TEAM: Scope
SCOPE_KEY: Scope
SCOPE_MODEL: Scope
PERIOD_UNSPECIFIED: Period
PERIOD_DAY: Period
PERIOD_MONTH: Period
PERIOD_TOTAL: Period
BREAKER_STATE_UNSPECIFIED: BreakerState
BREAKER_STATE_CLOSED: BreakerState
BREAKER_STATE_OPEN: BreakerState
BREAKER_STATE_HALF_OPEN: BreakerState

class ApiKey(_message.Message):
    __slots__ = ("tenant_id", "key_id", "team_id", "state", "prefix", "create_time")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    key_id: str
    team_id: str
    state: ApiKeyState
    prefix: str
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, tenant_id: _Optional[str] = ..., key_id: _Optional[str] = ..., team_id: _Optional[str] = ..., state: _Optional[_Union[ApiKeyState, str]] = ..., prefix: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("request_id", "tenant_id", "key_id", "team_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tenant_id: str
    key_id: str
    team_id: str
    def __init__(self, request_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., key_id: _Optional[str] = ..., team_id: _Optional[str] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("api_key", "key")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    key: ApiKey
    def __init__(self, api_key: _Optional[str] = ..., key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ("tenant_id", "page_size", "page_token")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    page_size: int
    page_token: str
    def __init__(self, tenant_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("keys", "next_page_token")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    next_page_token: str
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("request_id", "tenant_id", "key_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tenant_id: str
    key_id: str
    def __init__(self, request_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class RevokeApiKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class SetBudgetRequest(_message.Message):
    __slots__ = ("request_id", "tenant_id", "scope", "scope_id", "period", "limit_usd_micros")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_ID_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    LIMIT_USD_MICROS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tenant_id: str
    scope: Scope
    scope_id: str
    period: Period
    limit_usd_micros: int
    def __init__(self, request_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., scope: _Optional[_Union[Scope, str]] = ..., scope_id: _Optional[str] = ..., period: _Optional[_Union[Period, str]] = ..., limit_usd_micros: _Optional[int] = ...) -> None: ...

class SetBudgetResponse(_message.Message):
    __slots__ = ("limit_usd_micros",)
    LIMIT_USD_MICROS_FIELD_NUMBER: _ClassVar[int]
    limit_usd_micros: int
    def __init__(self, limit_usd_micros: _Optional[int] = ...) -> None: ...

class SetLimitsRequest(_message.Message):
    __slots__ = ("request_id", "tenant_id", "scope", "scope_id", "requests_per_minute", "tokens_per_minute", "max_concurrent")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tenant_id: str
    scope: Scope
    scope_id: str
    requests_per_minute: int
    tokens_per_minute: int
    max_concurrent: int
    def __init__(self, request_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., scope: _Optional[_Union[Scope, str]] = ..., scope_id: _Optional[str] = ..., requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., max_concurrent: _Optional[int] = ...) -> None: ...

class SetLimitsResponse(_message.Message):
    __slots__ = ("requests_per_minute", "tokens_per_minute", "max_concurrent")
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    requests_per_minute: int
    tokens_per_minute: int
    max_concurrent: int
    def __init__(self, requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., max_concurrent: _Optional[int] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("tenant_id", "scope", "scope_id", "period")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_ID_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    scope: Scope
    scope_id: str
    period: Period
    def __init__(self, tenant_id: _Optional[str] = ..., scope: _Optional[_Union[Scope, str]] = ..., scope_id: _Optional[str] = ..., period: _Optional[_Union[Period, str]] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("requests", "usage", "spent_usd_micros", "reserved_usd_micros", "budget_usd_micros", "cache_hits")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SPENT_USD_MICROS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_USD_MICROS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_USD_MICROS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    requests: int
    usage: _common_pb2.Usage
    spent_usd_micros: int
    reserved_usd_micros: int
    budget_usd_micros: int
    cache_hits: int
    def __init__(self, requests: _Optional[int] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., spent_usd_micros: _Optional[int] = ..., reserved_usd_micros: _Optional[int] = ..., budget_usd_micros: _Optional[int] = ..., cache_hits: _Optional[int] = ...) -> None: ...

class Breaker(_message.Message):
    __slots__ = ("model", "state", "consecutive_failures", "open_until")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    OPEN_UNTIL_FIELD_NUMBER: _ClassVar[int]
    model: str
    state: BreakerState
    consecutive_failures: int
    open_until: _timestamp_pb2.Timestamp
    def __init__(self, model: _Optional[str] = ..., state: _Optional[_Union[BreakerState, str]] = ..., consecutive_failures: _Optional[int] = ..., open_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListBreakersRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListBreakersResponse(_message.Message):
    __slots__ = ("breakers", "next_page_token")
    BREAKERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    breakers: _containers.RepeatedCompositeFieldContainer[Breaker]
    next_page_token: str
    def __init__(self, breakers: _Optional[_Iterable[_Union[Breaker, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
