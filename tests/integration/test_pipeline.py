"""The three services as real processes on loopback ports, with an own redis-server and a tiny
random target (no tokenizer: prompts are token ids). Processes start once for the module; the
fault tests run last, in file order (policy down, Redis stopped, drafter killed)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import grpc
import pytest
import torch

from blockpilot.decoding.lookup import LOOKUP_OFF, LookupConfig
from blockpilot.decoding.speculative import SamplingParams, SpeculativeDecoder
from blockpilot.serving.models import load_served_drafter, load_served_target
from blockpilot.v1 import verifier_pb2 as pb
from blockpilot.v1 import verifier_pb2_grpc
from service_stack import Redis, Service, wait_until

pytestmark = pytest.mark.timeout(300)

PROMPT = [5, 6, 7, 8, 9, 10]
DRAFTER_BLOCK = 8
VOCAB = 97


@pytest.fixture(scope="module")
def stack(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stack")
    redis = Redis(folder).start()
    # The fixed default size answers AUTO requests (no learned policy: the repository is empty).
    (folder / "policies").mkdir()
    policy = Service("policy", folder, redis_url=redis.url, repository=folder / "policies", default_policy="default").start()
    drafter = Service("drafter", folder, target=tiny_llama_dir, drafter="random", random_block_size=DRAFTER_BLOCK,
                      step_delay_s=0.01).start()
    verifier = Service("verifier", folder, target=tiny_llama_dir, drafter_address=f"127.0.0.1:{drafter.port}",
                       policy_address=f"127.0.0.1:{policy.port}", redis_url=redis.url, max_new_tokens_cap=1000,
                       drafter_timeout_s=5, redis_timeout_s=0.3,
                       # The tests compare step structures with in-process runs; the load-aware cap
                       # (timing-driven, tested in test_load_cap.py) would change them, not the tokens.
                       load_aware_drafts=False).start()
    services = {"redis": redis, "policy": policy, "drafter": drafter, "verifier": verifier}
    try:
        for service in (policy, drafter, verifier):
            service.wait_serving(timeout=180)
        channel = grpc.insecure_channel(verifier.address)
        services["stub"] = verifier_pb2_grpc.VerifierStub(channel)
        services["channel"] = channel
        yield services
        channel.close()
    finally:
        for service in (verifier, drafter, policy):
            service.stop()
        redis.stop()


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    """The same target and the same 'random' drafter in process."""
    target = load_served_target(str(tiny_llama_dir))
    drafter, _ = load_served_drafter(target, "random", random_block_size=DRAFTER_BLOCK)
    return target.model, drafter


def in_process(engine, prompt, max_new_tokens, block_size, lookup=LookupConfig(), **sampling):
    """The same request in process; lookup: the verifier's default (prompt lookup on) unless given."""
    target, drafter = engine
    decoder = SpeculativeDecoder(target, drafter if block_size > 1 else None)
    return decoder.generate(prompt, SamplingParams(max_new_tokens=max_new_tokens, **sampling), block_size, lookup=lookup)


def request(prompt=PROMPT, max_new_tokens=24, mode=pb.BLOCK_SIZE_MODE_AUTO, block_size=0, sampling=None, **kwargs):
    options = sampling if sampling is not None else pb.SamplingOptions()
    options.max_new_tokens = max_new_tokens
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=options, block_size_mode=mode,
                              block_size=block_size, **kwargs)


def collect(stub, req, timeout=60):
    messages = list(stub.Generate(req, timeout=timeout))
    assert [m.index for m in messages] == list(range(len(messages)))
    final = messages[-1]
    assert final.WhichOneof("payload") == "final"
    assert all(m.WhichOneof("payload") == "delta" for m in messages[:-1])
    streamed = [t for m in messages[:-1] for t in m.delta.token_ids]
    assert streamed == list(final.final.token_ids)
    return final.final, final.session_id


def status_of(stub, req, timeout=30) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(req, timeout=timeout))
    return info.value


