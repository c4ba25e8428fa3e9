"""Overload beyond the verifier's stream limit, and a drafter restarted (SIGTERM drain) under a
stream in flight: real service processes on loopback, an own redis-server, the tiny random target
(token-id prompts). References are the service's own outputs one request at a time at block size
1, prompt lookup off (benchmarks/faults.py runs the same faults, and more, on the default model)."""

from __future__ import annotations

import grpc
import pytest

from blockpilot.v1 import verifier_pb2 as pb
from blockpilot.v1 import verifier_pb2_grpc
from service_stack import Redis, Service, wait_until

pytestmark = pytest.mark.timeout(300)

MAX_STREAMS = 2
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14], [20, 30, 40, 50, 60]]
NEW_TOKENS = 100


@pytest.fixture(scope="module")
def stack(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    redis = Redis(folder).start()
    (folder / "policies").mkdir()
    policy = Service("policy", folder, redis_url=redis.url, repository=folder / "policies", default_policy="default").start()
    # Every draft step waits 10 ms, so a 100-token drafting stream stays open for a second or more on any
    # machine (what lets a fault meet it in flight); a short drain grace, so a SIGTERM cuts it.
    drafter = Service("drafter", folder, target=tiny_llama_dir, drafter="random", random_block_size=4, step_delay_s=0.01,
                      grace_s=0.3).start()
    verifier = Service("verifier", folder, target=tiny_llama_dir, drafter_address=drafter.address,
                       policy_address=policy.address, redis_url=redis.url, max_streams=MAX_STREAMS).start()
    try:
        for service in (policy, drafter, verifier):
            service.wait_serving(timeout=180)
        with grpc.insecure_channel(verifier.address) as channel:
            stub = verifier_pb2_grpc.VerifierStub(channel)
            references = [tokens_of(stub.Generate(request(p, mode=pb.BLOCK_SIZE_MODE_OFF), timeout=60)) for p in PROMPTS]
            yield {"stub": stub, "drafter": drafter, "verifier": verifier, "references": references}
    finally:
        for service in (verifier, drafter, policy):
            service.stop()
        redis.stop()


def request(prompt, mode=pb.BLOCK_SIZE_MODE_FIXED, block_size=4) -> pb.GenerateRequest:
    """Greedy, prompt lookup off: a drafting request calls the drafter at every step."""
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingOptions(max_new_tokens=NEW_TOKENS),
                              block_size_mode=mode, block_size=block_size if mode == pb.BLOCK_SIZE_MODE_FIXED else 0,
                              prompt_lookup=pb.PROMPT_LOOKUP_OFF)


def tokens_of(messages) -> list[int]:
    return [t for m in messages if m.WhichOneof("payload") == "delta" for t in m.delta.token_ids]


def final_of(messages) -> pb.GenerateFinal:
    assert messages[-1].WhichOneof("payload") == "final"
    return messages[-1].final


def test_requests_beyond_the_stream_limit_are_refused_and_the_admitted_streams_are_unharmed(stack):
    stub, references = stack["stub"], stack["references"]
    admitted = [stub.Generate(request(p), timeout=120) for p in PROMPTS[:MAX_STREAMS]]
    received = [[next(call)] for call in admitted]  # each has its first message: both slots are taken
    for prompt in PROMPTS:
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(request(prompt), timeout=60))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
        assert f"limit of {MAX_STREAMS} concurrent streams" in refused.value.details()
    for messages, call in zip(received, admitted):
        messages += list(call)
    for index, messages in enumerate(received):
        assert tokens_of(messages) == references[index] and list(final_of(messages).token_ids) == references[index]
        assert final_of(messages).fallback_reason == ""
    # The slots are free again once the streams ended.
    assert wait_until(lambda: stack["verifier"].metric("blockpilot_inflight_requests", service="verifier") == 0, timeout=10)
    assert tokens_of(list(stub.Generate(request(PROMPTS[2]), timeout=60))) == references[2]


def test_drafter_restarted_under_a_stream_in_flight(stack):
    stub, drafter, references = stack["stub"], stack["drafter"], stack["references"]
    call = stub.Generate(request(PROMPTS[0]), timeout=120)
    messages = [next(call) for _ in range(3)]
    assert drafter.stop() == 0  # SIGTERM: its drain cuts the draft stream after grace_s, then it exits 0
    messages += list(call)
    final = final_of(messages)
    assert tokens_of(messages) == references[0] and list(final.token_ids) == references[0]
    assert final.fallback_reason == "drafter_lost"  # the rest ran at block size 1
    assert final.acceptance_lengths[-1] == 1
    drafter.start().wait_serving(timeout=120)
    # The verifier's channel reconnects (bounded backoff): wait until a request drafts again.
    warm = lambda: final_of(list(stub.Generate(request(PROMPTS[1]), timeout=60))).fallback_reason == ""  # noqa: E731
    assert wait_until(warm, timeout=30, interval=0.3)
    messages = list(stub.Generate(request(PROMPTS[0]), timeout=60))
    assert tokens_of(messages) == references[0] and final_of(messages).fallback_reason == ""
