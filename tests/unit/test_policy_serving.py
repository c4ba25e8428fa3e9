"""The serving side of policies without processes: the repository (scan, hot reload, broken
versions), the decision engine (fixed, learned, constraints, fallbacks) and feature validation at
the wire boundary. ONNX models are built in the tests (tests/policy_onnx.py)."""

from __future__ import annotations

import asyncio
import os
import shutil

import numpy as np
import pytest

from blockpilot.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from blockpilot.policy.metadata import PolicyMetadata
from blockpilot.policy.repository import PolicyRepository, onnx_providers
from blockpilot.serving.policy import (FeatureSpec, LocalPolicy, PolicyFeatures, features_from_proto, features_to_proto,
                                       vector_to_proto)
from blockpilot.v1 import policy_pb2, tensor_pb2
from policy_onnx import write_garbage_version, write_policy

DIM = 97


def run(coro):
    return asyncio.run(coro)


def logits(dim=DIM, value=0.0):
    return np.full(dim, value, dtype=np.float32)


def request(policy="", features=None, max_block_size=16, default_block_size=8, session_id=""):
    return PolicyFeatures({"last_logits": logits()} if features is None else features, 6, default_block_size,
                          max_block_size, session_id, policy)


class Failures:
    def __init__(self):
        self.seen = []

    def __call__(self, label, message):
        self.seen.append(label)


# ---- repository ---------------------------------------------------------------------------------

def test_scan_serves_the_highest_complete_version(tmp_path):
    write_policy(tmp_path, "pol", 1, choice=3)
    write_policy(tmp_path, "pol", 2, choice=4)
    incomplete = tmp_path / "pol" / "7"
    incomplete.mkdir()
    (incomplete / "model.onnx").write_bytes(b"half copied")  # no metadata.json yet: not a version
    (tmp_path / "pol" / "draft").mkdir()  # not an integer: ignored
    (tmp_path / "not a name").mkdir()
    repository = PolicyRepository(tmp_path)
    result = repository.scan()
    assert result.loaded == ["pol/2"] and result.changed == ["pol/2"] and result.failures == []
    served = repository.get("pol")
    assert served.version == 2 and served.metadata.candidates == (2, 3, 4, 5)
    assert served.model.decide(logits()) == 4
    again = repository.scan()
    assert again.changed == [] and repository.get("pol") is served  # unchanged: not reloaded


def test_new_version_is_served_on_the_next_scan_and_removal_rolls_back(tmp_path):
    write_policy(tmp_path, "pol", 1, choice=3)
    repository = PolicyRepository(tmp_path)
    repository.scan()
    write_policy(tmp_path, "pol", 2, choice=5)
    assert repository.scan().changed == ["pol/2"]
    assert repository.get("pol").model.decide(logits()) == 5
    shutil.rmtree(tmp_path / "pol" / "2")
    result = repository.scan()
    assert result.changed == ["pol/1"] and repository.get("pol").version == 1
    shutil.rmtree(tmp_path / "pol")
    result = repository.scan()
    assert result.removed == ["pol/1"] and repository.get("pol") is None and result.loaded == []


@pytest.mark.parametrize("breakage", ["garbage", "dim_mismatch", "name_mismatch", "bad_metadata"])
def test_broken_new_version_is_not_served_counted_once_and_retried_when_changed(tmp_path, breakage):
    write_policy(tmp_path, "pol", 1, choice=3)
    failures = Failures()
    repository = PolicyRepository(tmp_path, on_failure=failures)
    repository.scan()
    if breakage == "garbage":
        write_garbage_version(tmp_path, "pol", 2)
    elif breakage == "dim_mismatch":
        write_policy(tmp_path, "pol", 2, choice=4, metadata_dim=DIM + 1)
    elif breakage == "name_mismatch":
        version = write_policy(tmp_path, "pol", 2, choice=4)
        PolicyMetadata(name="other", version=2, candidates=(2, 3, 4, 5), feature_kind="last_logits",
                       feature_dim=DIM).save(version)
    else:
        version = write_policy(tmp_path, "pol", 2, choice=4)
        (version / "metadata.json").write_text("{not json")
    result = repository.scan()
    assert [label for label, _ in result.failures] == ["pol/2"] and result.changed == []
    assert repository.get("pol").version == 1  # the old version keeps serving
    assert failures.seen == ["pol/2"]
    assert "pol/2" in repository.last_errors["pol"]
    assert repository.scan().failures == [] and failures.seen == ["pol/2"]  # not retried while unchanged
    # Fixed in place (new files): loaded on the next scan.
    shutil.rmtree(tmp_path / "pol" / "2")
    write_policy(tmp_path, "pol", 2, choice=4)
    assert repository.scan().changed == ["pol/2"] and repository.get("pol").model.decide(logits()) == 4
    assert "pol" not in repository.last_errors


