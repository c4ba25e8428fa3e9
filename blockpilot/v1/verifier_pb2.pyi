from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DraftSampling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DRAFT_SAMPLING_UNSPECIFIED: _ClassVar[DraftSampling]
    DRAFT_SAMPLING_GREEDY: _ClassVar[DraftSampling]
    DRAFT_SAMPLING_SAMPLE: _ClassVar[DraftSampling]

class BlockSizeMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BLOCK_SIZE_MODE_UNSPECIFIED: _ClassVar[BlockSizeMode]
    BLOCK_SIZE_MODE_AUTO: _ClassVar[BlockSizeMode]
    BLOCK_SIZE_MODE_FIXED: _ClassVar[BlockSizeMode]
    BLOCK_SIZE_MODE_OFF: _ClassVar[BlockSizeMode]

class PromptLookup(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PROMPT_LOOKUP_UNSPECIFIED: _ClassVar[PromptLookup]
    PROMPT_LOOKUP_ON: _ClassVar[PromptLookup]
    PROMPT_LOOKUP_OFF: _ClassVar[PromptLookup]
DRAFT_SAMPLING_UNSPECIFIED: DraftSampling
DRAFT_SAMPLING_GREEDY: DraftSampling
DRAFT_SAMPLING_SAMPLE: DraftSampling
BLOCK_SIZE_MODE_UNSPECIFIED: BlockSizeMode
BLOCK_SIZE_MODE_AUTO: BlockSizeMode
BLOCK_SIZE_MODE_FIXED: BlockSizeMode
BLOCK_SIZE_MODE_OFF: BlockSizeMode
PROMPT_LOOKUP_UNSPECIFIED: PromptLookup
PROMPT_LOOKUP_ON: PromptLookup
PROMPT_LOOKUP_OFF: PromptLookup

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingOptions(_message.Message):
    __slots__ = ("temperature", "seed", "max_new_tokens", "stop_token_ids", "draft_sampling", "top_k", "top_p", "logprobs")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    seed: int
    max_new_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    draft_sampling: DraftSampling
    top_k: int
    top_p: float
    logprobs: bool
    def __init__(self, temperature: _Optional[float] = ..., seed: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., draft_sampling: _Optional[_Union[DraftSampling, str]] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., logprobs: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("text", "messages", "token_ids", "sampling", "block_size_mode", "block_size", "policy", "session_id", "new_session", "return_prompt_token_ids", "prompt_lookup", "chat_template_kwargs")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_MODE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_SESSION_FIELD_NUMBER: _ClassVar[int]
    RETURN_PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOOKUP_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_KWARGS_FIELD_NUMBER: _ClassVar[int]
    text: str
    messages: ChatMessages
    token_ids: TokenIds
    sampling: SamplingOptions
    block_size_mode: BlockSizeMode
    block_size: int
    policy: str
    session_id: str
    new_session: bool
    return_prompt_token_ids: bool
    prompt_lookup: PromptLookup
    chat_template_kwargs: _struct_pb2.Struct
    def __init__(self, text: _Optional[str] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., sampling: _Optional[_Union[SamplingOptions, _Mapping]] = ..., block_size_mode: _Optional[_Union[BlockSizeMode, str]] = ..., block_size: _Optional[int] = ..., policy: _Optional[str] = ..., session_id: _Optional[str] = ..., new_session: _Optional[bool] = ..., return_prompt_token_ids: _Optional[bool] = ..., prompt_lookup: _Optional[_Union[PromptLookup, str]] = ..., chat_template_kwargs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class TokenDelta(_message.Message):
    __slots__ = ("token_ids", "text", "acceptance_length", "prompt_tokens", "block_size", "policy_version", "arm", "logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    acceptance_length: int
    prompt_tokens: int
    block_size: int
    policy_version: str
    arm: str
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., acceptance_length: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., block_size: _Optional[int] = ..., policy_version: _Optional[str] = ..., arm: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob", "text")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    text: str
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., text: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "cached_prompt_tokens", "cached_draft_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    cached_draft_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ..., cached_draft_tokens: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("ttft_s", "decode_s", "decode_tokens_per_s", "total_s")
    TTFT_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    ttft_s: float
    decode_s: float
    decode_tokens_per_s: float
    total_s: float
    def __init__(self, ttft_s: _Optional[float] = ..., decode_s: _Optional[float] = ..., decode_tokens_per_s: _Optional[float] = ..., total_s: _Optional[float] = ...) -> None: ...

class GenerateFinal(_message.Message):
    __slots__ = ("finish_reason", "usage", "acceptance_lengths", "tau", "block_size", "policy_version", "arm", "decision_id", "fallback_reason", "timings", "token_ids", "prompt_token_ids", "text", "target", "drafter", "experiment", "accepted_by_source", "drafter_passes_skipped", "prompt_lookup", "batch_sessions", "capped_steps", "backend", "precision", "logprobs", "trace_id", "chat_template_kwargs")
    class AcceptedBySourceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_LENGTHS_FIELD_NUMBER: _ClassVar[int]
    TAU_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARM_FIELD_NUMBER: _ClassVar[int]
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_FIELD_NUMBER: _ClassVar[int]
    EXPERIMENT_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_BY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_PASSES_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOOKUP_FIELD_NUMBER: _ClassVar[int]
    BATCH_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CAPPED_STEPS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_KWARGS_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    usage: Usage
    acceptance_lengths: _containers.RepeatedScalarFieldContainer[int]
    tau: float
    block_size: int
    policy_version: str
    arm: str
    decision_id: str
    fallback_reason: str
    timings: Timings
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    target: str
    drafter: str
    experiment: str
    accepted_by_source: _containers.ScalarMap[str, int]
    drafter_passes_skipped: int
    prompt_lookup: bool
    batch_sessions: int
    capped_steps: int
    backend: str
    precision: str
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    trace_id: str
    chat_template_kwargs: _struct_pb2.Struct
    def __init__(self, finish_reason: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., acceptance_lengths: _Optional[_Iterable[int]] = ..., tau: _Optional[float] = ..., block_size: _Optional[int] = ..., policy_version: _Optional[str] = ..., arm: _Optional[str] = ..., decision_id: _Optional[str] = ..., fallback_reason: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., target: _Optional[str] = ..., drafter: _Optional[str] = ..., experiment: _Optional[str] = ..., accepted_by_source: _Optional[_Mapping[str, int]] = ..., drafter_passes_skipped: _Optional[int] = ..., prompt_lookup: _Optional[bool] = ..., batch_sessions: _Optional[int] = ..., capped_steps: _Optional[int] = ..., backend: _Optional[str] = ..., precision: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., trace_id: _Optional[str] = ..., chat_template_kwargs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("index", "session_id", "delta", "final")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    index: int
    session_id: str
    delta: TokenDelta
    final: GenerateFinal
    def __init__(self, index: _Optional[int] = ..., session_id: _Optional[str] = ..., delta: _Optional[_Union[TokenDelta, _Mapping]] = ..., final: _Optional[_Union[GenerateFinal, _Mapping]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("context_length", "max_new_tokens", "default_max_new_tokens", "max_streams", "max_block_size", "max_prompt_tokens")
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    context_length: int
    max_new_tokens: int
    default_max_new_tokens: int
    max_streams: int
    max_block_size: int
    max_prompt_tokens: int
    def __init__(self, context_length: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., default_max_new_tokens: _Optional[int] = ..., max_streams: _Optional[int] = ..., max_block_size: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ...) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("version", "target", "drafter", "drafter_block_size", "drafter_max_block_size", "backend", "precision", "default_policy", "limits", "replica_id", "lookup_corpus", "lookup_corpus_trigrams", "lookup_corpus_bigrams")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_MAX_BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_POLICY_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_CORPUS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_CORPUS_TRIGRAMS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_CORPUS_BIGRAMS_FIELD_NUMBER: _ClassVar[int]
    version: str
    target: str
    drafter: str
    drafter_block_size: int
    drafter_max_block_size: int
    backend: str
    precision: str
    default_policy: str
    limits: ServerLimits
    replica_id: str
    lookup_corpus: str
    lookup_corpus_trigrams: int
    lookup_corpus_bigrams: int
    def __init__(self, version: _Optional[str] = ..., target: _Optional[str] = ..., drafter: _Optional[str] = ..., drafter_block_size: _Optional[int] = ..., drafter_max_block_size: _Optional[int] = ..., backend: _Optional[str] = ..., precision: _Optional[str] = ..., default_policy: _Optional[str] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., replica_id: _Optional[str] = ..., lookup_corpus: _Optional[str] = ..., lookup_corpus_trigrams: _Optional[int] = ..., lookup_corpus_bigrams: _Optional[int] = ...) -> None: ...
