"""Gateway service: the OpenAI-compatible HTTP API (blockpilot.serving.gateway's app) on uvicorn,
in front of the verifier's Generate stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Sequence

import uvicorn

from blockpilot.client import AsyncBlockPilotClient
from blockpilot.config import GatewayServiceConfig, load_config
from blockpilot.errors import InvalidArgumentError, UnavailableError
from blockpilot.serving.gateway import Gateway
from blockpilot.serving.metrics import start_metrics_server
from blockpilot.serving.security import ClientSecurity
from blockpilot.serving.server import setup_logging
from blockpilot.serving.tracing import asgi_app, setup_tracing

log = logging.getLogger("services.gateway")


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal capture: that one re-raises SIGTERM once the drain
    is over, so the process would end killed by the signal instead of exiting 0 as the other
    services do; serve() routes SIGTERM/SIGINT to the same graceful shutdown instead."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def serve(argv: Sequence[str] | None = None) -> None:
    """Run the gateway until SIGTERM/SIGINT; then uvicorn drains: it stops accepting connections
    and gives in-flight requests grace_s to finish."""
    config = load_config(GatewayServiceConfig, argv)
    setup_logging(config.log_level)
    if bool(config.tls_cert) != bool(config.tls_key):
        raise InvalidArgumentError("gateway config: tls_cert and tls_key go together: give both or neither")
    # Before the client's channel opens: its calls carry the request's trace context to the verifier.
    tracer_provider = setup_tracing("gateway", config.otlp_endpoint, config.trace_file)
    security = ClientSecurity(config.client_tls_ca, config.client_tls_cert, config.client_tls_key)
    client = AsyncBlockPilotClient(config.verifier_address, timeout=config.request_timeout_s, security=security)
    gateway = Gateway(config, client)
    server = _Server(uvicorn.Config(
        asgi_app(gateway.app, tracer_provider), host=config.host, port=config.port, log_level=config.log_level.lower(), access_log=False,
        lifespan="off", timeout_graceful_shutdown=config.grace_s, ssl_certfile=config.tls_cert or None,
        ssl_keyfile=config.tls_key or None))
    if not config.tls_cert and config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("the gateway serves plain HTTP on %s:%d, beyond loopback: set tls_cert / tls_key on a shared network "
                    "(bearer tokens travel in its requests)", config.host, config.port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # the first one drains, a second one stops at once
        loop.add_signal_handler(sig, server.handle_exit, sig, None)
    start_metrics_server(config.metrics_port, config.host)
    running = asyncio.ensure_future(server.serve())
    while not server.started and not running.done():
        await asyncio.sleep(0.05)
    if server.started:
        scheme = "https" if config.tls_cert else "http"
        log.info("gateway SERVING on %s://%s:%d -> verifier %s", scheme, config.host, config.port, config.verifier_address)
        print(f"gateway SERVING on {config.host}:{config.port}", flush=True)
    try:
        await running
    finally:
        await client.close()
    if not server.started:
        raise UnavailableError(f"the gateway could not listen on {config.host}:{config.port} (see the log above)")
