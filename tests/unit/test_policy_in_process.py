"""`generate --block-size auto` in process: the policy engine of the service, on a local repository,
plugged into the decoding loop's block-size hook."""

from __future__ import annotations

import pytest

from blockpilot.decoding.speculative import GenerationResult, SamplingParams, SpeculativeDecoder
from blockpilot.errors import NotFoundError
from blockpilot.models.target import TargetModel
from blockpilot.policy.in_process import InProcessPolicy
from fake_drafters import OracleDrafter
from policy_onnx import write_policy

PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    return TargetModel.from_pretrained(tiny_llama_dir)


@pytest.mark.parametrize("kind", ["last_logits", "final_hidden"])
@pytest.mark.parametrize("choice", [3, 5])
def test_the_policy_decides_the_block_size_and_output_stays_greedy(target, tmp_path, kind, choice):
    dim = target.config.vocab_size if kind == "last_logits" else target.config.hidden_size
    write_policy(tmp_path, "blockpilot", 1, candidates=(2, 3, 4, 5), feature_kind=kind, feature_dim=dim, choice=choice)
    reference = SpeculativeDecoder(target).generate(PROMPT, SamplingParams(max_new_tokens=24), 1)
    drafter = OracleDrafter(PROMPT + reference.token_ids, target.config.vocab_size, 0.8)
    policy = InProcessPolicy(tmp_path)
    result = GenerationResult(prompt_token_ids=PROMPT)
    decoder = SpeculativeDecoder(target, drafter)
    list(decoder.stream(PROMPT, SamplingParams(max_new_tokens=24), policy.hook(4, decoder.max_block_size), result))
    policy.close()
    assert result.block_size == choice
    assert policy.decision.policy_version == "blockpilot/1" and policy.decision.fallback_reason == ""
    assert result.token_ids == reference.token_ids


def decide_short(target, policy: InProcessPolicy) -> GenerationResult:
    """A 6-token decode whose block size `policy` decides (default size 4); closes the policy."""
    decoder = SpeculativeDecoder(target, OracleDrafter([0] * 64, target.config.vocab_size, 0.0))
    result = GenerationResult(prompt_token_ids=PROMPT)
    list(decoder.stream(PROMPT, SamplingParams(max_new_tokens=6), policy.hook(4, decoder.max_block_size), result))
    policy.close()
    return result


def test_without_a_shipped_policy_the_default_size_answers_and_says_so(target, tmp_path):
    policy = InProcessPolicy(tmp_path / "empty")
    assert decide_short(target, policy).block_size == 4
    assert policy.decision.fallback_reason == "default_policy_not_loaded"


def test_an_unknown_policy_name_fails_before_any_work(tmp_path):
    with pytest.raises(NotFoundError, match="unknown policy 'nope'"):
        InProcessPolicy(tmp_path, "nope")


def test_a_policy_for_another_target_falls_back_to_the_default_size(target, tmp_path):
    write_policy(tmp_path, "blockpilot", 1, feature_kind="last_logits", feature_dim=target.config.vocab_size + 1, choice=3)
    policy = InProcessPolicy(tmp_path)
    assert decide_short(target, policy).block_size == 4
    assert policy.decision.fallback_reason == "policy_feature_mismatch"
