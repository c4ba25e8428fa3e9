"""How the verifier asks the policy (VerifierCore._choose): features computed from the prefill as
DescribePolicy asks, a stale cached feature list refreshed once, a policy this target cannot feed
falling back to the default size, client errors passed on, and the policy's own fallback reasons
reported. The policy is the real engine (LocalPolicy) behind a caching wrapper like RemotePolicy's."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from blockpilot.config import VerifierServiceConfig
from blockpilot.decoding.speculative import PrefillInfo
from blockpilot.errors import InvalidArgumentError, NotFoundError
from blockpilot.policy.repository import PolicyRepository
from blockpilot.serving.models import load_served_target
from blockpilot.serving.policy import LocalPolicy, PolicySpec
from blockpilot.serving.verifier import GenerateSpec, VerifierCore, _Turn
from policy_onnx import write_policy

VOCAB, HIDDEN = 97, 64


class CachingPolicy:
    """LocalPolicy behind a describe() cache that only a fresh=True call updates (a verifier whose
    cached feature list went stale when a new policy version arrived)."""

    def __init__(self, inner: LocalPolicy) -> None:
        self.inner = inner
        self.cache: dict[str, PolicySpec] = {}
        self.describes = 0
        self.decides = 0

    async def describe(self, policy, timeout_s=None, *, fresh=False):
        if fresh or policy not in self.cache:
            self.describes += 1
            self.cache[policy] = await self.inner.describe(policy)
        return self.cache[policy]

    async def decide(self, features, timeout_s=None):
        self.decides += 1
        return await self.inner.decide(features, timeout_s)

    async def report(self, outcome):
        await self.inner.report(outcome)


@dataclass
class Recorder:
    block_size: int = 8
    max_block_size: int = 16


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    return load_served_target(str(tiny_llama_dir))


def info(nan=False):
    logits = torch.randn(VOCAB)
    if nan:
        logits[0] = float("nan")
    return PrefillInfo(6, logits, None, torch.randn(HIDDEN))


def choose(target, policy, name="", prefill=None):
    core = VerifierCore(VerifierServiceConfig(), target, None, policy, None)
    turn = _Turn(GenerateSpec(token_ids=(1, 2, 3), policy=name), [1, 2, 3], None, "", None, None, 0.0, recorder=Recorder())
    try:
        decision = asyncio.run(core._choose(turn, prefill or info(), 8, 5.0))
    finally:
        core.close()
    return decision, turn.reasons


def test_features_follow_the_policy_and_a_stale_list_is_refreshed_once(tmp_path, target):
    write_policy(tmp_path, "pol", 1, choice=3)  # reads last_logits [97]
    repository = PolicyRepository(tmp_path)
    repository.scan()
    policy = CachingPolicy(LocalPolicy(repository=repository))
    decision, reasons = choose(target, policy, "pol")
    assert (decision.block_size, decision.policy_version, reasons) == (3, "pol/1", [])
    assert (policy.describes, policy.decides) == (1, 1)
    # Version 2 reads final_hidden; the cached list still says last_logits.
    write_policy(tmp_path, "pol", 2, choice=5, feature_kind="final_hidden", feature_dim=HIDDEN)
    repository.scan()
    decision, reasons = choose(target, policy, "pol")
    assert (decision.block_size, decision.policy_version, reasons) == (5, "pol/2", [])
    assert (policy.describes, policy.decides) == (2, 3)  # FAILED_PRECONDITION, describe again, decide again
    decision, _ = choose(target, policy, "pol")
    assert decision.block_size == 5 and (policy.describes, policy.decides) == (2, 4)  # fresh list cached


def test_a_policy_this_target_cannot_feed_falls_back_to_the_default(tmp_path, target):
    write_policy(tmp_path, "big", 1, choice=3, feature_dim=49152)
    repository = PolicyRepository(tmp_path)
    repository.scan()
    decision, reasons = choose(target, CachingPolicy(LocalPolicy(repository=repository)), "big")
    assert (decision.block_size, decision.policy_version, decision.decision_id) == (8, "", "")
    assert reasons == ["policy_feature_mismatch"]
    # NaN logits (a broken target) are not sent either: same fallback.
    write_policy(tmp_path, "pol", 1, choice=3)
    repository.scan()
    decision, reasons = choose(target, CachingPolicy(LocalPolicy(repository=repository)), "pol", info(nan=True))
    assert decision.block_size == 8 and reasons == ["policy_feature_mismatch"]


def test_client_errors_reach_the_client_and_policy_reasons_are_reported(tmp_path, target):
    repository = PolicyRepository(tmp_path)
    policy = CachingPolicy(LocalPolicy(repository=repository, default_policy="not-shipped"))
    with pytest.raises(NotFoundError, match="unknown policy 'nope'"):
        choose(target, policy, "nope")
    with pytest.raises(InvalidArgumentError, match="outside the allowed range"):
        choose(target, policy, "fixed-40")
    assert policy.describes == 3  # fixed-40: described, refused, described again (unchanged), passed on
    decision, reasons = choose(target, policy, "")
    assert decision.block_size == 8 and reasons == ["default_policy_not_loaded"]


def test_policy_features_are_exactly_the_prefill_tensors():
    from blockpilot.serving.policy import FeatureSpec
    from blockpilot.policy.features import policy_features

    prefill = info()
    vectors, problems = policy_features(PolicySpec("p", (FeatureSpec("last_logits", VOCAB), FeatureSpec("final_hidden", HIDDEN),
                                                         FeatureSpec("final_hidden", 7))).features, prefill)
    assert problems == ["final_hidden has 64 values here, the policy expects 7"]
    assert np.array_equal(vectors["last_logits"], prefill.last_logits.numpy())
    assert np.array_equal(vectors["final_hidden"], prefill.final_hidden.numpy())
    vectors, problems = policy_features(PolicySpec("p", (FeatureSpec("final_hidden", HIDDEN),)).features,
                                        PrefillInfo(6, torch.randn(VOCAB), None, None))
    assert vectors == {} and "did not produce the 'final_hidden' feature" in problems[0]
