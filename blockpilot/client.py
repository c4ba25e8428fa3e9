"""Python client of the verifier service (what backend services import).

    from blockpilot.client import BlockPilotClient
    with BlockPilotClient("127.0.0.1:50051") as client:
        for event in client.stream(token_ids=[1, 2, 3], max_new_tokens=32, timeout=30):
            if event.final is None:
                print(event.token_ids, event.text)
        reply = client.generate(messages=[{"role": "user", "content": "Hi"}], new_session=True)
        again = client.generate(messages=[...whole conversation...], session_id=reply.session_id)

    async with AsyncBlockPilotClient("127.0.0.1:50051") as client:   # the same, on an event loop
        async for event in client.stream(token_ids=[1, 2, 3], max_new_tokens=32, timeout=30):
            ...
        info = await client.server_info()   # target, drafter, backend, default policy, limits, version

- Deadlines: `timeout` (seconds) bounds the whole stream and is propagated to every hop.
- Retries only where safe, by gRPC itself (the channel's service config, `retry_service_config`):
  a call that fails UNAVAILABLE (or RESOURCE_EXHAUSTED: server busy) before the server answered
  is retried with exponential backoff and jitter, within the deadline; once the server sent its
  first message the call is committed and nothing is retried (the caller would see tokens twice).
- Errors are typed (blockpilot.errors): InvalidArgumentError, NotFoundError, AbortedError, ...;
  `err.status_code` holds the grpc.StatusCode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Sequence

import grpc
from google.protobuf import json_format

from blockpilot.serving.security import ClientSecurity
from blockpilot.serving.status import from_rpc_error
from blockpilot.serving.channels import MESSAGE_SIZE_OPTIONS
from blockpilot.v1 import verifier_pb2, verifier_pb2_grpc

MAX_RETRIES = 4  # gRPC caps a retry policy at 5 attempts


@dataclass(frozen=True)
class StreamEvent:
    """One stream message: committed tokens (`final` None) or the final message."""

    index: int
    session_id: str
    token_ids: tuple[int, ...] = ()
    text: str = ""
    acceptance_length: int = 0
    final: verifier_pb2.GenerateFinal | None = None
    # Set on the first delta only: prompt token count and the block size chosen, with the policy
    # version and arm that chose it (a caller that ends the stream early still has them).
    prompt_tokens: int = 0
    block_size: int = 0
    policy_version: str = ""
    arm: str = ""
    # With logprobs=True: (token id, log-probability, token text) per token_ids entry.
    logprobs: tuple[tuple[int, float, str], ...] = ()

    @classmethod
    def of(cls, message: verifier_pb2.GenerateResponse) -> "StreamEvent":
        if message.WhichOneof("payload") == "final":
            return cls(message.index, message.session_id, final=message.final)
        d = message.delta
        return cls(message.index, message.session_id, tuple(d.token_ids), d.text, d.acceptance_length,
                   prompt_tokens=d.prompt_tokens, block_size=d.block_size, policy_version=d.policy_version, arm=d.arm,
                   logprobs=tuple((lp.token_id, lp.logprob, lp.text) for lp in d.logprobs))


@dataclass
class Reply:
    """A whole generation (the final message's fields, flattened)."""

    session_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    block_size: int
    acceptance_lengths: list[int]
    tau: float
    policy_version: str
    arm: str
    decision_id: str
    fallback_reason: str
    prompt_token_ids: list[int]
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    target: str = ""
    drafter: str = ""
    experiment: str = ""  # A/B experiment that chose the block size ("" = none)
    # With logprobs=True: (token id, log-probability, token text) per token_ids entry.
    logprobs: list[tuple[int, float, str]] = field(default_factory=list)
    trace_id: str = ""  # the request's trace id ("" when the verifier does not trace)
    chat_template_kwargs: dict = field(default_factory=dict)  # what a messages prompt was rendered with

    @classmethod
    def from_final(cls, session_id: str, final: verifier_pb2.GenerateFinal) -> "Reply":
        return cls(session_id, list(final.token_ids), final.text, final.finish_reason, final.block_size,
                   list(final.acceptance_lengths), final.tau, final.policy_version, final.arm, final.decision_id,
                   final.fallback_reason, list(final.prompt_token_ids),
                   {"prompt_tokens": final.usage.prompt_tokens, "completion_tokens": final.usage.completion_tokens,
                    "cached_prompt_tokens": final.usage.cached_prompt_tokens,
                    "cached_draft_tokens": final.usage.cached_draft_tokens},
                   {"ttft_s": final.timings.ttft_s, "decode_s": final.timings.decode_s,
                    "decode_tokens_per_s": final.timings.decode_tokens_per_s, "total_s": final.timings.total_s},
                   final.target, final.drafter, final.experiment,
                   [(lp.token_id, lp.logprob, lp.text) for lp in final.logprobs], final.trace_id,
                   json_format.MessageToDict(final.chat_template_kwargs))


def build_request(*, prompt: str | None = None, messages: Sequence[dict] | None = None, token_ids: Sequence[int] | None = None,
                  max_new_tokens: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                  stop_token_ids: Sequence[int] = (), draft_sampling: str = "greedy", block_size: int | str = "auto",
                  policy: str = "", session_id: str = "", new_session: bool = False,
                  return_prompt_token_ids: bool = False, prompt_lookup: bool | None = None, logprobs: bool = False,
                  chat_template_kwargs: dict | None = None) -> verifier_pb2.GenerateRequest:
    """block_size: "auto" (ask the policy), "off" (block size 1) or a fixed int. prompt_lookup:
    True / False, or None for the server's default (on unless configured off). top_k (0 = off) and
    top_p (1.0 = off) truncate the sampled distribution at temperature > 0. logprobs: report each
    token's log-probability under the target's raw distribution. chat_template_kwargs: extra chat
    template arguments of a messages prompt, e.g. {"enable_thinking": False}."""
    lookup = {None: verifier_pb2.PROMPT_LOOKUP_UNSPECIFIED, True: verifier_pb2.PROMPT_LOOKUP_ON,
              False: verifier_pb2.PROMPT_LOOKUP_OFF}[prompt_lookup]
    request = verifier_pb2.GenerateRequest(policy=policy, session_id=session_id, new_session=new_session,
                                           return_prompt_token_ids=return_prompt_token_ids, prompt_lookup=lookup)
    if prompt is not None:
        request.text = prompt
    elif messages is not None:
        request.messages.messages.extend(verifier_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    elif token_ids is not None:
        request.token_ids.ids.extend(int(t) for t in token_ids)
    if chat_template_kwargs:
        request.chat_template_kwargs.update(chat_template_kwargs)
    s = request.sampling
    s.temperature = temperature
    s.top_k = top_k
    s.top_p = top_p
    s.max_new_tokens = max_new_tokens
    s.logprobs = logprobs
    if seed is not None:
        s.seed = seed
    s.stop_token_ids.extend(int(t) for t in stop_token_ids)
    s.draft_sampling = verifier_pb2.DRAFT_SAMPLING_SAMPLE if draft_sampling == "sample" else verifier_pb2.DRAFT_SAMPLING_GREEDY
    if block_size == "auto":
        request.block_size_mode = verifier_pb2.BLOCK_SIZE_MODE_AUTO
    elif block_size == "off":
        request.block_size_mode = verifier_pb2.BLOCK_SIZE_MODE_OFF
    else:
        request.block_size_mode = verifier_pb2.BLOCK_SIZE_MODE_FIXED
        request.block_size = int(block_size)
    return request


def retry_service_config(retries: int, backoff_s: float, wait_for_ready: bool = False) -> str:
    """The gRPC service config of the verifier's channel: up to `retries` retries of a Verifier
    call that fails UNAVAILABLE or RESOURCE_EXHAUSTED before the server answered. gRPC waits a
    random time in [0, backoff_s * 2^(n-1)] before retry n (capped at 30 * backoff_s), keeps to
    the call's deadline, and commits a call when its first response arrives, so a stream that
    already delivered tokens is never replayed. wait_for_ready: a call made while the verifier
    cannot be reached (down, restarting) waits for it, up to the call's deadline, instead of
    failing UNAVAILABLE at once (for callers that would rather wait out a restart)."""
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries must be an integer in 0..{MAX_RETRIES} (gRPC's limit), got {retries!r}")
    if not backoff_s > 0:
        raise ValueError(f"backoff_s must be > 0, got {backoff_s!r}")
    method: dict = {"name": [{"service": "blockpilot.v1.Verifier"}], "waitForReady": bool(wait_for_ready)}
    if retries:
        method["retryPolicy"] = {"maxAttempts": retries + 1, "initialBackoff": f"{backoff_s:.3f}s",
                                 "maxBackoff": f"{30 * backoff_s:.3f}s", "backoffMultiplier": 2,
                                 "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]}
    return json.dumps({"methodConfig": [method]})


def _channel_options(retries: int, backoff_s: float, wait_for_ready: bool) -> list[tuple[str, object]]:
    return [*MESSAGE_SIZE_OPTIONS, ("grpc.enable_retries", 1),
            ("grpc.service_config", retry_service_config(retries, backoff_s, wait_for_ready))]


class BlockPilotClient:
    def __init__(self, address: str = "127.0.0.1:50051", *, timeout: float | None = 300.0, retries: int = 3,
                 backoff_s: float = 0.2, wait_for_ready: bool = False, security: ClientSecurity = ClientSecurity()) -> None:
        """security: TLS (the CA to trust, a client certificate) and the bearer token to send.
        retries / backoff_s / wait_for_ready: see retry_service_config."""
        self.address = address
        self.timeout = timeout
        self.security = security
        self._channel = security.channel(address, _channel_options(retries, backoff_s, wait_for_ready))
        self._stub = verifier_pb2_grpc.VerifierStub(self._channel)

    def __enter__(self) -> "BlockPilotClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def stream(self, *, timeout: float | None = None, **request_args) -> Iterator[StreamEvent]:
        """Stream one generation (arguments as build_request). Closing the iterator early cancels
        the call; the server stops within one step and frees the request's caches."""
        request = build_request(**request_args)
        call = self._stub.Generate(request, timeout=self.timeout if timeout is None else timeout,
                                   metadata=self.security.metadata())
        try:
            for message in call:
                yield StreamEvent.of(message)
        except grpc.RpcError as err:
            raise from_rpc_error(err, "Generate") from None
        finally:
            call.cancel()

    def generate(self, *, timeout: float | None = None, **request_args) -> Reply:
        """The whole generation as one Reply."""
        for event in self.stream(timeout=timeout, **request_args):
            if event.final is not None:
                return Reply.from_final(event.session_id, event.final)
        raise RuntimeError("the stream ended without a final message")

    def server_info(self, *, timeout: float | None = None) -> verifier_pb2.GetServerInfoResponse:
        """The verifier's GetServerInfo: target, drafter and its block sizes, backend and precision,
        default policy, limits, version (fields documented in protos/blockpilot/v1/verifier.proto)."""
        try:
            return self._stub.GetServerInfo(verifier_pb2.GetServerInfoRequest(), timeout=self.timeout if timeout is None else timeout,
                                            metadata=self.security.metadata())
        except grpc.RpcError as err:
            raise from_rpc_error(err, "GetServerInfo") from None


class AsyncBlockPilotClient:
    """BlockPilotClient for asyncio callers (the HTTP gateway): the same requests, events, deadline
    and retry rule, on a grpc.aio channel, so a stream needs no thread and cancelling the task
    that iterates it cancels the call."""

    def __init__(self, address: str = "127.0.0.1:50051", *, timeout: float | None = 300.0, retries: int = 3,
                 backoff_s: float = 0.2, wait_for_ready: bool = False, security: ClientSecurity = ClientSecurity()) -> None:
        self.address = address
        self.timeout = timeout
        self.security = security
        self.channel = security.aio_channel(address, _channel_options(retries, backoff_s, wait_for_ready))
        self._stub = verifier_pb2_grpc.VerifierStub(self.channel)

    async def __aenter__(self) -> "AsyncBlockPilotClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def stream(self, *, timeout: float | None = None, metadata: Sequence[tuple[str, str]] = (),
                     **request_args) -> AsyncIterator[StreamEvent]:
        """Stream one generation (arguments as build_request). metadata: sent with the call besides
        the configured token (the gateway forwards its caller's `authorization` this way). Closing
        the iterator early, or cancelling its task, cancels the call."""
        request = build_request(**request_args)
        call = self._stub.Generate(request, timeout=self.timeout if timeout is None else timeout,
                                   metadata=self._metadata(metadata))
        try:
            async for message in call:
                yield StreamEvent.of(message)
        except grpc.RpcError as err:
            raise from_rpc_error(err, "Generate") from None
        finally:
            call.cancel()

    async def server_info(self, *, timeout: float | None = None,
                          metadata: Sequence[tuple[str, str]] = ()) -> verifier_pb2.GetServerInfoResponse:
        """As BlockPilotClient.server_info; metadata as in stream()."""
        try:
            return await self._stub.GetServerInfo(verifier_pb2.GetServerInfoRequest(), timeout=self.timeout if timeout is None else timeout,
                                                  metadata=self._metadata(metadata))
        except grpc.RpcError as err:
            raise from_rpc_error(err, "GetServerInfo") from None

    def _metadata(self, metadata: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
        """The call's metadata: what the caller gives, then the configured token unless given."""
        given = {key for key, _ in metadata}
        return tuple(metadata) + tuple(m for m in self.security.metadata() if m[0] not in given)
