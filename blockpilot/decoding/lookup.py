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
per-n lengths under the fp32 verify-cost curves of three CPUs (AVX2 Zen 3, Zen 4 and Zen 5 with
AVX-512, ONNX Runtime), whose own optima differ (e.g. 3 or 11 tokens after a 4-token match). A
steeper curve wants shorter copies: the int4 backend's (a 4-token pass 1.42 x a one-token one, an
8-token pass 2.24 x) reaches only 89 % with them, and its best lengths are 1, 2, 2, 3, 3, 6. So the
engine and the verifier pick the lengths for the backend they run: `lengths_for_cost` maximizes a
step's worth under the backend's verify-cost curve, measured when it loads
when it was exported (`lookup_for`), with the survival table COPY_SURVIVAL below.

The index maps every n-gram (min_ngram <= n <= max_ngram) that has a continuation, i.e. that ends
before the history's last token, to the latest position it ended at. Appending a token registers
the n-grams ending at the previous last position, so a step costs O(max_ngram) per new token and a
proposal O(max_ngram) lookups: the context is never rescanned.

Where the longest match is shorter than 2 tokens and the config carries corpus n-grams
(corpus.py: the target's own habits, counted over its responses to training prompts), the
proposal is the corpus continuation instead, `corpus_tokens[n]` long (n = 0 or 1): a 1-token copy
is right 27 % of the time there, the corpus's first guess 38 % (no match at all: 53 %, where a
copy has nothing). A copy is still proposed when the corpus knows nothing of the last tokens.
The decoding loop gives a sampled request (temperature > 0) no corpus: there a guess is accepted
with the target's probability of it only, and they did not pay (speculative.py, open_drafting).
A proposal is of one of two kinds, COPY or CORPUS (`propose_from`): both are the "lookup" draft
source in results, but the speed gate judges them apart (their lengths and acceptance differ).