def test_broken_replacement_in_place_keeps_the_loaded_model(tmp_path):
    write_policy(tmp_path, "pol", 1, choice=3)
    repository = PolicyRepository(tmp_path)
    repository.scan()
    served = repository.get("pol")
    model = tmp_path / "pol" / "1" / "model.onnx"
    model.write_bytes(b"truncated")
    os.utime(model, ns=(1, 1))
    result = repository.scan()
    assert [label for label, _ in result.failures] == ["pol/1"]
    assert repository.get("pol") is served and served.model.decide(logits()) == 3


def test_missing_repository_is_empty_and_appears_later(tmp_path):
    root = tmp_path / "later"
    repository = PolicyRepository(root)
    assert repository.scan().loaded == []
    write_policy(root, "pol", 1, choice=2)
    assert repository.scan().loaded == ["pol/1"]


def test_poll_picks_up_a_new_version(tmp_path):
    write_policy(tmp_path, "pol", 1, choice=3)
    repository = PolicyRepository(tmp_path)
    repository.scan()

    async def scenario():
        stop = asyncio.Event()
        poller = asyncio.ensure_future(repository.poll(0.05, stop))
        write_policy(tmp_path, "pol", 2, choice=5)
        for _ in range(100):
            if repository.get("pol").version == 2:
                break
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(poller, 2)

    run(scenario())
    assert repository.get("pol").version == 2


def test_providers():
    assert onnx_providers("cpu") == ["CPUExecutionProvider"]
    assert onnx_providers("auto")[-1] == "CPUExecutionProvider"
    with pytest.raises(InvalidArgumentError, match="one of"):
        onnx_providers("tpu")


# ---- the engine ---------------------------------------------------------------------------------

def engine(tmp_path, **kwargs):
    repository = PolicyRepository(tmp_path)
    repository.scan()
    return LocalPolicy(repository=repository, **kwargs)


def test_fixed_policies(tmp_path):
    policy = engine(tmp_path)
    decision = run(policy.decide(request("default")))
    assert (decision.block_size, decision.policy_version, decision.arm, decision.fallback_reason) == (8, "fixed-v1", "default", "")
    assert run(policy.decide(request("default", max_block_size=5))).block_size == 5  # clamped to the limit
    assert run(policy.decide(request("fixed-3"))).block_size == 3
    assert run(policy.decide(request("", features={}))).block_size == 8  # "" = default_policy = "default"; no feature needed
    assert LocalPolicy(default_block_size=4).default_block_size == 4
    assert run(LocalPolicy(default_block_size=4).decide(request("default"))).block_size == 4
    with pytest.raises(InvalidArgumentError, match="outside the allowed range 1..16"):
        run(policy.decide(request("fixed-17")))
    with pytest.raises(NotFoundError, match="unknown policy 'nope'"):
        run(policy.decide(request("nope")))
    ids = {run(policy.decide(request("fixed-2"))).decision_id for _ in range(5)}
    assert len(ids) == 5