def test_pipeline_equals_in_process_token_for_token(stack, engine):
    stub = stack["stub"]
    reference = in_process(engine, PROMPT, 40, 1)
    for mode, size in [(pb.BLOCK_SIZE_MODE_OFF, 0), (pb.BLOCK_SIZE_MODE_FIXED, 2), (pb.BLOCK_SIZE_MODE_FIXED, 5),
                       (pb.BLOCK_SIZE_MODE_FIXED, 8), (pb.BLOCK_SIZE_MODE_AUTO, 0)]:
        final, _ = collect(stub, request(max_new_tokens=40, mode=mode, block_size=size))
        expected_size = {pb.BLOCK_SIZE_MODE_OFF: 1, pb.BLOCK_SIZE_MODE_AUTO: DRAFTER_BLOCK}.get(mode, size)
        assert list(final.token_ids) == reference.token_ids, (mode, size)
        assert final.block_size == expected_size and final.fallback_reason == ""
        # Same drafter in both places: the same drafts, so the same acceptance per step.
        speculative = in_process(engine, PROMPT, 40, expected_size)
        assert list(final.acceptance_lengths) == speculative.acceptance_lengths
        assert final.finish_reason == "length" and final.usage.completion_tokens == 40
    assert final.policy_version == "fixed-v1" and final.arm == "default" and final.decision_id
    assert final.prompt_lookup and set(final.accepted_by_source) == {"dflash", "lookup"}
    # Prompt lookup off for one request: DFlash drafts only, the in-process steps without lookup.
    final, _ = collect(stub, request(max_new_tokens=40, mode=pb.BLOCK_SIZE_MODE_FIXED, block_size=5,
                                     prompt_lookup=pb.PROMPT_LOOKUP_OFF))
    plain = in_process(engine, PROMPT, 40, 5, lookup=LOOKUP_OFF)
    assert list(final.token_ids) == reference.token_ids and list(final.acceptance_lengths) == plain.acceptance_lengths
    assert not final.prompt_lookup and final.accepted_by_source["lookup"] == 0 and final.drafter_passes_skipped == 0
    assert final.accepted_by_source["dflash"] == plain.accepted_by_source["dflash"]
    assert stack["verifier"].metric("blockpilot_drafts_total") > 0
    assert stack["verifier"].metric("blockpilot_block_size_chosen_total", block_size="8", policy_version="fixed-v1") >= 1
    assert stack["drafter"].metric("blockpilot_drafter_sessions") == 0


def test_concurrent_streams_share_drafter_passes_and_keep_their_outputs(stack, engine):
    """Six streams at once with their own prompts and block sizes: the drafter runs their steps
    in shared passes (its batch histogram says so) and every stream equals its in-process run,
    draft for draft (the same acceptance per step)."""
    stub = stack["stub"]
    drafter = stack["drafter"]
    passes_before = drafter.metric("blockpilot_drafter_batch_sessions_count")
    steps_before = drafter.metric("blockpilot_drafter_batch_sessions_sum")
    jobs = [([5 + i, 6, 7 + i, 8, 9, 10 + i], 3 + i) for i in range(6)]
    results = [None] * len(jobs)

    def run(index):
        prompt, size = jobs[index]
        results[index], _ = collect(stub, request(prompt=prompt, max_new_tokens=32, mode=pb.BLOCK_SIZE_MODE_FIXED,
                                                  block_size=size, prompt_lookup=pb.PROMPT_LOOKUP_OFF))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for (prompt, size), final in zip(jobs, results):
        alone = in_process(engine, prompt, 32, size, lookup=LOOKUP_OFF)
        assert list(final.token_ids) == in_process(engine, prompt, 32, 1).token_ids
        assert list(final.acceptance_lengths) == alone.acceptance_lengths, size
    passes = drafter.metric("blockpilot_drafter_batch_sessions_count") - passes_before
    steps = drafter.metric("blockpilot_drafter_batch_sessions_sum") - steps_before
    # Every drafted step went through a pass (a stream's last step may verify its anchor alone),
    # and some passes drafted for several sessions.
    assert 0 < passes < steps <= sum(len(final.acceptance_lengths) for final in results)


