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

class FeatureSpec(_message.Message):
    __slots__ = ("kind", "dim")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    kind: str
    dim: int
    def __init__(self, kind: _Optional[str] = ..., dim: _Optional[int] = ...) -> None: ...

class Feature(_message.Message):
    __slots__ = ("kind", "values")
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    values: _tensor_pb2.Tensor
    def __init__(self, kind: _Optional[str] = ..., values: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class DescribePolicyRequest(_message.Message):
    __slots__ = ("policy",)
    POLICY_FIELD_NUMBER: _ClassVar[int]
    policy: str
    def __init__(self, policy: _Optional[str] = ...) -> None: ...

class DescribePolicyResponse(_message.Message):
    __slots__ = ("policy", "features", "policy_versions", "experiment", "cache_ttl_s", "fallback_reason")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    CACHE_TTL_S_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    policy: str
    features: _containers.RepeatedCompositeFieldContainer[FeatureSpec]
    policy_versions: _containers.RepeatedScalarFieldContainer[str]
    experiment: str
    cache_ttl_s: float
    fallback_reason: str
    def __init__(self, policy: _Optional[str] = ..., features: _Optional[_Iterable[_Union[FeatureSpec, _Mapping]]] = ..., policy_versions: _Optional[_Iterable[str]] = ..., experiment: _Optional[str] = ..., cache_ttl_s: _Optional[float] = ..., fallback_reason: _Optional[str] = ...) -> None: ...

class DecideRequest(_message.Message):
    __slots__ = ("session_id", "policy", "prompt_tokens", "default_block_size", "max_block_size", "prefill_features")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FEATURES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    policy: str
    prompt_tokens: int
    default_block_size: int
    max_block_size: int
    prefill_features: _containers.RepeatedCompositeFieldContainer[Feature]
    def __init__(self, session_id: _Optional[str] = ..., policy: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., default_block_size: _Optional[int] = ..., max_block_size: _Optional[int] = ..., prefill_features: _Optional[_Iterable[_Union[Feature, _Mapping]]] = ...) -> None: ...

class DecideResponse(_message.Message):
    __slots__ = ("block_size", "policy_version", "arm", "decision_id", "experiment", "fallback_reason")
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    block_size: int
    policy_version: str
    arm: str
    decision_id: str
    experiment: str
    fallback_reason: str
    def __init__(self, block_size: _Optional[int] = ..., policy_version: _Optional[str] = ..., arm: _Optional[str] = ..., decision_id: _Optional[str] = ..., experiment: _Optional[str] = ..., fallback_reason: _Optional[str] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("decision_id", "session_id", "policy_version", "arm", "block_size", "prompt_tokens", "generated_tokens", "acceptance_lengths", "decode_seconds", "finish_reason", "fallback_reason", "experiment")
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
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
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
    experiment: str
    def __init__(self, decision_id: _Optional[str] = ..., session_id: _Optional[str] = ..., policy_version: _Optional[str] = ..., arm: _Optional[str] = ..., block_size: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., acceptance_lengths: _Optional[_Iterable[int]] = ..., decode_seconds: _Optional[float] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., fallback_reason: _Optional[str] = ..., experiment: _Optional[str] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadFailure(_message.Message):
    __slots__ = ("policy_version", "error")
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    policy_version: str
    error: str
    def __init__(self, policy_version: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("loaded", "changed", "failures", "removed")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    loaded: _containers.RepeatedScalarFieldContainer[str]
    changed: _containers.RepeatedScalarFieldContainer[str]
    failures: _containers.RepeatedCompositeFieldContainer[LoadFailure]
    removed: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, loaded: _Optional[_Iterable[str]] = ..., changed: _Optional[_Iterable[str]] = ..., failures: _Optional[_Iterable[_Union[LoadFailure, _Mapping]]] = ..., removed: _Optional[_Iterable[str]] = ...) -> None: ...
