"""The loop's two serving hooks: a drafter that fails mid-request (continue at block size 1, same
output, reason reported) and a reused target cache (multi-turn prefix) giving the same output."""

from __future__ import annotations

import pytest
import torch

from blockpilot.decoding.speculative import GenerationResult, SamplingParams, SpeculativeDecoder
from blockpilot.errors import DrafterUnavailableError
from blockpilot.models.target import TargetModel
from fake_drafters import OracleDrafter

PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    return TargetModel.from_pretrained(tiny_llama_dir)


class FailingAfter(OracleDrafter):
    """Drafts well for `steps` steps, then raises DrafterUnavailableError (or fails to open)."""

    def __init__(self, *args, steps: int, fail_open: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps = steps
        self.fail_open = fail_open

    def open_session(self, capacity):
        if self.fail_open:
            raise DrafterUnavailableError("down", "drafter_unavailable")
        session = super().open_session(capacity)
        propose = session.propose

        def failing(request):
            if len(session.requests) >= self.steps:
                raise DrafterUnavailableError("gone", "drafter_lost")
            return propose(request)

        session.propose = failing
        return session


@pytest.mark.parametrize("steps, fail_open", [(0, False), (3, False), (0, True)])
def test_drafter_failure_mid_request_keeps_the_output(target, steps, fail_open):
    reference = SpeculativeDecoder(target).generate(PROMPT, SamplingParams(max_new_tokens=40), 1)
    drafter = FailingAfter(PROMPT + reference.token_ids, target.config.vocab_size, 0.9, steps=steps, fail_open=fail_open)
    result = SpeculativeDecoder(target, drafter).generate(PROMPT, SamplingParams(max_new_tokens=40), 6)
    assert result.token_ids == reference.token_ids
    assert result.fallback_reason == ("drafter_unavailable" if fail_open else "drafter_lost")
    assert all(a == 1 for a in result.acceptance_lengths[steps:])  # autoregressive after the failure
    assert drafter.closed_sessions == (0 if fail_open else 1)


def test_reused_cache_prefix_gives_the_one_shot_output(target):
    drafter = OracleDrafter([0] * 600, target.config.vocab_size, 0.0)  # always-wrong drafts: exercises the path
    decoder = SpeculativeDecoder(target, drafter)
    params = SamplingParams(max_new_tokens=12)
    first = decoder.generate(PROMPT, params, 1)
    conversation = PROMPT + first.token_ids + [3, 4]
    one_shot = SpeculativeDecoder(target).generate(conversation, params, 1)
    # Prefill the prefix once (with logits: num_logits=0 would skip the layers past the feature
    # layers), keep the cache and its features, then continue the conversation.
    prefix_len = len(PROMPT) + len(first.token_ids) - 1
    cache = target.new_cache(len(conversation) + 12 + 1)
    with torch.inference_mode():
        out = target(torch.tensor([conversation[:prefix_len]]), cache, num_logits=1, hidden_layer_ids=drafter.target_layer_ids)
    features = out.hidden[0]
    for block_size in (1, 4):
        cache.truncate(prefix_len)
        result = decoder.stream(conversation, params, block_size, cache=cache, prefix_features=features)
        tokens = [t for event in result for t in event.token_ids]
        assert tokens == one_shot.token_ids, block_size


@pytest.mark.parametrize("block_size", [1, 4])
def test_collected_features_equal_a_full_prefill(target, block_size):
    """collect_features keeps the drafter features of every committed token (block size 1 too):
    exactly what a prefill of prompt + output would compute, so a next turn needs no recompute."""
    drafter = OracleDrafter([0] * 600, target.config.vocab_size, 0.5, target_layer_ids=(1, 3))
    decoder = SpeculativeDecoder(target, drafter if block_size > 1 else None)
    result = GenerationResult(prompt_token_ids=list(PROMPT))
    for _ in decoder.stream(PROMPT, SamplingParams(max_new_tokens=15), block_size, result, collect_features=(1, 3)):
        pass
    tokens = PROMPT + result.token_ids
    with torch.inference_mode():
        out = target(torch.tensor([tokens[:-1]]), target.new_cache(len(tokens)), num_logits=1, hidden_layer_ids=(1, 3))
    assert result.context_features.shape == out.hidden[0].shape
    torch.testing.assert_close(result.context_features, out.hidden[0], rtol=1e-4, atol=1e-4)


def test_a_session_holding_context_gets_only_the_rest(target):
    """A draft session that opens holding the first n context tokens (a resumed drafter cache) is
    sent context from position n on; the output is unchanged."""
    reference = SpeculativeDecoder(target).generate(PROMPT, SamplingParams(max_new_tokens=20), 1)

    class Holding(OracleDrafter):
        def open_session(self, capacity):
            session = super().open_session(capacity)
            session.context_length = session.seen_context = 3
            return session

    drafter = Holding(PROMPT + reference.token_ids, target.config.vocab_size, 0.8)
    result = SpeculativeDecoder(target, drafter).generate(PROMPT, SamplingParams(max_new_tokens=20), 4)
    assert result.token_ids == reference.token_ids and result.draft_context_reused == 3
    assert drafter.sessions[0].requests[0].context_start == 3
    assert drafter.sessions[0].requests[0].context.shape[0] == len(PROMPT) - 3