def test_learned_policy_decides_and_respects_max_block_size(tmp_path):
    write_policy(tmp_path, "pol", 1, candidates=(2, 4, 6, 8))  # W scores the first 4 features
    policy = engine(tmp_path)
    features = logits()
    features[2] = 5.0  # candidate index 2 -> block size 6
    decision = run(policy.decide(request("pol", {"last_logits": features})))
    assert (decision.block_size, decision.policy_version, decision.arm) == (6, "pol/1", "pol")
    features[3] = 4.0  # second best: 8
    features[1] = 3.0
    assert run(policy.decide(request("pol", {"last_logits": features}, max_block_size=5))).block_size == 4  # best allowed
    none_fit = run(policy.decide(request("pol", {"last_logits": features}, max_block_size=1)))
    assert none_fit.block_size == 1 and none_fit.fallback_reason == "no_candidate_fits"
    tie = run(policy.decide(request("pol", {"last_logits": logits()})))
    assert tie.block_size == 2  # ties go to the smaller size


def test_default_policy_not_loaded_says_so_and_describe_reports_features(tmp_path):
    policy = engine(tmp_path, default_policy="pol")
    decision = run(policy.decide(request("")))
    assert decision.block_size == 8 and decision.policy_version == "fixed-v1"
    assert decision.fallback_reason == "default_policy_not_loaded"
    spec = run(policy.describe(""))
    assert spec.policy == "pol" and spec.features == () and spec.fallback_reason == "default_policy_not_loaded"
    write_policy(tmp_path, "pol", 1, choice=3, feature_kind="final_hidden", feature_dim=16)
    policy.repository.scan()
    spec = run(policy.describe(""))
    assert spec.features == (FeatureSpec("final_hidden", 16),) and spec.policy_versions == ("pol/1",)
    assert spec.fallback_reason == "" and spec.cache_ttl_s == 5.0
    decision = run(policy.decide(request("", {"final_hidden": logits(16)})))
    assert (decision.block_size, decision.policy_version, decision.fallback_reason) == (3, "pol/1", "")
    with pytest.raises(NotFoundError, match="unknown policy"):
        run(policy.describe("missing"))


def test_broken_only_version_is_named_in_not_found(tmp_path):
    write_garbage_version(tmp_path, "pol", 1)
    policy = engine(tmp_path)
    with pytest.raises(NotFoundError, match="pol/1"):
        run(policy.decide(request("pol")))


def test_feature_errors(tmp_path):
    write_policy(tmp_path, "pol", 1, choice=3)
    policy = engine(tmp_path)
    bad = logits()
    bad[5] = np.nan
    with pytest.raises(InvalidArgumentError, match="1 NaN or infinite"):
        run(policy.decide(request("pol", {"last_logits": bad})))
    with pytest.raises(InvalidArgumentError, match="has 96 values; policy pol/1 expects 97"):
        run(policy.decide(request("pol", {"last_logits": logits(96)})))
    with pytest.raises(FailedPreconditionError, match="needs feature last_logits"):
        run(policy.decide(request("pol", {"final_hidden": logits(16)})))
    with pytest.raises(InvalidArgumentError, match="unknown feature kind"):
        run(policy.decide(request("pol", {"top_k": logits()})))
    with pytest.raises(InvalidArgumentError, match="float32 vector"):
        run(policy.decide(request("pol", {"last_logits": np.zeros(DIM, dtype=np.float64)})))
    with pytest.raises(InvalidArgumentError, match="float32 vector"):
        run(policy.decide(request("pol", {"last_logits": np.zeros((1, DIM), dtype=np.float32)})))
    # A bad feature is refused even for a fixed policy that would not read it.
    with pytest.raises(InvalidArgumentError, match="NaN"):
        run(policy.decide(request("fixed-2", {"last_logits": bad})))


