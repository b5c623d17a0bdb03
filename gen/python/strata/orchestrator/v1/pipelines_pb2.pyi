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

class StepState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEP_STATE_UNSPECIFIED: _ClassVar[StepState]
    STEP_STATE_SUCCEEDED: _ClassVar[StepState]
    STEP_STATE_SKIPPED: _ClassVar[StepState]
    STEP_STATE_RECOVERED: _ClassVar[StepState]
    STEP_STATE_FAILED: _ClassVar[StepState]
STEP_STATE_UNSPECIFIED: StepState
STEP_STATE_SUCCEEDED: StepState
STEP_STATE_SKIPPED: StepState
STEP_STATE_RECOVERED: StepState
STEP_STATE_FAILED: StepState

class RunPipelineRequest(_message.Message):
    __slots__ = ("pipeline", "inputs", "request_id")
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    pipeline: str
    inputs: _struct_pb2.Struct
    request_id: str
    def __init__(self, pipeline: _Optional[str] = ..., inputs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("step", "state", "output", "usage", "cost", "duration", "error_reason")
    STEP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_REASON_FIELD_NUMBER: _ClassVar[int]
    step: str
    state: StepState
    output: _struct_pb2.Value
    usage: _common_pb2.Usage
    cost: _common_pb2.Cost
    duration: _duration_pb2.Duration
    error_reason: str
    def __init__(self, step: _Optional[str] = ..., state: _Optional[_Union[StepState, str]] = ..., output: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost: _Optional[_Union[_common_pb2.Cost, _Mapping]] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., error_reason: _Optional[str] = ...) -> None: ...

class RunPipelineResponse(_message.Message):
    __slots__ = ("request_id", "outputs", "steps", "usage", "cost")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    outputs: _struct_pb2.Struct
    steps: _containers.RepeatedCompositeFieldContainer[StepResult]
    usage: _common_pb2.Usage
    cost: _common_pb2.Cost
    def __init__(self, request_id: _Optional[str] = ..., outputs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., steps: _Optional[_Iterable[_Union[StepResult, _Mapping]]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., cost: _Optional[_Union[_common_pb2.Cost, _Mapping]] = ...) -> None: ...

class StreamPipelineRequest(_message.Message):
    __slots__ = ("pipeline", "inputs", "request_id")
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    pipeline: str
    inputs: _struct_pb2.Struct
    request_id: str
    def __init__(self, pipeline: _Optional[str] = ..., inputs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class StreamPipelineResponse(_message.Message):
    __slots__ = ("step", "result")
    STEP_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    step: StepResult
    result: RunPipelineResponse
    def __init__(self, step: _Optional[_Union[StepResult, _Mapping]] = ..., result: _Optional[_Union[RunPipelineResponse, _Mapping]] = ...) -> None: ...
