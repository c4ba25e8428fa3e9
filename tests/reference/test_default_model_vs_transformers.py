"""The engine on the default model (SmolLM2-135M-Instruct) against `transformers` generate()."""

from __future__ import annotations

import pytest
import torch

from blockpilot.decoding.speculative import SamplingParams, SpeculativeDecoder
from blockpilot.models.store import resolve_target
from blockpilot.models.target import TargetModel
from blockpilot.models.tokenizer import ChatTokenizer

PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
]


def transformers_greedy(model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Plain greedy decoding with transformers' own forward and cache. (generate() would stop at
    EOS, and min_new_tokens would instead suppress EOS, changing the argmax.)"""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    tokens, out = torch.tensor([prompt_ids]), []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(tokens, cache=cache, use_cache=True).logits[0, -1]
            out.append(int(logits.argmax()))
            tokens = torch.tensor([[out[-1]]])
    return out


@pytest.mark.default_model
def test_greedy_64_tokens_identical_to_transformers():
    from transformers import AutoModelForCausalLM

    model_dir = resolve_target(None)
    tokenizer = ChatTokenizer(model_dir)
    ours = SpeculativeDecoder(TargetModel.from_pretrained(model_dir))
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    for prompt in PROMPTS:
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
        expected = transformers_greedy(reference, ids, 64)
        # No stop tokens on either side: compare all 64 tokens, past the end of the answer.
        got = ours.generate(ids, SamplingParams(max_new_tokens=64), 1).token_ids
        assert got == expected, prompt
