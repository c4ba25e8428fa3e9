"""Session routing across drafter replicas, with real processes on loopback ports and an own
redis-server: two drafter replicas, each advertising its own address, behind one load-balanced
"service" address (a TCP proxy standing in for a ClusterIP Service: a connection stays on the
replica it reached when it opened). The verifier's drafter_address is the proxy. A follow-up turn
drafts on the replica the session's Redis record names, wherever the proxy points; when that
replica is gone it falls back to the proxy and rebuilds the cache. Tests run in file order."""

from __future__ import annotations

import grpc
import pytest
import redis

from blockpilot.decoding.lookup import LookupConfig
from blockpilot.decoding.speculative import SamplingParams, SpeculativeDecoder
from blockpilot.serving.models import load_served_drafter, load_served_target
from blockpilot.v1 import verifier_pb2 as pb
from blockpilot.v1 import verifier_pb2_grpc
from service_stack import Redis, Service, TcpProxy, free_port, wait_until

pytestmark = pytest.mark.timeout(300)

PROMPT = [5, 6, 7, 8, 9, 10]
DRAFTER_BLOCK = 8
BLOCK = 4  # the turns' fixed block size


@pytest.fixture(scope="module")
def stack(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("routing")
    store = Redis(folder).start()
    proxy = TcpProxy()
    drafters = {}
    for name in ("a", "b"):
        port = free_port()
        drafters[name] = Service("drafter", folder, port=port, target=tiny_llama_dir, drafter="random",
                                 random_block_size=DRAFTER_BLOCK, replica_id=f"drafter-{name}",
                                 advertise_address=f"127.0.0.1:{port}").start()
    proxy.point_to(drafters["a"].port)
    verifier = Service("verifier", folder, target=tiny_llama_dir, drafter_address=proxy.address, policy_address="",
                       redis_url=store.url, drafter_timeout_s=5, drafter_connect_timeout_s=1,
                       load_aware_drafts=False).start()
    try:
        for service in (*drafters.values(), verifier):
            service.wait_serving(timeout=180)
        channel = grpc.insecure_channel(verifier.address)
        yield {"stub": verifier_pb2_grpc.VerifierStub(channel), "verifier": verifier, "proxy": proxy, "redis": store,
               **drafters}
        channel.close()
    finally:
        for service in (verifier, *drafters.values()):
            service.stop()
        proxy.close()
        store.stop()


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    """The same target and 'random' drafter in process (the references)."""
    target = load_served_target(str(tiny_llama_dir))
    drafter, _ = load_served_drafter(target, "random", random_block_size=DRAFTER_BLOCK)
    return target.model, drafter


def reference(engine, prompt, max_new_tokens, block_size):
    target, drafter = engine
    decoder = SpeculativeDecoder(target, drafter if block_size > 1 else None)
    return decoder.generate(prompt, SamplingParams(max_new_tokens=max_new_tokens), block_size, lookup=LookupConfig())


def turn(stack, prompt, max_new_tokens=16, **kwargs):
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingOptions(max_new_tokens=max_new_tokens),
                             block_size_mode=pb.BLOCK_SIZE_MODE_FIXED, block_size=BLOCK, **kwargs)
    messages = list(stack["stub"].Generate(req, timeout=60))
    assert messages[-1].WhichOneof("payload") == "final"
    return messages[-1].final, messages[-1].session_id


def record(stack, session):
    return redis.Redis(port=stack["redis"].port, decode_responses=True).hgetall(f"bp:{{{session}}}:meta")


def streams(replica: Service) -> float:
    """Draft streams the replica has served, once none is open (a stream is counted as it ends,
    just after the verifier's turn has ended)."""
    assert wait_until(lambda: replica.metric("blockpilot_drafter_sessions") == 0, timeout=5)
    return replica.metric("blockpilot_requests_total", service="drafter")


def check_exact(engine, prompt, final, max_new_tokens=16):
    """Identical to block size 1; the same steps as the same drafter in process (same draft context)."""
    assert list(final.token_ids) == reference(engine, prompt, max_new_tokens, 1).token_ids
    assert list(final.acceptance_lengths) == reference(engine, prompt, max_new_tokens, BLOCK).acceptance_lengths


