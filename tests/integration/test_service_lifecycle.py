"""Deadlines across hops and graceful drain, on real service processes (tiny random models, an own
in-memory session store: these tests need no Redis). A slow policy (decide_delay_s) shows whether
the verifier's policy call carries the client's deadline; the drain test stops the verifier last."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from blockpilot.config import VerifierServiceConfig
from blockpilot.decoding.speculative import SamplingParams, SpeculativeDecoder
from blockpilot.errors import DeadlineExceededError
from blockpilot.serving.models import load_served_target
from blockpilot.serving.stack import health_status
from blockpilot.serving.verifier import GenerateSpec, VerifierCore
from blockpilot.v1 import verifier_pb2 as pb
from blockpilot.v1 import verifier_pb2_grpc
from service_stack import Service, wait_until

pytestmark = pytest.mark.timeout(300)

PROMPT = [5, 6, 7, 8, 9, 10]
POLICY_DELAY_S = 4.0
GRACE_S = 30.0


@pytest.fixture(scope="module")
def stack(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lifecycle")
    # default_policy "default": the fixed default size answers AUTO requests, whatever policies/ ships.
    policy = Service("policy", folder, redis_url="memory", decide_delay_s=POLICY_DELAY_S, default_policy="default").start()
    drafter = Service("drafter", folder, target=tiny_llama_dir, drafter="random", random_block_size=8,
                      step_delay_s=0.02).start()
    verifier = Service("verifier", folder, target=tiny_llama_dir, drafter_address=drafter.address,
                       policy_address=policy.address, redis_url="memory", policy_timeout_s=60, grace_s=GRACE_S).start()
    try:
        for service in (policy, drafter, verifier):
            service.wait_serving(timeout=180)
        channel = grpc.insecure_channel(verifier.address)
        yield {"policy": policy, "drafter": drafter, "verifier": verifier,
               "stub": verifier_pb2_grpc.VerifierStub(channel)}
        channel.close()
    finally:
        for service in (verifier, drafter, policy):
            service.stop()


def request(max_new_tokens=24, mode=pb.BLOCK_SIZE_MODE_FIXED, block_size=4):
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), sampling=pb.SamplingOptions(max_new_tokens=max_new_tokens),
                              block_size_mode=mode, block_size=block_size)


def test_policy_call_carries_the_client_deadline(stack):
    """The policy answers after 4 s and the verifier's own policy timeout is 60 s; a client with a
    1 s deadline must not leave a policy call running: it is cancelled when the client's time is up."""
    stub, policy = stack["stub"], stack["policy"]
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request(mode=pb.BLOCK_SIZE_MODE_AUTO, block_size=0), timeout=1.0))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: policy.metric("blockpilot_requests_total", service="policy", status="CANCELLED") >= 1,
                      timeout=POLICY_DELAY_S - 1.5, interval=0.05)
    assert time.monotonic() - started < POLICY_DELAY_S - 0.5
    assert policy.metric("blockpilot_policy_decisions_total") == 0  # (DescribePolicy, undelayed, did answer)
    # With time to spare, the same slow policy answers and its block size is used.
    messages = list(stub.Generate(request(mode=pb.BLOCK_SIZE_MODE_AUTO, block_size=0), timeout=60))
    final = messages[-1].final
    assert final.policy_version == "fixed-v1" and final.block_size == 8 and final.fallback_reason == ""


class _Untouchable:
    """Policy, store and drafter source that fail the test when used."""

    def __getattr__(self, name):
        raise AssertionError(f"{name} was called for a request whose deadline had expired")


def test_expired_deadline_is_refused_without_work(tiny_llama_dir):
    target = load_served_target(str(tiny_llama_dir))
    nothing = _Untouchable()
    core = VerifierCore(VerifierServiceConfig(), target, nothing, nothing, nothing)

    async def run():
        spec = GenerateSpec(token_ids=tuple(PROMPT), max_new_tokens=8, deadline=time.monotonic() - 0.001)
        with pytest.raises(DeadlineExceededError, match="already expired"):
            async for _ in core.generate(spec):
                pass

    asyncio.run(run())
    assert core.inflight == 0 and not core._sessions
    core.close()


def test_sigterm_drains_the_verifier(stack, tiny_llama_dir):
    """SIGTERM with a stream in flight: NOT_SERVING at once, new calls refused UNAVAILABLE, the
    in-flight stream runs to its end within the grace period, then the process exits 0."""
    stub, verifier = stack["stub"], stack["verifier"]
    target = load_served_target(str(tiny_llama_dir)).model
    reference = SpeculativeDecoder(target).generate(PROMPT, SamplingParams(max_new_tokens=200), 1)
    call = stub.Generate(request(max_new_tokens=200), timeout=120)
    messages = [next(call) for _ in range(3)]
    signalled = time.monotonic()
    verifier.process.send_signal(15)
    assert wait_until(lambda: health_status(verifier.address, "blockpilot.v1.Verifier", timeout_s=1) == "NOT_SERVING",
                      timeout=2, interval=0.02)
    assert health_status(verifier.address, "", timeout_s=1) == "NOT_SERVING"
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request(max_new_tokens=4), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in info.value.details()
    assert verifier.process.poll() is None  # still serving the stream in flight
    messages += list(call)
    final = messages[-1].final
    assert [m.index for m in messages] == list(range(len(messages)))
    assert list(final.token_ids) == reference.token_ids and final.finish_reason == "length"
    assert [t for m in messages[:-1] for t in m.delta.token_ids] == reference.token_ids
    assert verifier.process.wait(timeout=GRACE_S) == 0
    assert time.monotonic() - signalled < GRACE_S
    assert "draining" in verifier.log() and "verifier stopped" in verifier.log()