def test_wire_round_trip_and_malformed_messages():
    features = request("pol", {"last_logits": np.arange(DIM, dtype=np.float32), "final_hidden": logits(16, 1.5)})
    back = features_from_proto(features_to_proto(features))
    assert np.array_equal(back.features["last_logits"], np.arange(DIM, dtype=np.float32))
    assert back.features["final_hidden"].shape == (16,) and back.policy == "pol" and back.max_block_size == 16

    def message(**tensor):
        values = tensor_pb2.Tensor(**{"dtype": tensor_pb2.DTYPE_FLOAT32, "shape": [4], "data": b"\0" * 16, **tensor})
        return policy_pb2.DecideRequest(prefill_features=[policy_pb2.Feature(kind="last_logits", values=values)])

    assert features_from_proto(message()).features["last_logits"].shape == (4,)
    cases = [
        (message(dtype=tensor_pb2.DTYPE_FLOAT16, data=b"\0" * 8), "DTYPE_FLOAT32"),
        (message(dtype=tensor_pb2.DTYPE_UNSPECIFIED), "DTYPE_FLOAT32"),
        (message(shape=[2, 2]), "shape must be [dim]"),
        (message(shape=[0], data=b""), "shape must be [dim]"),
        (message(data=b"\0" * 15), "15 bytes do not match"),
        (message(data=np.array([1, np.inf, 0, 0], dtype=np.float32).tobytes()), "NaN or infinite"),
        (policy_pb2.DecideRequest(prefill_features=[policy_pb2.Feature(kind="last_logits", values=vector_to_proto(logits())),
                                                    policy_pb2.Feature(kind="last_logits", values=vector_to_proto(logits()))]),
         "given twice"),
        (policy_pb2.DecideRequest(prefill_features=[policy_pb2.Feature(kind="logits", values=vector_to_proto(logits()))]),
         "unknown feature kind"),
    ]
    for bad, fragment in cases:
        with pytest.raises(InvalidArgumentError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            features_from_proto(bad)
    with pytest.raises(NotFoundError, match="not a valid policy name"):
        features_from_proto(policy_pb2.DecideRequest(policy="../etc"))


# ---- reports ------------------------------------------------------------------------------------

def test_reports_count_only_issued_decisions_once_with_plausible_figures():
    """A Report must redeem a decision this policy issued (once, with the decision's own policy,
    arm and block size); made-up ids, replays, mismatches and implausible figures are refused, and
    none of them adds a metric series."""
    from dataclasses import replace

    from blockpilot.serving import metrics
    from blockpilot.serving.policy import Outcome
    from blockpilot.serving.session_store import MemorySessionStore

    store = MemorySessionStore()
    policy = LocalPolicy(default_block_size=4, store=store)

    def outcome(decision, lengths=(2, 3, 1), generated=7, seconds=0.5):
        return Outcome(decision, "s", 10, generated, tuple(lengths), seconds, "length", "")

    decision = run(policy.decide(request()))
    series_before = len(list(metrics.POLICY_OUTCOMES.collect())[0].samples)
    run(policy.report(outcome(decision)))
    assert len(store.outcomes) == 1
    with pytest.raises(NotFoundError, match="already reported"):
        run(policy.report(outcome(decision)))
    fresh = run(policy.decide(request()))
    with pytest.raises(InvalidArgumentError, match="names another"):
        run(policy.report(outcome(replace(fresh, policy_version="treatment-v9"))))
    with pytest.raises(NotFoundError):  # the mismatch spent it: no second try with other labels
        run(policy.report(outcome(fresh)))
    for made_up in range(50):
        with pytest.raises(NotFoundError, match="unknown"):
            run(policy.report(outcome(replace(decision, decision_id=f"forged-{made_up}", policy_version=f"v{made_up}"))))
    implausible = run(policy.decide(request()))
    for bad in (outcome(implausible, lengths=(1000,), generated=1000), outcome(implausible, lengths=(2, 2), generated=1),
                outcome(implausible, generated=10**11), outcome(implausible, seconds=float("inf"))):
        with pytest.raises(InvalidArgumentError):
            run(policy.report(bad))
    run(policy.report(outcome(implausible)))  # still redeemable: refused figures did not spend it
    assert len(store.outcomes) == 2
    assert len(list(metrics.POLICY_OUTCOMES.collect())[0].samples) <= series_before + 2  # no label from a forged report
    expired = LocalPolicy(default_block_size=4, store=MemorySessionStore(), decision_ttl_s=0.0)
    late = run(expired.decide(request()))
    with pytest.raises(NotFoundError, match="expired"):
        run(expired.report(outcome(late)))