def test_multi_turn_reuses_the_cache_and_equals_one_shot(stack, engine):
    import redis

    stub = stack["stub"]
    first, session = collect(stub, request(max_new_tokens=20, mode=pb.BLOCK_SIZE_MODE_FIXED, block_size=4, new_session=True))
    assert session
    conversation = PROMPT + list(first.token_ids) + [11, 12, 13]
    second, same = collect(stub, request(conversation, max_new_tokens=20, mode=pb.BLOCK_SIZE_MODE_FIXED, block_size=4,
                                         session_id=session))
    assert same == session
    assert list(second.token_ids) == in_process(engine, conversation, 20, 1).token_ids
    assert second.usage.cached_prompt_tokens > len(PROMPT)  # the conversation prefix came from the cache
    record = redis.Redis(port=stack["redis"].port, decode_responses=True).hgetall(f"bp:{{{session}}}:meta")
    assert record["state"] == "idle" and int(record["committed_tokens"]) == len(conversation) + 20
    assert int(record["step"]) == 2 and record["verifier_replica"] and int(record["verifier_cache_len"]) > 0
    assert redis.Redis(port=stack["redis"].port).ttl(f"bp:{{{session}}}:meta") > 0
    # A third turn whose prefix differs (edited history) re-prefills and is still exact.
    edited = [7] + conversation[1:]
    third, _ = collect(stub, request(edited, max_new_tokens=10, mode=pb.BLOCK_SIZE_MODE_OFF, session_id=session))
    assert list(third.token_ids) == in_process(engine, edited, 10, 1).token_ids
    assert third.usage.cached_prompt_tokens == 0


@pytest.mark.parametrize("draft_sampling", ["greedy", "sample"])
def test_sampling_pipeline_equals_in_process_token_for_token(stack, engine, draft_sampling):
    """T > 0: the verifier draws every uniform (draft sampling included) from the request's seeded
    stream and q travels over the wire, so the pipeline reproduces the in-process run exactly."""
    stub = stack["stub"]
    wire = {"greedy": pb.DRAFT_SAMPLING_GREEDY, "sample": pb.DRAFT_SAMPLING_SAMPLE}[draft_sampling]
    for block_size, seed in [(1, 3), (2, 4), (5, 5), (8, 6)]:
        sampling = pb.SamplingOptions(temperature=0.9, seed=seed, draft_sampling=wire)
        mode = pb.BLOCK_SIZE_MODE_FIXED if block_size > 1 else pb.BLOCK_SIZE_MODE_OFF
        final, _ = collect(stub, request(max_new_tokens=40, mode=mode, block_size=block_size if block_size > 1 else 0,
                                         sampling=sampling))
        expected = in_process(engine, PROMPT, 40, block_size, temperature=0.9, seed=seed, draft_sampling=draft_sampling)
        assert list(final.token_ids) == expected.token_ids, (draft_sampling, block_size)
        assert list(final.acceptance_lengths) == expected.acceptance_lengths, (draft_sampling, block_size)
        assert final.fallback_reason == ""
    # Different seeds give different samples (the comparison above is not vacuous).
    other = in_process(engine, PROMPT, 40, 1, temperature=0.9, seed=99, draft_sampling=draft_sampling)
    assert other.token_ids != in_process(engine, PROMPT, 40, 1, temperature=0.9, seed=3, draft_sampling=draft_sampling).token_ids


