"""Streaming detokenization: the deltas add up to the full decode whatever the push sizes, and a
push decodes a window, not the whole output."""

from __future__ import annotations

import random

import pytest

from blockpilot.models.store import resolve_target
from blockpilot.models.tokenizer import ChatTokenizer, IncrementalDecoder

TEXTS = [
    "Hello, world! Ünïcödé ✓ 你好世界 🎉🎉 end.",
    "  leading spaces   and\nnewlines\t tabs ",
    "def f(x):\n    return x**2  # ok\n",
]


@pytest.fixture(scope="module")
def tokenizer():
    return ChatTokenizer(resolve_target(None))


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_full_text_for_any_push_sizes(tokenizer, text):
    ids = tokenizer.encode_raw(text)
    rng = random.Random(0)
    for _ in range(25):
        decoder, out, start = IncrementalDecoder(tokenizer), "", 0
        while start < len(ids):
            size = rng.randint(1, 3)
            out += decoder.push(ids[start : start + size])
            start += size
        assert out == tokenizer.decode(ids)


def test_a_split_character_is_held_back_until_complete(tokenizer):
    ids = tokenizer.encode_raw("🎉")
    assert len(ids) > 1  # byte-level pieces of one character
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.push([t]) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.push(ids[-1:]) == "🎉"


def test_each_push_decodes_only_a_window(tokenizer):
    calls: list[int] = []

    class Counting:
        def decode(self, ids):
            calls.append(len(ids))
            return tokenizer.decode(ids)

    ids = tokenizer.encode_raw("word " * 400)
    decoder = IncrementalDecoder(Counting())
    for token in ids:
        decoder.push([token])
    assert max(calls) <= 4
