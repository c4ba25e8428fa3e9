"""Policies served for real: the policy service, drafter and verifier as processes on loopback
ports with an own redis-server and a tiny random target (vocab 97, hidden 64). The policy
repository is a temporary folder the tests drop ONNX versions into (tests/policy_onnx.py).

Covers: a pipeline request decided by an ONNX policy through the policy service (and its outcome in
the counters), a new version served without a restart (poll and Reload), a broken version refused
while the old one serves, final_hidden policies and a policy this target cannot feed, feature
validation at the boundary, and an A/B experiment with a shadow arm driven by `blockpilot ab`."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest

from blockpilot.decoding.speculative import SamplingParams, SpeculativeDecoder
from blockpilot.serving.models import load_served_target
from blockpilot.serving.policy import vector_to_proto
from blockpilot.v1 import policy_pb2, policy_pb2_grpc, tensor_pb2
from blockpilot.v1 import verifier_pb2 as pb
from blockpilot.v1 import verifier_pb2_grpc
from policy_onnx import write_garbage_version, write_policy
from service_stack import Redis, Service, wait_until

pytestmark = pytest.mark.timeout(300)

PROMPT = [5, 6, 7, 8, 9, 10]
VOCAB, HIDDEN, DRAFTER_BLOCK = 97, 64, 8


@pytest.fixture(scope="module")
def stack(tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("policy-stack")
    repository = folder / "policies"
    write_policy(repository, "tinypol", 1, choice=3)
    redis = Redis(folder).start()
    policy = Service("policy", folder, redis_url=redis.url, repository=repository, default_policy="tinypol",
                     poll_interval_s=0.3, spec_ttl_s=0.2).start()
    drafter = Service("drafter", folder, target=tiny_llama_dir, drafter="random", random_block_size=DRAFTER_BLOCK).start()
    verifier = Service("verifier", folder, target=tiny_llama_dir, drafter_address=f"127.0.0.1:{drafter.port}",
                       policy_address=f"127.0.0.1:{policy.port}", redis_url=redis.url).start()
    services = {"redis": redis, "policy": policy, "drafter": drafter, "verifier": verifier, "repository": repository}
    try:
        for service in (policy, drafter, verifier):
            service.wait_serving(timeout=180)
        verifier_channel = grpc.insecure_channel(verifier.address)
        policy_channel = grpc.insecure_channel(policy.address)
        services["stub"] = verifier_pb2_grpc.VerifierStub(verifier_channel)
        services["policy_stub"] = policy_pb2_grpc.PolicyStub(policy_channel)
        yield services
        verifier_channel.close()
        policy_channel.close()
    finally:
        for service in (verifier, drafter, policy):
            service.stop()
        redis.stop()


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """Greedy output of the target alone (every block size must give exactly this)."""
    model = load_served_target(str(tiny_llama_dir)).model
    cache = {}

    def tokens(prompt, max_new_tokens):
        key = (tuple(prompt), max_new_tokens)
        if key not in cache:
            cache[key] = SpeculativeDecoder(model, None).generate(prompt, SamplingParams(max_new_tokens=max_new_tokens), 1).token_ids
        return cache[key]

    return tokens


def request(prompt=PROMPT, max_new_tokens=16, **kwargs):
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingOptions(max_new_tokens=max_new_tokens),
                              block_size_mode=pb.BLOCK_SIZE_MODE_AUTO, **kwargs)


def generate(stub, req, timeout=60):
    messages = list(stub.Generate(req, timeout=timeout))
    return messages[-1].final, messages[-1].session_id


def redis_client(stack):
    import redis

    return redis.Redis(port=stack["redis"].port, decode_responses=True)


def decide_request(policy="", **features):
    return policy_pb2.DecideRequest(policy=policy, prompt_tokens=6, default_block_size=8, max_block_size=16,
                                    prefill_features=[policy_pb2.Feature(kind=k, values=v) for k, v in features.items()])


def test_describe_and_feature_validation_at_the_boundary(stack):
    stub = stack["policy_stub"]
    spec = stub.DescribePolicy(policy_pb2.DescribePolicyRequest(), timeout=10)
    assert spec.policy == "tinypol" and [(f.kind, f.dim) for f in spec.features] == [("last_logits", VOCAB)]
    assert list(spec.policy_versions) == ["tinypol/1"] and spec.cache_ttl_s == pytest.approx(0.2)
    from blockpilot.serving.stack import default_policy_line  # what `blockpilot up` prints

    assert default_policy_line(stack["policy"].address) == "default policy tinypol: tinypol/1 (last_logits[97])"
    good = vector_to_proto(np.zeros(VOCAB, dtype=np.float32))
    reply = stub.Decide(decide_request("tinypol", last_logits=good), timeout=10)
    assert (reply.block_size, reply.policy_version, reply.arm, reply.experiment) == (3, "tinypol/1", "tinypol", "")
    nan = np.zeros(VOCAB, dtype=np.float32)
    nan[3] = np.nan
    C = grpc.StatusCode
    cases = [
        (decide_request("tinypol", last_logits=vector_to_proto(nan)), C.INVALID_ARGUMENT, "NaN"),
        (decide_request("tinypol", last_logits=vector_to_proto(np.zeros(VOCAB - 1, dtype=np.float32))), C.INVALID_ARGUMENT,
         "has 96 values; policy tinypol/1 expects 97"),
        (decide_request("tinypol", last_logits=tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[VOCAB], data=b"x")),
         C.INVALID_ARGUMENT, "bytes do not match"),
        (decide_request("tinypol", final_hidden=vector_to_proto(np.zeros(HIDDEN, dtype=np.float32))), C.FAILED_PRECONDITION,
         "needs feature last_logits"),
        (decide_request("no-such-policy"), C.NOT_FOUND, "unknown policy 'no-such-policy'"),
        (decide_request("fixed-40", last_logits=good), C.INVALID_ARGUMENT, "outside the allowed range"),
    ]
    for req, code, fragment in cases:
        with pytest.raises(grpc.RpcError) as info:
            stub.Decide(req, timeout=10)
        assert info.value.code() == code and fragment in info.value.details(), (code, info.value.details())
    with pytest.raises(grpc.RpcError) as info:
        stub.DescribePolicy(policy_pb2.DescribePolicyRequest(policy="nope"), timeout=10)
    assert info.value.code() == C.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        stub.Report(policy_pb2.ReportRequest(decision_id="d", decode_seconds=float("nan")), timeout=10)
    assert info.value.code() == C.INVALID_ARGUMENT
    assert stub.Decide(decide_request("tinypol", last_logits=good), timeout=10).block_size == 3  # still serving


def test_pipeline_request_decides_through_the_onnx_policy(stack, reference):
    final, _ = generate(stack["stub"], request(max_new_tokens=24))
    assert (final.block_size, final.policy_version, final.arm, final.experiment) == (3, "tinypol/1", "tinypol", "")
    assert final.decision_id and final.fallback_reason == ""
    assert list(final.token_ids) == reference(PROMPT, 24)  # lossless at the policy's size
    assert max(final.acceptance_lengths) <= 3
    client = redis_client(stack)
    assert wait_until(lambda: float(client.hget("bp:arm:tinypol/1:tinypol", "requests") or 0) >= 1, timeout=10)
    assert stack["policy"].metric("blockpilot_policy_decisions_total", policy_version="tinypol/1", arm="tinypol",
                                  block_size="3") >= 1
    assert wait_until(lambda: stack["policy"].metric("blockpilot_policy_outcomes_total", policy_version="tinypol/1") >= 1)
    assert stack["policy"].metric("blockpilot_policy_tau_count", policy_version="tinypol/1", arm="tinypol") >= 1
    assert stack["verifier"].metric("blockpilot_block_size_chosen_total", block_size="3", policy_version="tinypol/1",
                                    arm="tinypol") >= 1
    assert stack["verifier"].metric("blockpilot_acceptance_length_count", policy_version="tinypol/1", arm="tinypol") >= 1
    assert stack["policy"].metric("blockpilot_policy_served", policy_version="tinypol/1") == 1


def test_new_version_is_served_without_restart_and_a_broken_one_is_refused(stack, reference):
    repository, stub = stack["repository"], stack["stub"]
    write_policy(repository, "tinypol", 2, choice=5)

    def serves(version, size):
        final, _ = generate(stub, request(max_new_tokens=8))
        return final.policy_version == version and final.block_size == size

    assert wait_until(lambda: serves("tinypol/2", 5), timeout=20, interval=0.3)  # picked up by the poller
    write_garbage_version(repository, "tinypol", 3)
    policy = stack["policy"]
    assert wait_until(lambda: policy.metric("blockpilot_policy_load_failures_total", policy_version="tinypol/3") == 1,
                      timeout=20)
    assert serves("tinypol/2", 5)  # the old version keeps serving
    assert "tinypol/3 is broken and NOT served" in policy.log()
    # A Reload call serves a new version at once (no waiting for the poller).
    write_policy(repository, "tinypol", 4, choice=2)
    reply = stack["policy_stub"].Reload(policy_pb2.ReloadRequest(), timeout=30)
    assert "tinypol/4" in reply.loaded
    assert wait_until(lambda: serves("tinypol/4", 2), timeout=5, interval=0.25)  # the verifier's feature list ages 0.2 s
    assert policy.metric("blockpilot_policy_load_failures_total", policy_version="tinypol/3") == 1  # counted once
    final, _ = generate(stub, request(max_new_tokens=20))
    assert list(final.token_ids) == reference(PROMPT, 20)


def test_final_hidden_policy_and_a_policy_this_target_cannot_feed(stack, reference):
    write_policy(stack["repository"], "hidden-pol", 1, choice=4, feature_kind="final_hidden", feature_dim=HIDDEN)
    write_policy(stack["repository"], "big-vocab", 1, choice=4, feature_dim=49152)
    reply = stack["policy_stub"].Reload(policy_pb2.ReloadRequest(), timeout=60)
    assert {"hidden-pol/1", "big-vocab/1"} <= set(reply.loaded)
    final, _ = generate(stack["stub"], request(max_new_tokens=20, policy="hidden-pol"))
    assert (final.block_size, final.policy_version, final.fallback_reason) == (4, "hidden-pol/1", "")
    assert list(final.token_ids) == reference(PROMPT, 20)
    final, _ = generate(stack["stub"], request(max_new_tokens=20, policy="big-vocab"))
    assert final.block_size == DRAFTER_BLOCK and final.fallback_reason == "policy_feature_mismatch"
    assert final.policy_version == "" and list(final.token_ids) == reference(PROMPT, 20)
    assert stack["verifier"].metric("blockpilot_fallbacks_total", reason="policy_feature_mismatch") >= 1
    with pytest.raises(grpc.RpcError) as info:
        generate(stack["stub"], request(policy="no-such-policy"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "unknown policy 'no-such-policy'" in info.value.details()


def ab(stack, *args) -> int:
    from blockpilot.cli import main

    return main(["ab", *args, "--redis-url", stack["redis"].url])


def test_ab_experiment_with_a_shadow_arm(stack, reference, capsys):
    stub = stack["stub"]
    current = generate(stub, request(max_new_tokens=4))[0]  # what tinypol answers now (its newest version)
    treat_size, treat_version = current.block_size, current.policy_version
    assert ab(stack, "set", "exp1", "--arm", "control=fixed-2:50", "--arm", "treat=tinypol:50",
              "--shadow", "shadow=hidden-pol") == 0
    capsys.readouterr()
    arms, finals = {}, []
    for _ in range(10):
        final, session = generate(stub, request(max_new_tokens=12, policy="exp1", new_session=True))
        arms[session] = final.arm
        finals.append(final)
        expected = (2, "fixed-v1") if final.arm == "control" else (treat_size, treat_version)
        assert (final.block_size, final.policy_version, final.experiment) == (*expected, "exp1")
        assert list(final.token_ids) == reference(PROMPT, 12)
    assert set(arms.values()) == {"control", "treat"}  # 10 sessions at 50/50 (all alike: p = 0.002)
    assert all(f.block_size != 4 for f in finals)  # the shadow arm's choice is never applied
    # Sticky: a session's next turn is in the same arm; its record says so.
    session, arm = next(iter(arms.items()))
    conversation = PROMPT + reference(PROMPT, 12) + [11]
    final, _ = generate(stub, request(conversation, max_new_tokens=6, policy="exp1", session_id=session))
    assert final.arm == arm
    record = redis_client(stack).hgetall(f"bp:{{{session}}}:meta")
    assert record["arm"] == arm and record["experiment"] == "exp1"

    def status() -> dict:
        assert ab(stack, "status", "exp1", "--json") == 0
        return {a["arm"]: a for a in json.loads(capsys.readouterr().out)["experiments"][0]["arms"]}

    requests = 11
    assert wait_until(lambda: sum(a.get("requests", 0) for a in status().values()) == requests, timeout=10)
    report = status()
    sessions = {name: sum(1 for a in arms.values() if a == name) for name in ("control", "treat")}
    assert report["control"]["sessions"] == sessions["control"] and report["treat"]["sessions"] == sessions["treat"]
    control_taus = [f.tau for f in finals if f.arm == "control"] + ([final.tau] if arm == "control" else [])
    assert report["control"]["tau"]["mean"] == pytest.approx(np.mean(control_taus), rel=1e-6)
    assert report["control"]["tau"]["n"] == len(control_taus)
    assert wait_until(lambda: status()["shadow"]["decisions"] == requests, timeout=10)
    assert status()["shadow"]["mean_block_size"] == pytest.approx(4.0)
    assert stack["policy"].metric("blockpilot_policy_shadow_decisions_total", arm="shadow", experiment="exp1") == requests
    # Rollback of the control arm takes effect at once: its sessions move to treat on their next turn.
    control_session = next(s for s, a in arms.items() if a == "control")
    assert ab(stack, "set", "exp1", "--arm", "control=fixed-2:0", "--arm", "treat=tinypol:100",
              "--shadow", "shadow=hidden-pol") == 0
    final, _ = generate(stub, request(max_new_tokens=4, policy="exp1", session_id=control_session))
    assert final.arm == "treat" and final.block_size == treat_size
    # Stopped: requests naming it get its control arm, outside the statistics.
    assert ab(stack, "stop", "exp1") == 0
    final, _ = generate(stub, request(max_new_tokens=4, policy="exp1"))
    assert (final.arm, final.block_size, final.experiment) == ("control", 2, "")
    assert ab(stack, "status", "exp1") == 0
    assert "experiment exp1 (stopped" in capsys.readouterr().out