def test_multi_turn_resumes_the_drafter_cache(stack, engine):
    """Each drafting turn sends the drafter only the context its kept cache lacks; a block size 1
    turn in between keeps the features, so the next drafting turn neither prefills nor resends."""
    import redis

    stub, drafter = stack["stub"], stack["drafter"]
    fixed = dict(mode=pb.BLOCK_SIZE_MODE_FIXED, block_size=4)
    first, session = collect(stub, request(max_new_tokens=20, new_session=True, **fixed))
    assert first.usage.cached_draft_tokens == 0
    assert wait_until(lambda: drafter.metric("blockpilot_drafter_cached_sessions") >= 1, timeout=5)
    assert drafter.metric("blockpilot_drafter_sessions") == 0  # live streams only
    record = redis.Redis(port=stack["redis"].port, decode_responses=True).hgetall(f"bp:{{{session}}}:meta")
    held = int(record["drafter_cache_len"])
    assert held > len(PROMPT) and record["drafter_cache_tag"] and record["drafter_replica"]
    conversation = PROMPT + list(first.token_ids) + [11, 12, 13]
    hits = drafter.metric("blockpilot_drafter_cache_resumes_total", result="hit")
    second, _ = collect(stub, request(conversation, max_new_tokens=20, session_id=session, **fixed))
    one_shot = in_process(engine, conversation, 20, 4)
    assert list(second.token_ids) == one_shot.token_ids
    assert list(second.acceptance_lengths) == one_shot.acceptance_lengths  # same drafts: same draft context
    assert second.usage.cached_draft_tokens == held and second.fallback_reason == ""
    assert drafter.metric("blockpilot_drafter_cache_resumes_total", result="hit") == hits + 1
    # A block size 1 turn, then a drafting turn: the target cache covers the whole conversation
    # (features kept at block size 1) and the drafter still holds the second turn's context.
    record = redis.Redis(port=stack["redis"].port, decode_responses=True).hgetall(f"bp:{{{session}}}:meta")
    conversation = conversation + list(second.token_ids) + [14, 15]
    third, _ = collect(stub, request(conversation, max_new_tokens=10, mode=pb.BLOCK_SIZE_MODE_OFF, session_id=session))
    assert list(third.token_ids) == in_process(engine, conversation, 10, 1).token_ids
    conversation = conversation + list(third.token_ids) + [16]
    fourth, _ = collect(stub, request(conversation, max_new_tokens=20, session_id=session, **fixed))
    one_shot = in_process(engine, conversation, 20, 4)
    assert list(fourth.token_ids) == one_shot.token_ids and list(fourth.acceptance_lengths) == one_shot.acceptance_lengths
    assert fourth.usage.cached_prompt_tokens == len(conversation) - 2  # all but the last output token and the new one
    assert fourth.usage.cached_draft_tokens == int(record["drafter_cache_len"]) and fourth.fallback_reason == ""