def test_a_follow_up_turn_drafts_on_the_replica_its_record_names(stack, engine):
    a, b, proxy = stack["a"], stack["b"], stack["proxy"]
    first, session = turn(stack, PROMPT, new_session=True)
    check_exact(engine, PROMPT, first)
    kept = record(stack, session)
    assert kept["drafter_replica"] == "drafter-a" and kept["drafter_replica_address"] == a.address
    held = int(kept["drafter_cache_len"])
    assert held > len(PROMPT)
    # The service address now leads to b (a's connections dropped, as when a pod drains its
    # connections or a new connection lands elsewhere): the session still drafts on a.
    proxy.point_to(b.port)
    # A one-off request goes through the proxy, to b once the verifier has seen a's connection go.
    assert wait_until(lambda: turn(stack, PROMPT)[0].fallback_reason == "" and streams(b) >= 1, timeout=20, interval=0.3)
    a_streams, b_streams = streams(a), streams(b)
    hits = a.metric("blockpilot_drafter_cache_resumes_total", result="hit")
    conversation = PROMPT + list(first.token_ids) + [11, 12, 13]
    second, _ = turn(stack, conversation, session_id=session)
    check_exact(engine, conversation, second)
    assert second.usage.cached_draft_tokens == held and second.fallback_reason == ""
    assert wait_until(lambda: streams(a) == a_streams + 1, timeout=5) and streams(b) == b_streams
    assert a.metric("blockpilot_drafter_cache_resumes_total", result="hit") == hits + 1
    assert record(stack, session)["drafter_replica_address"] == a.address
    stack["session"], stack["conversation"], stack["last"] = session, conversation, second


def test_when_that_replica_is_gone_the_turn_falls_back_and_rebuilds(stack, engine):
    a, b, verifier = stack["a"], stack["b"], stack["verifier"]
    session, conversation = stack["session"], stack["conversation"] + list(stack["last"].token_ids) + [14]
    assert record(stack, session)["drafter_replica_address"] == a.address
    assert a.stop() == 0  # drained and gone: its kept caches with it
    b_streams, misses = streams(b), b.metric("blockpilot_drafter_cache_resumes_total", result="miss")
    third, _ = turn(stack, conversation, session_id=session)
    check_exact(engine, conversation, third)
    assert third.usage.cached_draft_tokens == 0
    assert third.fallback_reason.split(",") == ["drafter_replica_unavailable", "drafter_cache_rebuilt"]
    assert verifier.metric("blockpilot_fallbacks_total", reason="drafter_replica_unavailable") == 1
    assert wait_until(lambda: streams(b) == b_streams + 1, timeout=5)
    assert b.metric("blockpilot_drafter_cache_resumes_total", result="miss") == misses + 1
    assert "drafter_replica_unavailable" in verifier.log()  # logged with the session and the address
    # The rebuilt cache is recorded on b, and the next turn drafts there without a fallback.
    kept = record(stack, session)
    assert kept["drafter_replica"] == "drafter-b" and kept["drafter_replica_address"] == b.address
    conversation = conversation + list(third.token_ids) + [15]
    fourth, _ = turn(stack, conversation, session_id=session)
    check_exact(engine, conversation, fourth)
    assert fourth.usage.cached_draft_tokens == int(kept["drafter_cache_len"]) and fourth.fallback_reason == ""


def test_connection_age_moves_a_client_onto_a_replica_added_behind_the_service(stack):
    """A replica that ends connections by age (max_connection_age_s): the verifier's connection
    through the service address is closed and reopened, and then reaches the new replica."""
    a, b, proxy = stack["a"], stack["b"], stack["proxy"]
    a.flags.update(max_connection_age_s=1, max_connection_age_grace_s=1)
    a.start().wait_serving(timeout=120)
    proxy.point_to(a.port)  # the verifier's connection reconnects to a
    assert wait_until(lambda: turn(stack, PROMPT)[0].fallback_reason == "" and streams(a) >= 1, timeout=20, interval=0.3)
    # b is "added": new connections go to b, open ones stay where they are.
    proxy.point_to(b.port, drop=False)
    b_streams = streams(b)
    a_streams = streams(a)
    # Within about a second a's connection ends by age; the next request reaches b.
    assert wait_until(lambda: turn(stack, PROMPT)[0].fallback_reason == "" and streams(b) > b_streams, timeout=15,
                      interval=0.5)
    before = streams(a)
    assert before >= a_streams
    final, _ = turn(stack, PROMPT)
    assert final.fallback_reason == ""
    assert wait_until(lambda: streams(b) > b_streams + 1, timeout=5) and streams(a) == before
