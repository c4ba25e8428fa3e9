"""The HTTP gateway: the OpenAI API (POST /v1/chat/completions and /v1/completions, streamed as
server-sent events or not; GET /v1/models, with the verifier's GetServerInfo) plus GET /health and
GET /metrics, as a Starlette app on uvicorn in front of the verifier's Generate stream.

- Each request is one Generate call through AsyncBlockPilotClient (deadline, retries before the
  first token); the caller's `authorization` header is forwarded as gRPC metadata, so the
  verifier's tokens guard the gateway too and sessions stay their caller's.
- Stop strings are the gateway's: the text is cut at the first one and the gRPC stream cancelled,
  so the verifier stops decoding within one step.
- A client that disconnects cancels its gRPC stream (streamed or not).
- Errors before the first token are HTTP statuses mapped from the gRPC status (openai_api); once
  a stream has started (status 200 sent) an error is one `data: {"error": ...}` event.
The request and response shapes are blockpilot.serving.openai_api's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import AsyncIterator, Awaitable, Sequence, TypeVar

import anyio
import grpc
from google.protobuf.json_format import MessageToDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from blockpilot.client import AsyncBlockPilotClient
from blockpilot.config import GatewayServiceConfig
from blockpilot.errors import InvalidArgumentError, UnavailableError
from blockpilot.serving import metrics
from blockpilot.serving.openai_api import (Completion, LogprobTrail, Outcome, StopMatcher, chunk, error_body, error_response,
                                           logprobs_json, parse, response)

log = logging.getLogger("services.gateway")

T = TypeVar("T")


class ClientGone(Exception):
    """The HTTP client disconnected before its response was ready."""


class _EventStream(StreamingResponse):
    """Server-sent events whose producer is cancelled as soon as the client disconnects.
    (Starlette's StreamingResponse notices a disconnect only at its next write under ASGI 2.4
    servers such as uvicorn, so a client gone during a long prefill would keep the verifier busy.)"""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:
            async def produce() -> None:
                await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(produce)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


def _auth(request: Request) -> tuple[tuple[str, str], ...]:
    """The caller's `authorization` header as gRPC metadata (the verifier checks the token)."""
    value = request.headers.get("authorization")
    return (("authorization", value),) if value else ()


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n"


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and its gRPC stream) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientGone()