def test_bad_inputs_get_their_status_while_another_stream_runs(stack, engine):
    stub = stack["stub"]
    long_reference = in_process(engine, PROMPT, 300, 1)
    outcome = {}

    def long_stream():
        outcome["final"], _ = collect(stub, request(max_new_tokens=300, mode=pb.BLOCK_SIZE_MODE_FIXED, block_size=4), timeout=120)

    worker = threading.Thread(target=long_stream)
    worker.start()
    C = grpc.StatusCode
    cases = [
        (pb.GenerateRequest(), C.INVALID_ARGUMENT, "prompt is empty"),
        (request([]), C.INVALID_ARGUMENT, "prompt is empty"),
        (request([5, -1]), C.INVALID_ARGUMENT, "outside the vocabulary"),
        (request([5, VOCAB]), C.INVALID_ARGUMENT, "outside the vocabulary"),
        (request(max_new_tokens=600), C.RESOURCE_EXHAUSTED, "exceeds the context of 512"),
        (request(max_new_tokens=-1), C.INVALID_ARGUMENT, "max_new_tokens must be in 1..1000"),
        (request(max_new_tokens=1001), C.INVALID_ARGUMENT, "max_new_tokens must be in 1..1000"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), sampling=pb.SamplingOptions(temperature=-1)), C.INVALID_ARGUMENT, "temperature"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), sampling=pb.SamplingOptions(temperature=float("nan"))), C.INVALID_ARGUMENT, "temperature"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), sampling=pb.SamplingOptions(temperature=float("inf"))), C.INVALID_ARGUMENT, "temperature"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), sampling=pb.SamplingOptions(stop_token_ids=[1000])), C.INVALID_ARGUMENT, "stop token ids [1000]"),
        (request(mode=pb.BLOCK_SIZE_MODE_FIXED, block_size=65), C.INVALID_ARGUMENT, "block size must be <= 64"),
        (request(mode=pb.BLOCK_SIZE_MODE_FIXED, block_size=0), C.INVALID_ARGUMENT, "block size must be >= 1"),
        (request(prompt_lookup=7), C.INVALID_ARGUMENT, "unknown prompt_lookup 7"),
        (request(policy="no-such-policy"), C.NOT_FOUND, "unknown policy 'no-such-policy'"),
        (request(policy="fixed-99"), C.INVALID_ARGUMENT, "outside the allowed range"),
        (request(session_id="no-such-session"), C.NOT_FOUND, "unknown or expired session 'no-such-session'"),
        (pb.GenerateRequest(text="hello"), C.FAILED_PRECONDITION, "no tokenizer"),
        (request(list(range(50)) * 6000), C.RESOURCE_EXHAUSTED, ""),  # 300k ids: over the 1 MiB message limit
    ]
    for req, code, fragment in cases:
        error = status_of(stub, req)
        assert error.code() == code, (req, error)
        assert fragment in error.details(), (fragment, error.details())
        assert "Traceback" not in error.details()
    # Bytes that are no GenerateRequest (a corrupt wire format; a text prompt that is not UTF-8).
    raw = stack["channel"].unary_stream("/blockpilot.v1.Verifier/Generate", request_serializer=None, response_deserializer=None)
    for payload in (b"\xff\xff\xff\xff", b"\x0a\x03\xff\xfe\xfd", bytes(range(256))):
        with pytest.raises(grpc.RpcError) as caught:
            list(raw(payload, timeout=30))
        assert caught.value.code() == C.INVALID_ARGUMENT, caught.value
        assert "not a valid blockpilot.v1.GenerateRequest message" in caught.value.details()
        assert "class" not in caught.value.details() and "DecodeError" not in caught.value.details()
    # Echoed ids are cut short; errors name no internal address.
    error = status_of(stub, request(session_id="s" * 20000))
    assert error.code() == C.NOT_FOUND and "(20000 characters)" in error.details() and len(error.details()) < 300
    error = status_of(stub, request(policy="no-such-policy"))
    assert "127.0.0.1" not in error.details() and str(stack["policy"].port) not in error.details()
    # An already expired deadline.
    error = status_of(stub, request(), timeout=0.000001)
    assert error.code() == C.DEADLINE_EXCEEDED
    # The same session used by two streams at once.
    _, session = collect(stub, request(max_new_tokens=2, mode=pb.BLOCK_SIZE_MODE_OFF, new_session=True))
    busy = stub.Generate(request(max_new_tokens=200, mode=pb.BLOCK_SIZE_MODE_FIXED, block_size=4, session_id=session), timeout=60)
    next(busy)
    error = status_of(stub, request(session_id=session))
    assert error.code() == C.ABORTED and "already in use" in error.details()
    busy.cancel()
    worker.join(timeout=120)
    assert list(outcome["final"].token_ids) == long_reference.token_ids  # unharmed


