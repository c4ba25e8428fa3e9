from blockpilot.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("has_drafter", "block_size", "max_block_size", "target_layer_ids", "feature_size", "vocab_size", "drafter_name", "replica_id", "advertise_address", "chat_template_kwargs")
    HAS_DRAFTER_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TARGET_LAYER_IDS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_KWARGS_FIELD_NUMBER: _ClassVar[int]
    has_drafter: bool
    block_size: int
    max_block_size: int
    target_layer_ids: _containers.RepeatedScalarFieldContainer[int]
    feature_size: int
    vocab_size: int
    drafter_name: str
    replica_id: str
    advertise_address: str
    chat_template_kwargs: _struct_pb2.Struct
    def __init__(self, has_drafter: _Optional[bool] = ..., block_size: _Optional[int] = ..., max_block_size: _Optional[int] = ..., target_layer_ids: _Optional[_Iterable[int]] = ..., feature_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., drafter_name: _Optional[str] = ..., replica_id: _Optional[str] = ..., advertise_address: _Optional[str] = ..., chat_template_kwargs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class DraftRequest(_message.Message):
    __slots__ = ("open", "context", "step")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    open: DraftOpen
    context: ContextChunk
    step: DraftStep
    def __init__(self, open: _Optional[_Union[DraftOpen, _Mapping]] = ..., context: _Optional[_Union[ContextChunk, _Mapping]] = ..., step: _Optional[_Union[DraftStep, _Mapping]] = ...) -> None: ...

class DraftOpen(_message.Message):
    __slots__ = ("session_id", "capacity", "target_layer_ids", "cache_tag", "resume_tag", "resume_length")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    TARGET_LAYER_IDS_FIELD_NUMBER: _ClassVar[int]
    CACHE_TAG_FIELD_NUMBER: _ClassVar[int]
    RESUME_TAG_FIELD_NUMBER: _ClassVar[int]
    RESUME_LENGTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    capacity: int
    target_layer_ids: _containers.RepeatedScalarFieldContainer[int]
    cache_tag: str
    resume_tag: str
    resume_length: int
    def __init__(self, session_id: _Optional[str] = ..., capacity: _Optional[int] = ..., target_layer_ids: _Optional[_Iterable[int]] = ..., cache_tag: _Optional[str] = ..., resume_tag: _Optional[str] = ..., resume_length: _Optional[int] = ...) -> None: ...

class ContextChunk(_message.Message):
    __slots__ = ("start", "features")
    START_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    start: int
    features: _tensor_pb2.Tensor
    def __init__(self, start: _Optional[int] = ..., features: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class DraftStep(_message.Message):
    __slots__ = ("step", "anchor", "start", "num_draft", "temperature", "sample", "uniforms")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAFT_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    UNIFORMS_FIELD_NUMBER: _ClassVar[int]
    step: int
    anchor: int
    start: int
    num_draft: int
    temperature: float
    sample: bool
    uniforms: _tensor_pb2.Tensor
    def __init__(self, step: _Optional[int] = ..., anchor: _Optional[int] = ..., start: _Optional[int] = ..., num_draft: _Optional[int] = ..., temperature: _Optional[float] = ..., sample: _Optional[bool] = ..., uniforms: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class DraftResponse(_message.Message):
    __slots__ = ("opened", "block")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    opened: DraftOpened
    block: DraftBlock
    def __init__(self, opened: _Optional[_Union[DraftOpened, _Mapping]] = ..., block: _Optional[_Union[DraftBlock, _Mapping]] = ...) -> None: ...

class DraftOpened(_message.Message):
    __slots__ = ("replica_id", "capacity", "context_length", "advertise_address")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    capacity: int
    context_length: int
    advertise_address: str
    def __init__(self, replica_id: _Optional[str] = ..., capacity: _Optional[int] = ..., context_length: _Optional[int] = ..., advertise_address: _Optional[str] = ...) -> None: ...

class DraftBlock(_message.Message):
    __slots__ = ("step", "tokens", "probs", "probs_row", "final", "cache_length")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    PROBS_ROW_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    CACHE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    step: int
    tokens: _tensor_pb2.Tensor
    probs: _tensor_pb2.Tensor
    probs_row: int
    final: bool
    cache_length: int
    def __init__(self, step: _Optional[int] = ..., tokens: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., probs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., probs_row: _Optional[int] = ..., final: _Optional[bool] = ..., cache_length: _Optional[int] = ...) -> None: ...