class Gateway:
    def __init__(self, config: GatewayServiceConfig, client: AsyncBlockPilotClient) -> None:
        self.config = config
        self.client = client
        self.created = int(time.time())
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ])

    # ------------------------------------------------------------------ endpoints

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def models(self, request: Request) -> Response:
        """The one model, with the verifier's GetServerInfo under the extension key `blockpilot`
        (asked with the caller's token: with tokens configured, an unauthenticated caller gets 401;
        a verifier that does not answer is a 503, since the gateway cannot say what it serves)."""
        try:
            info = await _unless_disconnected(request, self.client.server_info(timeout=5.0, metadata=_auth(request)))
        except ClientGone:
            self._count("models", 499)
            return Response(status_code=499)
        except Exception as err:  # noqa: BLE001 - mapped to an HTTP status in one place
            return self._error("models", err)
        self._count("models", 200)
        return JSONResponse({"object": "list", "data": [{
            "id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "blockpilot",
            "blockpilot": MessageToDict(info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)}]})

    async def health(self, request: Request) -> Response:
        """200 when the verifier behind answers SERVING; else 503 with what it answered."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            reply = await health_pb2_grpc.HealthStub(self.client.channel).Check(
                health_pb2.HealthCheckRequest(service="blockpilot.v1.Verifier"), timeout=2.0)
            state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as err:  # no answer, or not the verifier (NOT_FOUND): "down", said in the body
            log.info("health: the verifier at %s did not answer (%s)", self.config.verifier_address, err.code().name)
            state = "DOWN"
        status = 200 if state == "SERVING" else 503
        metrics.GATEWAY_REQUESTS.labels("health", str(status)).inc()
        if status == 200:
            return JSONResponse({"status": "ok", "verifier": state})
        return JSONResponse(error_body(f"the verifier at {self.config.verifier_address} is {state}", "service_unavailable",
                                       "unavailable"), status_code=503)

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ generation

    async def _complete(self, request: Request, *, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        started = time.perf_counter()
        metrics.INFLIGHT.labels("gateway").inc()
        streaming = False
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise InvalidArgumentError("the request body is not valid JSON") from None
            c = parse(body, chat=chat, model_name=self.config.model_name)
            outcome = Outcome()
            pieces = self._run(c, _auth(request), outcome)
            # The first event before any byte is sent: a refusal (bad token, unknown session, ...)
            # is then still an HTTP status, not an event inside a 200 stream.
            first = await _unless_disconnected(request, pieces.__anext__())
            if c.stream:
                streaming = True
                return _EventStream(self._events(c, endpoint, started, first, pieces, outcome))
            texts = [first]
            texts += await _unless_disconnected(request, _collect(pieces))
            outcome.text = "".join(texts)
            metrics.GATEWAY_TTFT.labels(endpoint).observe(time.perf_counter() - started)
            self._done(c, endpoint, 200, outcome, started)
            return JSONResponse(response(c, outcome))
        except ClientGone:
            metrics.GATEWAY_DISCONNECTS.inc()
            self._count(endpoint, 499)
            return Response(status_code=499)
        except StopAsyncIteration:  # the stream ended without a message
            return self._error(endpoint, UnavailableError("the verifier ended the stream without a reply"))
        except Exception as err:  # noqa: BLE001 - mapped to an HTTP status in one place
            return self._error(endpoint, err)
        finally:
            if not streaming:
                metrics.INFLIGHT.labels("gateway").dec()

    async def _run(self, c: Completion, auth: Sequence[tuple[str, str]], outcome: Outcome) -> AsyncIterator[str]:
        """The text of each delta that may be sent ("" when a stop string holds it back), filling
        `outcome`; ends at the final message or at a stop string (cancelling the call)."""
        matcher = StopMatcher(c.stop) if c.stop else None
        outcome.logprobs = LogprobTrail() if c.logprobs else None
        received = 0  # characters of text received so far (before any stop-string cut)
        stream = self.client.stream(timeout=self.config.request_timeout_s, metadata=auth, **c.generate_args)
        try:
            async for event in stream:
                outcome.session_id = event.session_id or outcome.session_id
                final = event.final
                if final is None:
                    if event.index == 0:
                        outcome.prompt_tokens, outcome.block_size = event.prompt_tokens, event.block_size
                        outcome.policy_version, outcome.arm = event.policy_version, event.arm
                    outcome.completion_tokens += len(event.token_ids)
                    if event.acceptance_length:
                        outcome.acceptance_lengths.append(event.acceptance_length)
                    if outcome.logprobs is not None:
                        outcome.logprobs.add(received, event.logprobs)
                    received += len(event.text)
                    yield matcher.push(event.text) if matcher else event.text
                    if matcher is not None and matcher.stopped:
                        outcome.finish_reason, outcome.stopped = "stop", True
                        metrics.GATEWAY_STOP_STRINGS.inc()
                        return
                    continue
                outcome.finish_reason = final.finish_reason
                outcome.prompt_tokens, outcome.completion_tokens = final.usage.prompt_tokens, final.usage.completion_tokens
                outcome.cached_prompt_tokens = final.usage.cached_prompt_tokens
                outcome.acceptance_lengths = list(final.acceptance_lengths)
                outcome.block_size, outcome.policy_version, outcome.arm = final.block_size, final.policy_version, final.arm
                outcome.fallback_reason = final.fallback_reason
                yield matcher.flush() if matcher else ""
        finally:
            await stream.aclose()  # cancels the gRPC call now, not when the generator is collected

    async def _events(self, c: Completion, endpoint: str, started: float, first: str, pieces: AsyncIterator[str],
                      outcome: Outcome) -> AsyncIterator[str]:
        status = 200
        timed = False
        try:
            if c.chat:
                yield _sse(chunk(c, "", role=True, session_id=outcome.session_id))
            sent = 0  # characters of text sent
            async for piece in _prepend(first, pieces):
                if not piece:
                    continue
                if not timed:
                    timed = True
                    metrics.GATEWAY_TTFT.labels(endpoint).observe(time.perf_counter() - started)
                sent += len(piece)
                yield _sse(chunk(c, piece, logprobs=logprobs_json(c, outcome, sent)))
            # The tokens whose text was held back or empty (an end-of-turn token), unless a stop string cut them off.
            yield _sse(chunk(c, None if c.chat else "", outcome.finish_reason,
                             logprobs=logprobs_json(c, outcome, sent if outcome.stopped else None)))
            if c.include_usage:
                yield _sse(chunk(c, usage=outcome.usage()))
            yield _sse("[DONE]")
            self._done(c, endpoint, 200, outcome, started)
        except (asyncio.CancelledError, anyio.get_cancelled_exc_class()):
            status = 499
            metrics.GATEWAY_DISCONNECTS.inc()
            raise
        except Exception as err:  # noqa: BLE001 - the status line is sent: the error goes as an event
            status, body = error_response(err)
            if status == 500:
                log.error("internal error in a stream", exc_info=err)
            yield _sse(body)
            yield _sse("[DONE]")
        finally:
            await pieces.aclose()
            if status != 200:
                self._count(endpoint, status)
            metrics.INFLIGHT.labels("gateway").dec()

    # ------------------------------------------------------------------ bookkeeping

    def _count(self, endpoint: str, status: int) -> None:
        metrics.GATEWAY_REQUESTS.labels(endpoint, str(status)).inc()

    def _done(self, c: Completion, endpoint: str, status: int, outcome: Outcome, started: float) -> None:
        self._count(endpoint, status)
        log.info("%s %s user=%r: %s, %d+%d tokens, block size %d, %.3f s", c.id, endpoint, c.user, outcome.finish_reason,
                 outcome.prompt_tokens, outcome.completion_tokens, outcome.block_size, time.perf_counter() - started)

    def _error(self, endpoint: str, err: BaseException) -> Response:
        status, body = error_response(err)
        if status == 500:
            log.error("internal error while serving a request", exc_info=err)
        self._count(endpoint, status)
        return JSONResponse(body, status_code=status)


async def _collect(pieces: AsyncIterator[str]) -> list[str]:
    return [piece async for piece in pieces]


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for piece in rest:
        yield piece