def test_fuzzed_requests_get_a_proper_status_and_the_server_keeps_serving(stack, engine):
    """Random mutations of valid GenerateRequest bytes (flipped, cut, inserted, repeated bytes):
    every reply is a stream or a proper status, never UNKNOWN or INTERNAL, and a normal request
    afterwards still gets the in-process tokens."""
    import random

    raw = stack["channel"].unary_stream("/blockpilot.v1.Verifier/Generate", request_serializer=None, response_deserializer=None)
    seeds = [request(max_new_tokens=4).SerializeToString(),
             request(max_new_tokens=3, mode=pb.BLOCK_SIZE_MODE_FIXED, block_size=3, policy="default").SerializeToString(),
             pb.GenerateRequest(text="hello", sampling=pb.SamplingOptions(temperature=0.5, max_new_tokens=2)).SerializeToString()]
    rng = random.Random(1234)
    codes = Counter()
    for _ in range(300):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            where = rng.randrange(len(data) + 1)
            action = rng.randrange(4)
            if action == 0 and data:
                data[min(where, len(data) - 1)] = rng.randrange(256)
            elif action == 1:
                del data[where: where + rng.randint(1, 8)]
            elif action == 2:
                data[where:where] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            else:
                data += data[: rng.randint(0, len(data))]
        try:
            for _ in raw(bytes(data), timeout=30):
                pass
            codes["OK"] += 1
        except grpc.RpcError as err:
            codes[err.code().name] += 1
            assert err.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (bytes(data), err.details())
            assert "Traceback" not in err.details() and "<class" not in err.details()
    assert codes["INVALID_ARGUMENT"] > 0 and sum(codes.values()) == 300, codes
    final, _ = collect(stack["stub"], request(max_new_tokens=12, mode=pb.BLOCK_SIZE_MODE_FIXED, block_size=3))
    assert list(final.token_ids) == in_process(engine, PROMPT, 12, 3).token_ids


def test_client_cancel_frees_the_draft_session(stack):
    stub, drafter, verifier = stack["stub"], stack["drafter"], stack["verifier"]
    assert wait_until(lambda: drafter.metric("blockpilot_drafter_sessions") == 0, timeout=10)
    call = stub.Generate(request(max_new_tokens=400, mode=pb.BLOCK_SIZE_MODE_FIXED, block_size=4), timeout=120)
    for _ in range(3):
        next(call)
    assert drafter.metric("blockpilot_drafter_sessions") == 1
    call.cancel()
    assert wait_until(lambda: drafter.metric("blockpilot_drafter_sessions") == 0, timeout=10)
    assert wait_until(lambda: verifier.metric("blockpilot_inflight_requests", service="verifier") == 0, timeout=10)
    assert verifier.metric("blockpilot_requests_total", service="verifier", status="CANCELLED") >= 1


def test_drafter_restarted_between_turns_rebuilds_its_cache(stack, engine):
    stub, drafter = stack["stub"], stack["drafter"]
    fixed = dict(mode=pb.BLOCK_SIZE_MODE_FIXED, block_size=5)
    first, session = collect(stub, request(max_new_tokens=16, new_session=True, **fixed))
    assert drafter.stop() == 0  # SIGTERM: drained, exit 0; its kept caches are gone
    drafter.start().wait_serving(timeout=120)
    # The verifier's channel reconnects (bounded backoff): wait until a one-off request drafts again.
    warm = lambda: collect(stub, request(max_new_tokens=4, **fixed))[0].fallback_reason == ""  # noqa: E731
    assert wait_until(warm, timeout=20, interval=0.3)
    conversation = PROMPT + list(first.token_ids) + [21, 22]
    second, _ = collect(stub, request(conversation, max_new_tokens=20, session_id=session, **fixed))
    one_shot = in_process(engine, conversation, 20, 5)
    assert list(second.token_ids) == one_shot.token_ids and list(second.acceptance_lengths) == one_shot.acceptance_lengths
    assert second.usage.cached_draft_tokens == 0 and second.fallback_reason == "drafter_cache_rebuilt"
    assert second.usage.cached_prompt_tokens > len(PROMPT)  # the target cache was still reused
    assert drafter.metric("blockpilot_drafter_cache_resumes_total", result="miss") == 1
    assert stack["verifier"].metric("blockpilot_fallbacks_total", reason="drafter_cache_rebuilt") >= 1
    # The rebuilt cache is kept again: the next turn resumes it.
    conversation = conversation + list(second.token_ids) + [23]
    third, _ = collect(stub, request(conversation, max_new_tokens=12, session_id=session, **fixed))
    assert list(third.token_ids) == in_process(engine, conversation, 12, 5).token_ids
    assert third.usage.cached_draft_tokens > 0 and third.fallback_reason == ""


