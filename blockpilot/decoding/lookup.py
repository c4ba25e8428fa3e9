"""Prompt-lookup drafting: propose the tokens that followed an earlier occurrence of the current suffix.

Terms
-----
history
    The committed tokens of one request, prompt first: ``h_0 .. h_{L-1}`` (L = its length). The
    last one is the anchor of the next step.
n-gram at i
    ``h_{i-n+1} .. h_i``: the n tokens ending at position i.
suffix n-gram
    The n-gram at L - 1 (the history's last n tokens).
match
    An earlier position ``j < L - 1`` whose n-gram equals the suffix n-gram. The proposal is the
    continuation ``h_{j+1} .. h_{j+m}``, at most ``max_tokens_by_ngram[n - 1]`` (and ``max_tokens``)
    long and never past the history's end. Of all matches the most recent is taken (text repeats
    what it said last), and the longest n that has one, from ``max_ngram`` down to ``min_ngram``.

Why the proposal length depends on n: a longer match predicts more of what follows. Replayed over
the default model's greedy responses to 700 training prompts (benchmarks/lookup_lengths.py), the
first copied token was right 23 % of the time after a 1-token match, 52 % after 2, 69 % after 4
and 91 % after 6+, and a 6+ match stayed right for 8 tokens 46 % of the time. A step is worth
(1 + expected accepted tokens) / (verify cost of its length), so short matches get short
proposals. The default lengths (3, 5, 6, 7, 7, 11 for n = 1..6) reach 97-100 % of the best
per-n lengths under the verify-cost curves of three CPUs (AVX2 Zen 3, Zen 4 and Zen 5 with
AVX-512, ONNX Runtime), whose own optima differ (e.g. 3 or 11 tokens after a 4-token match);
the script recomputes them for a machine's measured curve.

The index maps every n-gram (min_ngram <= n <= max_ngram) that has a continuation, i.e. that ends
before the history's last token, to the latest position it ended at. Appending a token registers
the n-grams ending at the previous last position, so a step costs O(max_ngram) per new token and a
proposal O(max_ngram) lookups: the context is never rescanned.

A proposal is a deterministic draft: as a distribution it is one-hot, so the verifier accepts it
with the same rules as a greedy DFlash draft (acceptance.greedy_verify at temperature 0,
acceptance.sample_and_match_verify above it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from blockpilot.errors import InvalidArgumentError


@dataclass(frozen=True)
class LookupConfig:
    """enabled: propose lookup drafts at all.
    min_ngram / max_ngram: suffix lengths tried, longest first (a match needs >= min_ngram tokens).
    max_tokens: longest proposal (it may be longer than the DFlash block: a copy is verified in
        one target pass of up to max_tokens + 1 tokens).
    max_tokens_by_ngram: longest proposal after a match of n tokens, entry n - 1 (n = 1 ..
        max_ngram; see the module docstring for the defaults); () = max_tokens for every n."""

    enabled: bool = True
    min_ngram: int = 1
    max_ngram: int = 6
    max_tokens: int = 11
    max_tokens_by_ngram: tuple[int, ...] = (3, 5, 6, 7, 7, 11)

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise InvalidArgumentError(
                f"lookup n-gram lengths need 1 <= min_ngram <= max_ngram, got min_ngram={self.min_ngram!r}, "
                f"max_ngram={self.max_ngram!r}")
        if self.max_tokens < 1:
            raise InvalidArgumentError(f"lookup max_tokens must be >= 1, got {self.max_tokens!r}")
        by_ngram = tuple(self.max_tokens_by_ngram)
        if by_ngram and (len(by_ngram) < self.max_ngram or any(not isinstance(v, int) or v < 0 for v in by_ngram)):
            raise InvalidArgumentError(
                f"lookup max_tokens_by_ngram needs a length >= 0 for every n = 1 .. max_ngram ({self.max_ngram}), "
                f"got {list(by_ngram)!r}")
        object.__setattr__(self, "max_tokens_by_ngram", by_ngram)

    def cap(self, ngram: int) -> int:
        """Longest proposal after a match of `ngram` tokens."""
        return min(self.max_tokens, self.max_tokens_by_ngram[ngram - 1]) if self.max_tokens_by_ngram else self.max_tokens


LOOKUP_OFF = LookupConfig(enabled=False)


class PromptLookupIndex:
    """The incremental n-gram index of one request's history (see the module docstring)."""

    def __init__(self, config: LookupConfig, history: Iterable[int] = ()) -> None:
        self.config = config
        self.tokens: list[int] = []
        # n-gram tuple -> the latest position i (< len(tokens) - 1) it ended at.
        self._latest: dict[tuple[int, ...], int] = {}
        self.extend(history)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, new_tokens: Iterable[int]) -> None:
        """Append committed tokens; registers the n-grams that now have a continuation."""
        tokens = self.tokens
        lo, hi = self.config.min_ngram, self.config.max_ngram
        for token in new_tokens:
            end = len(tokens) - 1  # the previous last position: its n-grams gain a continuation now
            for n in range(lo, min(hi, end + 1) + 1):
                self._latest[tuple(tokens[end - n + 1 : end + 1])] = end
            tokens.append(int(token))

    def propose(self, max_tokens: int | None = None) -> list[int]:
        """The continuation of the most recent earlier occurrence of the longest matching suffix
        n-gram ([] when none matches). max_tokens: cap below the config's (e.g. the room left)."""
        limit = self.config.max_tokens if max_tokens is None else min(max_tokens, self.config.max_tokens)
        n, end = self.longest_match()
        if limit < 1 or n == 0:
            return []
        return self.tokens[end + 1 : min(end + 1 + min(limit, self.config.cap(n)), len(self.tokens))]

    def longest_match(self) -> tuple[int, int]:
        """(n, end): the longest suffix n-gram that occurred before and where its latest earlier
        occurrence ended; (0, -1) when none did."""
        tokens = self.tokens
        length = len(tokens)
        for n in range(min(self.config.max_ngram, length - 1), self.config.min_ngram - 1, -1):
            end = self._latest.get(tuple(tokens[length - n :]))
            if end is not None:
                return n, end
        return 0, -1


def propose_slow(history: list[int], config: LookupConfig, max_tokens: int | None = None) -> list[int]:
    """Reference implementation by rescanning the whole history (tests compare the index with it)."""
    limit = config.max_tokens if max_tokens is None else min(max_tokens, config.max_tokens)
    length = len(history)
    if limit < 1:
        return []
    for n in range(min(config.max_ngram, length - 1), config.min_ngram - 1, -1):
        suffix = history[length - n :]
        for end in range(length - 2, n - 2, -1):  # latest first; end < length - 1
            if history[end - n + 1 : end + 1] == suffix:
                return history[end + 1 : min(end + 1 + min(limit, config.cap(n)), length)]
    return []
