"""What every service process shares: logging (with the request's trace id), tracing, the asyncio
gRPC server with health checking and reflection, the metrics endpoint, readiness (SERVING only
once models are loaded) and graceful drain on SIGTERM/SIGINT (NOT_SERVING, in-flight RPCs get
`grace_s`, then stop)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from typing import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from blockpilot.serving.channels import MESSAGE_SIZE_OPTIONS
from blockpilot.serving.metrics import start_metrics_server
from blockpilot.serving.security import ServerSecurity, handler_like
from blockpilot.serving.tracing import TraceIdFilter, server_interceptor, setup_tracing

log = logging.getLogger(__name__)

SERVER_OPTIONS = [*MESSAGE_SIZE_OPTIONS, ("grpc.so_reuseport", 0)]


def connection_age_options(max_age_s: float, grace_s: float) -> list[tuple[str, int]]:
    """Server options that end each client connection after `max_age_s` (GOAWAY; calls in flight
    get `grace_s`, then the connection is cut); none when max_age_s is 0. A client reconnects on
    its next call, and through a load-balanced address it may land on a replica added since."""
    if max_age_s <= 0:
        return []
    return [("grpc.max_connection_age_ms", round(max_age_s * 1000)), ("grpc.max_connection_age_grace_ms", round(grace_s * 1000))]


class UnparsableRequest:
    """Stands for a request message whose bytes did not parse (a corrupt wire format, a string
    field that is not UTF-8): the handler never sees it, the client gets INVALID_ARGUMENT."""

    def __init__(self, type_name: str) -> None:
        self.message = f"the request is not a valid {type_name} message (corrupt bytes, or a string field that is not UTF-8)"


def add_servicer(server: grpc.aio.Server, add_to_server: Callable, servicer) -> None:
    """Register `servicer` through its generated `add_<Service>Servicer_to_server`, with requests
    that do not parse answered INVALID_ARGUMENT with a plain message. (Left to grpc they end as
    UNKNOWN, "Unexpected <class 'google.protobuf.message.DecodeError'>: ...".)"""
    captured = _CapturedHandlers()
    add_to_server(servicer, captured)
    guarded = {method: _guarded(handler) for method, handler in captured.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(captured.service, guarded),))
    server.add_registered_method_handlers(captured.service, guarded)


class _CapturedHandlers:
    """Stands in for the server while a generated add_*_to_server registers its method handlers."""

    service = ""
    handlers: dict = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, dict(handlers)


def _guarded(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    import inspect

    parse = handler.request_deserializer
    message_type = getattr(parse, "__self__", None)
    type_name = message_type.DESCRIPTOR.full_name if message_type is not None else "request"

    def tolerant(data: bytes):
        try:
            return parse(data)
        except Exception:  # any failure to parse is the client's bytes
            return UnparsableRequest(type_name)

    async def refuse(request, context) -> None:
        if isinstance(request, UnparsableRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)

    async def checked(requests, context):
        async for request in requests:
            await refuse(request, context)
            yield request

    if handler.request_streaming:
        behavior = handler.stream_stream or handler.stream_unary

        def prepare(requests, context):
            return checked(requests, context)
    else:
        behavior = handler.unary_stream or handler.unary_unary
        prepare = None
    if inspect.isasyncgenfunction(behavior):
        async def wrapped(request, context):
            if prepare is None:
                await refuse(request, context)
            async for reply in behavior(request if prepare is None else prepare(request, context), context):
                yield reply
    else:
        async def wrapped(request, context):
            if prepare is None:
                await refuse(request, context)
            return await behavior(request if prepare is None else prepare(request, context), context)
    return handler_like(handler, wrapped, request_deserializer=tolerant)


def setup_logging(level: str) -> None:
    """Log lines of a request end with its trace id (` trace_id=<32 hex digits>`)."""
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s%(trace)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(TraceIdFilter())


def default_replica_id(config) -> str:
    return config.replica_id or f"{socket.gethostname()}:{config.port}"


class ServiceRunner:
    """Runs one service: `load` (in a thread) loads the models and registers the servicers."""

    def __init__(self, config, service_name: str, full_name: str, server_options: Sequence[tuple[str, int]] = ()) -> None:
        self.config = config
        self.service_name = service_name
        self.full_name = full_name  # e.g. blockpilot.v1.Verifier
        self.security = ServerSecurity.of(config)
        self.tracer_provider = setup_tracing(service_name, config.otlp_endpoint, config.trace_file)
        # Tracing outermost: calls the token check refuses are traced too.
        self.server = grpc.aio.server(options=[*SERVER_OPTIONS, *server_options],
                                      interceptors=[server_interceptor(self.tracer_provider), *self.security.interceptors()])
        self.health = health.aio.HealthServicer()
        self.ready = False
        self.draining = False
        self.inflight = 0  # RPCs in progress that the drain waits for (see track())
        self._stop = asyncio.Event()

    @contextlib.contextmanager
    def track(self):
        """Count one RPC as in flight for the drain (servicers wrap their work in it)."""
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    def not_ready_message(self, what: str) -> str:
        return f"the {self.service_name} is draining (shutting down); retry on another replica" if self.draining else \
            f"the {self.service_name} is loading {what}; retry later"

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", self.full_name):
            await self.health.set(name, status)

    async def run(self, setup: Callable[[grpc.aio.Server], Awaitable[Callable[[], Awaitable[None]]]],
                  load: Callable[[], Awaitable[None]] | None = None) -> None:
        """`setup(server)` adds the servicers and returns an async cleanup; then the server starts
        (health NOT_SERVING, so orchestrators see it is alive but not ready), `load()` loads the
        models, and only then health turns SERVING. Runs until SIGTERM/SIGINT, then drains."""
        cfg = self.config
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self._set_health(False)
        cleanup = await setup(self.server)
        reflection.enable_server_reflection([self.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        address = f"{cfg.host}:{cfg.port}"
        if self.security.add_port(self.server, address) == 0:
            raise OSError(f"cannot bind {address}")
        if not self.security.tls and cfg.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("%s serves plaintext gRPC on %s, beyond loopback: set tls_cert / tls_key (and tokens) on a shared "
                        "network", self.service_name, address)
        start_metrics_server(cfg.metrics_port, cfg.host)
        # Signal handlers first: a SIGTERM while loading (or right after SERVING) still drains.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self.server.start()
        try:
            if load is not None:
                await load()
        except BaseException:
            await self.server.stop(0)
            raise
        if not self._stop.is_set():  # (a SIGTERM during the load: straight to the drain)
            self.ready = True
            await self._set_health(True)
            log.info("%s SERVING on %s (pid %d)", self.service_name, address, os.getpid())
            print(f"{self.service_name} SERVING on {address}", flush=True)

        await self._stop.wait()
        log.info("%s draining: NOT_SERVING, %.1f s grace for %d in-flight RPC(s)", self.service_name, cfg.grace_s,
                 self.inflight)
        self.ready = False
        self.draining = True
        await self._set_health(False)
        deadline = time.monotonic() + cfg.grace_s
        while self.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.inflight:
            log.warning("%s: %d RPC(s) still running after the %.1f s grace period; cancelling them",
                        self.service_name, self.inflight, cfg.grace_s)
        await self.server.stop(max(0.0, min(1.0, deadline - time.monotonic())))  # then cancels what still runs
        if cleanup is not None:
            await cleanup()
        log.info("%s stopped", self.service_name)


def main(run: Callable[[Sequence[str] | None], Awaitable[None]], argv: Sequence[str] | None = None) -> int:
    from blockpilot.errors import BlockPilotError

    try:
        asyncio.run(run(argv))
    except BlockPilotError as err:
        print(f"error: {err}", flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