def test_policy_down_uses_the_default_block_size(stack, engine):
    stack["policy"].stop()
    final, _ = collect(stack["stub"], request(max_new_tokens=30))
    assert final.block_size == DRAFTER_BLOCK and "policy_unavailable" in final.fallback_reason
    assert list(final.token_ids) == in_process(engine, PROMPT, 30, 1).token_ids
    assert stack["verifier"].metric("blockpilot_fallbacks_total", reason="policy_unavailable") >= 1


def test_redis_stopped_mid_run_fails_open_and_recovers(stack, engine):
    import redis as redis_client

    stub, redis = stack["stub"], stack["redis"]
    reference = in_process(engine, PROMPT, 60, 1)
    call = stub.Generate(request(max_new_tokens=60, mode=pb.BLOCK_SIZE_MODE_FIXED, block_size=4, new_session=True), timeout=60)
    first = next(call)
    redis.stop()  # mid-run
    messages = [first] + list(call)
    assert [t for m in messages[:-1] for t in m.delta.token_ids] == reference.token_ids
    session = first.session_id
    # While Redis is down: new requests and new sessions still work; the session held by this
    # replica can continue.
    final, new_session = collect(stub, request(max_new_tokens=10, mode=pb.BLOCK_SIZE_MODE_OFF, new_session=True))
    assert new_session and "session_store_unavailable" in final.fallback_reason
    follow_up = PROMPT + reference.token_ids + [3]
    final, _ = collect(stub, request(follow_up, max_new_tokens=10, mode=pb.BLOCK_SIZE_MODE_OFF, session_id=session))
    assert list(final.token_ids) == in_process(engine, follow_up, 10, 1).token_ids
    assert stack["verifier"].metric("blockpilot_fallbacks_total", reason="session_store_unavailable") >= 1
    # Redis returns (empty): the verifier uses it again without a restart.
    redis.start()
    time.sleep(1.2)  # the store's retry_after_s
    final, fresh = collect(stub, request(max_new_tokens=5, mode=pb.BLOCK_SIZE_MODE_OFF, new_session=True))
    assert final.fallback_reason == ""
    assert redis_client.Redis(port=redis.port, decode_responses=True).hget(f"bp:{{{fresh}}}:meta", "state") == "idle"


def test_drafter_killed_mid_stream_keeps_the_output(stack, engine):
    stub, drafter, verifier = stack["stub"], stack["drafter"], stack["verifier"]
    reference = in_process(engine, PROMPT, 300, 1)
    call = stub.Generate(request(max_new_tokens=300, mode=pb.BLOCK_SIZE_MODE_FIXED, block_size=4), timeout=120)
    messages = [next(call) for _ in range(5)]
    drafter.kill()
    messages += list(call)
    final = messages[-1].final
    assert [t for m in messages[:-1] for t in m.delta.token_ids] == reference.token_ids
    assert list(final.token_ids) == reference.token_ids
    assert final.fallback_reason == "drafter_lost"
    assert 1 in final.acceptance_lengths[-5:]  # the tail ran autoregressively
    assert verifier.metric("blockpilot_fallbacks_total", reason="drafter_lost") >= 1
    # With the drafter gone, new requests run at block size 1 and say why.
    final, _ = collect(stub, request(max_new_tokens=12, mode=pb.BLOCK_SIZE_MODE_FIXED, block_size=4))
    assert list(final.token_ids) == reference.token_ids[:12] and final.fallback_reason.startswith("drafter_")

