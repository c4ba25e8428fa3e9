"""Policy features from the prefill hook's PrefillInfo, and model fingerprints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blockpilot.decoding.speculative import PrefillInfo, SamplingParams, SpeculativeDecoder
from blockpilot.errors import FailedPreconditionError, InvalidArgumentError
from blockpilot.models.target import TargetModel
from blockpilot.policy.features import feature_dim, feature_vector, feature_vectors, model_fingerprint


@pytest.fixture(scope="module")
def target(tiny_qwen3_dir):
    return TargetModel.from_pretrained(tiny_qwen3_dir)


def prefill_info(target, prompt) -> PrefillInfo:
    seen = {}

    def hook(info):
        seen["info"] = info
        return 1

    SpeculativeDecoder(target).generate(prompt, SamplingParams(max_new_tokens=2), hook)
    return seen["info"]


def test_features_are_the_last_prompt_tokens_logits_and_final_hidden_state(target):
    prompt = [5, 9, 11, 30, 2]
    info = prefill_info(target, prompt)
    logits = feature_vector(info, "last_logits")
    hidden = feature_vector(info, "final_hidden")
    assert logits.dtype == hidden.dtype == np.float32
    assert logits.shape == (feature_dim(target.config, "last_logits"),) == (target.config.vocab_size,)
    assert hidden.shape == (feature_dim(target.config, "final_hidden"),) == (target.config.hidden_size,)
    with torch.inference_mode():
        out = target(torch.tensor([prompt]), target.new_cache(len(prompt)), num_logits=1)
        reference_hidden = target.norm(out.final_state[0, -1])
    assert np.allclose(logits, out.logits[0, -1].numpy(), atol=1e-5)
    assert np.allclose(hidden, reference_hidden.numpy(), atol=1e-5)
    # The logits are the lm_head of the final hidden state: the two kinds carry related information.
    assert np.allclose(logits, target.lm_head.weight.detach().numpy() @ hidden, atol=1e-4)
    # Copies: changing the returned vector leaves the request's tensors alone.
    logits[0] += 1.0
    assert feature_vector(info, "last_logits")[0] != logits[0]
    assert set(feature_vectors(info)) == {"last_logits", "final_hidden"}


def test_feature_errors_are_typed(target):
    info = PrefillInfo(3, torch.zeros(97), None, None)
    with pytest.raises(FailedPreconditionError, match="final_hidden"):
        feature_vector(info, "final_hidden")
    with pytest.raises(InvalidArgumentError, match="'hidden'"):
        feature_vector(info, "hidden")
    with pytest.raises(InvalidArgumentError, match="'hidden'"):
        feature_dim(target.config, "hidden")


def test_fingerprints_follow_the_weights_not_the_object(tiny_qwen3_dir, target):
    same = TargetModel.from_pretrained(tiny_qwen3_dir)
    assert model_fingerprint("tiny", target) == model_fingerprint("tiny", same)
    assert model_fingerprint("tiny", target).startswith("tiny@")
    with torch.no_grad():
        same.norm.weight[0] += 1e-3
    assert model_fingerprint("tiny", target) != model_fingerprint("tiny", same)