A proposal is a deterministic draft: as a distribution it is one-hot, so the verifier accepts it
with the same rules as a greedy DFlash draft (acceptance.greedy_verify at temperature 0,
acceptance.sample_and_match_verify above it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from blockpilot.decoding.corpus import CorpusNgrams
from blockpilot.errors import InvalidArgumentError

# The kinds of a proposal (PromptLookupIndex.propose_from): a copy of the request's own text, or
# the corpus n-grams' continuation. The names are the speed gate's records of them.
COPY = "lookup"
CORPUS = "corpus"


# COPY_SURVIVAL[n - 1][j - 1]: P(at least j copied tokens are right | the longest match is n tokens),
# j = 1..16, n = 1..6. Measured by benchmarks/lookup_lengths.py (--max-records 2000) on the default
# target's greedy responses to training prompts (data/drafter/responses, 2026-12-06: 66,801 /
# 29,942 / 18,637 / 12,321 / 9,042 / 76,875 positions for n = 1..6; 26 % of positions had no match).
# It describes the text (how often it repeats itself), not the machine.
COPY_SURVIVAL: tuple[tuple[float, ...], ...] = (
    (0.2392, 0.1337, 0.0837, 0.0591, 0.0441, 0.0342, 0.0265, 0.0208, 0.0166, 0.0133, 0.0113, 0.0094, 0.008, 0.007, 0.006, 0.0052),
    (0.5323, 0.3306, 0.2339, 0.1758, 0.1375, 0.1092, 0.0883, 0.0726, 0.0598, 0.0513, 0.0438, 0.0374, 0.0332, 0.0293, 0.0263, 0.024),
    (0.6081, 0.4269, 0.3201, 0.2488, 0.1968, 0.1593, 0.1312, 0.1087, 0.0937, 0.0806, 0.0696, 0.0616, 0.0544, 0.0489, 0.0441, 0.0401),
    (0.6973, 0.5223, 0.4052, 0.3202, 0.2598, 0.2154, 0.1797, 0.1545, 0.1339, 0.1165, 0.1034, 0.091, 0.0815, 0.0738, 0.0664, 0.0606),
    (0.7524, 0.5828, 0.4616, 0.3751, 0.3113, 0.2605, 0.2251, 0.1946, 0.1699, 0.1506, 0.1333, 0.1194, 0.1075, 0.0971, 0.0876, 0.0803),
    (0.8957, 0.8053, 0.722, 0.6471, 0.5961, 0.5451, 0.5033, 0.4612, 0.4112, 0.375, 0.3473, 0.3169, 0.2938, 0.2726, 0.251, 0.2384),
)


def step_worth(survival: Sequence[float], length: int, relative_cost: Mapping[int, float]) -> float:
    """Tokens per unit of one-token verify time of a lookup step proposing `length` tokens:
    (1 + sum_{j <= length} P(>= j right)) / c(length + 1), c(k) the verify cost of k tokens
    relative to one (a plain step, length 0, is worth 1)."""
    return (1.0 + sum(survival[:length])) / relative_cost[length + 1] if length else 1.0


def lengths_for_cost(relative_cost: Mapping[int, float], survival: Sequence[Sequence[float]] = COPY_SURVIVAL) -> tuple[int, ...]:
    """Per match length n, the proposal length (0 .. max measured k - 1) of the highest step worth."""
    longest = min(max(relative_cost) - 1, len(survival[0]))
    return tuple(max(range(longest + 1), key=lambda length: step_worth(row, length, relative_cost)) for row in survival)


@dataclass(frozen=True)
class LookupConfig:
    """enabled: propose lookup drafts at all.
    min_ngram / max_ngram: suffix lengths tried, longest first (a match needs >= min_ngram tokens).
    max_tokens: longest proposal (it may be longer than the DFlash block: a copy is verified in
        one target pass of up to max_tokens + 1 tokens).
    max_tokens_by_ngram: longest proposal after a match of n tokens, entry n - 1 (n = 1 ..
        max_ngram; see the module docstring for the defaults); () = max_tokens for every n.
    corpus: corpus n-grams proposed where the longest match is shorter than 2 tokens (None: none).
    corpus_tokens: the corpus continuation's length with no match and with a 1-token match
        (0: copy as without a corpus)."""

    enabled: bool = True
    min_ngram: int = 1
    max_ngram: int = 6
    max_tokens: int = 11
    max_tokens_by_ngram: tuple[int, ...] = (3, 5, 6, 7, 7, 11)
    corpus: CorpusNgrams | None = None
    corpus_tokens: tuple[int, int] = (0, 0)

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
        corpus_tokens = tuple(self.corpus_tokens)
        if len(corpus_tokens) != 2 or any(not isinstance(v, int) or v < 0 for v in corpus_tokens):
            raise InvalidArgumentError(f"lookup corpus_tokens needs two lengths >= 0 (no match, 1-token match), "
                                       f"got {list(corpus_tokens)!r}")
        object.__setattr__(self, "corpus_tokens", corpus_tokens)

    def cap(self, ngram: int) -> int:
        """Longest proposal after a match of `ngram` tokens."""
        return min(self.max_tokens, self.max_tokens_by_ngram[ngram - 1]) if self.max_tokens_by_ngram else self.max_tokens

    def corpus_cap(self, ngram: int) -> int:
        """Longest corpus continuation where the longest match is `ngram` tokens (0 where none)."""
        if self.corpus is None or ngram >= len(self.corpus_tokens):
            return 0
        return min(self.max_tokens, self.corpus_tokens[ngram])

    def describe(self) -> dict:
        """The settings as JSON-able values (the corpus by its size and origin)."""
        corpus = None if self.corpus is None else {
            "bigrams": len(self.corpus.bigram), "trigrams": len(self.corpus.trigram),
            **{k: self.corpus.info[k] for k in ("target", "records", "tokens") if k in self.corpus.info}}
        return {"enabled": self.enabled, "min_ngram": self.min_ngram, "max_ngram": self.max_ngram,
                "max_tokens": self.max_tokens, "max_tokens_by_ngram": list(self.max_tokens_by_ngram),
                "corpus": corpus, "corpus_tokens": list(self.corpus_tokens) if corpus else [0, 0]}


LOOKUP_OFF = LookupConfig(enabled=False)


# Corpus continuation lengths (no match, 1-token match) where the backend measured no verify-cost
# curve (the torch engine): its verify cost grows slowly with the block, so a little longer than
# the int4 graph's choice (2, 1 on a Zen 4).
DEFAULT_CORPUS_TOKENS = (3, 2)


def lookup_for(target, corpus: CorpusNgrams | None = None) -> LookupConfig:
    """Prompt lookup with proposal lengths chosen for this verifier: under the verify-cost curve the
    backend measured when it was exported (its `verify_cost`: fused ONNX Runtime graphs), else the
    default lengths (tuned for fp32 curves, flat enough that the choice matters little).
    corpus: corpus n-grams for the short-match steps, their lengths chosen the same way from the
    survival the table measured. Deterministic for a given export, thread count and table, so every
    process serving them alike proposes the same drafts."""
    curve = getattr(target, "verify_cost", None)
    config = LookupConfig()
    if curve:
        lengths = lengths_for_cost(curve)
        config = LookupConfig(max_tokens=max(max(lengths), 1), max_tokens_by_ngram=lengths)
    if corpus is None:
        return config
    corpus_tokens = tuple(lengths_for_cost(curve, corpus.survival)) if curve and corpus.survival else DEFAULT_CORPUS_TOKENS
    return LookupConfig(max_tokens=max(config.max_tokens, *corpus_tokens), max_tokens_by_ngram=config.max_tokens_by_ngram or (
        (config.max_tokens,) * config.max_ngram), corpus=corpus, corpus_tokens=corpus_tokens)


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
        n-gram, or the corpus continuation where that match is short (see the module docstring;
        [] when there is none). max_tokens: cap below the config's (e.g. the room left)."""
        return self.propose_from(max_tokens)[1]

    def propose_from(self, max_tokens: int | None = None, *, copies: bool = True, corpus: bool = True) -> tuple[str, list[int]]:
        """(kind, tokens): propose() with each kind allowed or not. The kind is the position's,
        whatever is allowed: where propose() would take corpus guesses they are the proposal or,
        not allowed, nothing (the short match's copy, rarely right there, would only blur the
        copies' record in the speed gate). kind: COPY, CORPUS, or "" with no tokens."""
        limit = self.config.max_tokens if max_tokens is None else min(max_tokens, self.config.max_tokens)
        if limit < 1:
            return "", []
        n, end = self.longest_match()
        corpus_cap = self.config.corpus_cap(n)
        if corpus_cap and self.tokens:
            guesses = self.config.corpus.continuation(self.tokens[-2:], min(limit, corpus_cap))
            if guesses:
                return (CORPUS, guesses) if corpus else ("", [])
        if n == 0 or not copies:
            return "", []
        copied = self.tokens[end + 1 : min(end + 1 + min(limit, self.config.cap(n)), len(self.tokens))]
        return (COPY, copied) if copied else ("", [])

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
    copy, longest = [], 0
    for n in range(min(config.max_ngram, length - 1), config.min_ngram - 1, -1):
        suffix = history[length - n :]
        ends = [end for end in range(length - 2, n - 2, -1) if history[end - n + 1 : end + 1] == suffix]  # latest first
        if ends:
            copy, longest = history[ends[0] + 1 : min(ends[0] + 1 + min(limit, config.cap(n)), length)], n
            break
    if config.corpus is not None and longest < len(config.corpus_tokens) and config.corpus_tokens[longest] and history:
        # the corpus continuation spelled out: trigram table, else bigram table, one guess at a time
        guesses, tail = [], list(history[-2:])
        while len(guesses) < min(limit, config.max_tokens, config.corpus_tokens[longest]):
            key = (tail[-2], tail[-1]) if len(tail) >= 2 else None
            guess = config.corpus.trigram.get(key) if key else None
            guess = config.corpus.bigram.get(tail[-1]) if guess is None else guess
            if guess is None:
                break
            guesses.append(guess)
            tail.append(guess)
        if guesses:
            return guesses
    return copy
