from blockpilot.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason

class DecideRequest(_message.Message):
    __slots__ = ("session_id", "policy", "features", "prompt_tokens", "default_block_size", "max_block_size")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    policy: str
    features: _tensor_pb2.Tensor
    prompt_tokens: int
    default_block_size: int
    max_block_size: int
    def __init__(self, session_id: _Optional[str] = ..., policy: _Optional[str] = ..., features: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., default_block_size: _Optional[int] = ..., max_block_size: _Optional[int] = ...) -> None: ...

class DecideResponse(_message.Message):
    __slots__ = ("block_size", "policy_version", "arm", "decision_id")
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    block_size: int
    policy_version: str
    arm: str
    decision_id: str
    def __init__(self, block_size: _Optional[int] = ..., policy_version: _Optional[str] = ..., arm: _Optional[str] = ..., decision_id: _Optional[str] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("decision_id", "session_id", "policy_version", "arm", "block_size", "prompt_tokens", "generated_tokens", "acceptance_lengths", "decode_seconds", "finish_reason", "fallback_reason")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    session_id: str
    policy_version: str
    arm: str
    block_size: int
    prompt_tokens: int
    generated_tokens: int
    acceptance_lengths: _containers.RepeatedScalarFieldContainer[int]
    decode_seconds: float
    finish_reason: FinishReason
    fallback_reason: str
    def __init__(self, decision_id: _Optional[str] = ..., session_id: _Optional[str] = ..., policy_version: _Optional[str] = ..., arm: _Optional[str] = ..., block_size: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., acceptance_lengths: _Optional[_Iterable[int]] = ..., decode_seconds: _Optional[float] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., fallback_reason: _Optional[str] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
