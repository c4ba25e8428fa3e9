"""The client's retries are gRPC's own (service config): a real gRPC server on a socket that refuses
the first calls before any message, or fails after one."""

from __future__ import annotations

import json
import threading
from concurrent import futures

import grpc
import pytest

from blockpilot.client import AsyncBlockPilotClient, BlockPilotClient, retry_service_config
from blockpilot.errors import ResourceExhaustedError, UnavailableError
from blockpilot.v1 import verifier_pb2, verifier_pb2_grpc


class ScriptedVerifier(verifier_pb2_grpc.VerifierServicer):
    """Refuses the first `refusals` calls RESOURCE_EXHAUSTED (before any message), then streams
    one delta and, with `cut_after_first`, fails UNAVAILABLE, else sends the final message."""

    def __init__(self, refusals: int = 0, cut_after_first: bool = False) -> None:
        self.refusals, self.cut_after_first = refusals, cut_after_first
        self.calls = 0
        self.lock = threading.Lock()

    def Generate(self, request, context):
        with self.lock:
            self.calls += 1
            call = self.calls
        if call <= self.refusals:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy: try again")
        yield verifier_pb2.GenerateResponse(index=0, delta=verifier_pb2.TokenDelta(token_ids=[7], text="x"))
        if self.cut_after_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the verifier is shutting down")
        yield verifier_pb2.GenerateResponse(index=1, final=verifier_pb2.GenerateFinal(finish_reason="length", token_ids=[7]))


@pytest.fixture
def serve():
    servers = []

    def start(servicer) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        verifier_pb2_grpc.add_VerifierServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(None)


def test_busy_refusals_are_retried_by_grpc_within_the_limit(serve):
    scripted = ScriptedVerifier(refusals=2)
    with BlockPilotClient(serve(scripted), retries=2, backoff_s=0.01, timeout=10) as client:
        assert client.generate(token_ids=[1, 2]).token_ids == [7]
    assert scripted.calls == 3
    scripted = ScriptedVerifier(refusals=3)
    with BlockPilotClient(serve(scripted), retries=2, backoff_s=0.01, timeout=10) as client:
        with pytest.raises(ResourceExhaustedError, match="busy"):
            client.generate(token_ids=[1, 2])
    assert scripted.calls == 3  # the first try and two retries
    scripted = ScriptedVerifier(refusals=1)
    with BlockPilotClient(serve(scripted), retries=0, timeout=10) as client:
        with pytest.raises(ResourceExhaustedError):
            client.generate(token_ids=[1, 2])
    assert scripted.calls == 1


def test_a_stream_that_delivered_tokens_is_never_replayed(serve):
    scripted = ScriptedVerifier(cut_after_first=True)
    with BlockPilotClient(serve(scripted), retries=4, backoff_s=0.01, timeout=10) as client:
        events = []
        with pytest.raises(UnavailableError, match="shutting down"):
            for event in client.stream(token_ids=[1, 2]):
                events.append(event)
    assert [e.token_ids for e in events] == [(7,)] and scripted.calls == 1


def test_the_async_client_retries_the_same_way(serve):
    import asyncio

    scripted = ScriptedVerifier(refusals=2)
    address = serve(scripted)

    async def run():
        async with AsyncBlockPilotClient(address, retries=2, backoff_s=0.01, timeout=10) as client:
            return [e async for e in client.stream(token_ids=[1])]

    events = asyncio.run(run())
    assert events[-1].final is not None and scripted.calls == 3


def test_wait_for_ready_waits_out_a_server_that_comes_up_late():
    import socket

    with socket.socket() as probe:  # a free port, nothing listening yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    scripted = ScriptedVerifier()
    with BlockPilotClient(f"127.0.0.1:{port}", retries=0, timeout=2, backoff_s=0.01) as fail_fast:
        with pytest.raises(UnavailableError):
            fail_fast.generate(token_ids=[1])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    verifier_pb2_grpc.add_VerifierServicer_to_server(scripted, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    try:
        timer = threading.Timer(1.0, server.start)
        timer.start()
        with BlockPilotClient(f"127.0.0.1:{port}", retries=1, timeout=20, wait_for_ready=True) as patient:
            assert patient.generate(token_ids=[1]).token_ids == [7]
    finally:
        timer.join()
        server.stop(None)


@pytest.mark.parametrize("retries", [-1, 5, 1.5, True])
def test_retries_outside_grpcs_limit_are_refused(retries):
    with pytest.raises(ValueError, match="retries must be"):
        retry_service_config(retries, 0.1)


def test_the_service_config_names_the_verifier_and_the_transient_codes():
    config = json.loads(retry_service_config(3, 0.2, wait_for_ready=True))
    method = config["methodConfig"][0]
    assert method["name"] == [{"service": "blockpilot.v1.Verifier"}] and method["waitForReady"] is True
    assert method["retryPolicy"]["maxAttempts"] == 4
    assert set(method["retryPolicy"]["retryableStatusCodes"]) == {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}
    assert "retryPolicy" not in json.loads(retry_service_config(0, 0.2))["methodConfig"][0]
