"""Prompt-lookup drafting (blockpilot.decoding.lookup): hand-built cases and the incremental
index against a slow rescan of the whole history."""

from __future__ import annotations

import random

import pytest

from blockpilot.decoding.lookup import COPY, CORPUS, LookupConfig, PromptLookupIndex, propose_slow
from blockpilot.errors import InvalidArgumentError


def index_of(history, **config):
    return PromptLookupIndex(LookupConfig(**config), history)


def test_copies_what_followed_the_latest_occurrence_of_the_longest_suffix():
    #          0  1  2  3  4  5  6  7  8  9
    history = [1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 1, 2, 3]
    # Suffix 2-gram (2, 3) and 3-gram (1, 2, 3) occur at 0..2 and 5..7; the latest is 5..7,
    # followed by 4, 5, 1, 2, 3 (the continuation may run up to the history's end).
    assert index_of(history, max_tokens=3).propose() == [4, 5, 1]
    assert index_of(history, max_tokens=10).propose() == [4, 5, 1, 2, 3]


def test_longer_ngram_wins_over_a_more_recent_shorter_one():
    history = [7, 8, 9, 1, 0, 8, 9, 2, 7, 8, 9]
    # (8, 9) last occurred at 5..6 (then 2), but (7, 8, 9) occurred only at 0..2 (then 1).
    assert index_of(history, min_ngram=2, max_ngram=3, max_tokens=2).propose() == [1, 0]
    assert index_of(history, min_ngram=2, max_ngram=2, max_tokens=2).propose() == [2, 7]


def test_no_match_and_too_short_suffix_propose_nothing():
    assert index_of([1, 2, 3, 4, 5]).propose() == []
    assert index_of([3]).propose() == []
    assert index_of([]).propose() == []
    # A 1-token suffix needs min_ngram 1.
    assert index_of([4, 6, 4], min_ngram=2).propose() == []
    assert index_of([4, 6, 4], min_ngram=1, max_ngram=2).propose() == [6, 4]


def test_the_suffix_itself_is_not_a_match():
    # (5, 5) ends at 1 and at 2 (the suffix): only the one at 1 has a continuation.
    assert index_of([5, 5, 5]).propose() == [5]


def test_cap_below_the_configured_maximum():
    history = [1, 2, 3, 4, 5, 1, 2]
    index = index_of(history, max_tokens=5)
    assert index.propose() == [3, 4, 5, 1, 2]
    assert index.propose(2) == [3, 4]
    assert index.propose(0) == []


def test_extend_is_the_same_as_building_from_the_whole_history():
    rng = random.Random(0)
    history = [rng.randrange(4) for _ in range(60)]
    grown = PromptLookupIndex(LookupConfig(min_ngram=1, max_ngram=3), history[:5])
    for lo in range(5, 60, 7):
        grown.extend(history[lo : lo + 7])
        assert grown.propose() == index_of(history[: lo + 7], min_ngram=1, max_ngram=3).propose()


@pytest.mark.parametrize("seed", range(6))
def test_index_matches_the_slow_reference(seed):
    rng = random.Random(seed)
    vocab = rng.choice([2, 3, 5, 20])
    max_ngram = rng.randint(3, 6)
    by_ngram = rng.choice([(), tuple(rng.randint(0, 8) for _ in range(max_ngram))])
    config = LookupConfig(min_ngram=rng.randint(1, 3), max_ngram=max_ngram, max_tokens=rng.randint(1, 9), max_tokens_by_ngram=by_ngram)
    assert_index_matches_the_slow_reference(config, [rng.randrange(vocab) for _ in range(rng.randint(0, 120))], rng)


def assert_index_matches_the_slow_reference(config, history, rng):
    """The index grown token by token proposes what a rescan proposes, under random caps."""
    index = PromptLookupIndex(config)
    for position, token in enumerate(history):
        index.extend([token])
        cap = rng.choice([None, 0, 1, 3])
        assert index.propose(cap) == propose_slow(history[: position + 1], config, cap), (position, cap)


@pytest.mark.parametrize("overrides", [dict(min_ngram=0), dict(min_ngram=4, max_ngram=3), dict(max_tokens=0)])
def test_bad_config_is_refused_with_the_value(overrides):
    with pytest.raises(InvalidArgumentError, match="got"):
        LookupConfig(**overrides)


def test_proposal_length_depends_on_the_match_length():
    history = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3]
    by_ngram = (1, 2, 4, 4)
    # A 3-gram match (1, 2, 3) allows 4 tokens; a 2-gram match only 2; max_tokens caps both.
    assert index_of(history, min_ngram=1, max_ngram=4, max_tokens=9, max_tokens_by_ngram=by_ngram).propose() == [4, 5, 6, 7]
    assert index_of(history, min_ngram=1, max_ngram=2, max_tokens=9, max_tokens_by_ngram=by_ngram).propose() == [4, 5]
    assert index_of(history, min_ngram=1, max_ngram=4, max_tokens=3, max_tokens_by_ngram=by_ngram).propose() == [4, 5, 6]
    # A 0 entry turns proposals after such short matches off.
    assert index_of([5, 9, 5], min_ngram=1, max_ngram=2, max_tokens_by_ngram=(0, 3)).propose() == []
    assert index_of(history, max_ngram=4, max_tokens_by_ngram=()).propose(5) == [4, 5, 6, 7, 8]


def test_bad_per_ngram_lengths_are_refused():
    with pytest.raises(InvalidArgumentError, match=r"\[3, 5\]"):
        LookupConfig(max_ngram=3, max_tokens_by_ngram=(3, 5))
    with pytest.raises(InvalidArgumentError, match="-1"):
        LookupConfig(max_ngram=2, max_tokens_by_ngram=(3, -1))


def test_proposal_lengths_follow_the_verify_cost_curve():
    from blockpilot.decoding.lookup import lengths_for_cost, lookup_for, step_worth

    survival = ((0.5, 0.25, 0.1), (0.9, 0.8, 0.7))
    flat = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    steep = {1: 1.0, 2: 1.0, 3: 1.6, 4: 2.2}
    # by hand: n=1 under the steep curve: L=1 -> 1.5 / 1.0, L=2 -> 1.75 / 1.6, L=3 -> 1.85 / 2.2
    assert step_worth(survival[0], 1, steep) == 1.5 and step_worth(survival[0], 0, steep) == 1.0
    assert lengths_for_cost(flat, survival) == (3, 3)  # verifying more costs nothing: copy all
    assert lengths_for_cost(steep, survival) == (1, 1)  # n=2: L=1 1.9 / 1.0 beats L=2 2.7 / 1.6 and L=3 3.4 / 2.2
    ruinous = {1: 1.0, 2: 3.0, 3: 5.0, 4: 7.0}
    assert lengths_for_cost(ruinous, survival) == (0, 0)  # no copy pays: plain steps

    class Backend:
        verify_cost = {k: 1.0 + 0.2 * (k - 1) for k in range(1, 13)}

    config = lookup_for(Backend())
    assert config.enabled and len(config.max_tokens_by_ngram) == 6 and config.max_tokens == max(config.max_tokens_by_ngram)
    assert lookup_for(object()) == LookupConfig()  # no measured curve: the default lengths


# ---- corpus n-grams where the text has no match of 2+ tokens -----------------------------------

def corpus_of(bigram, trigram=None, survival=()):
    from blockpilot.decoding.corpus import CorpusNgrams

    return CorpusNgrams(bigram=dict(bigram), trigram=dict(trigram or {}), survival=survival)


def test_corpus_continuation_replaces_short_matches_only():
    corpus = corpus_of({5: 6, 6: 7, 7: 8, 2: 40}, {(1, 2): 30, (2, 30): 31})
    config = dict(min_ngram=1, max_ngram=4, max_tokens=9, corpus=corpus, corpus_tokens=(3, 2))
    assert index_of([9, 5], **config).propose() == [6, 7, 8]  # no match: 3 corpus tokens
    assert index_of([5, 3, 5], **config).propose() == [6, 7]  # a 1-token match: 2 corpus tokens, not the copy [3]
    assert index_of([1, 2, 9, 1, 2], **config).propose() == [9, 1, 2]  # a 2-token match: the copy
    assert index_of([4, 3, 4], **config).propose() == [3, 4]  # the corpus knows nothing after 4: the copy
    assert index_of([9, 5], **config).propose(2) == [6, 7]  # the caller's cap
    assert index_of([5, 3, 5], **dict(config, corpus_tokens=(3, 0))).propose() == [3, 5]  # 0: copy as without a corpus
    assert index_of([9, 5], **dict(config, corpus=None)).propose() == []


def test_each_kind_of_proposal_is_named_and_can_be_left_out():
    """propose_from: what the speed gate judges apart. A position's kind is what propose() would
    take there; a kind left out proposes nothing (not the other kind)."""
    corpus = corpus_of({5: 6, 6: 7, 7: 8, 2: 40}, {(1, 2): 30, (2, 30): 31})
    config = dict(min_ngram=1, max_ngram=4, max_tokens=9, corpus=corpus, corpus_tokens=(3, 2))
    short, long = index_of([5, 3, 5], **config), index_of([1, 2, 9, 1, 2], **config)
    assert short.propose_from() == (CORPUS, [6, 7])
    assert short.propose_from(corpus=False) == ("", [])  # not the 1-token match's copy
    assert index_of([5, 3, 5], **dict(config, corpus_tokens=(3, 0))).propose_from(corpus=False) == (COPY, [3, 5])
    assert index_of([4, 3, 4], **config).propose_from() == (COPY, [3, 4])  # the corpus knows nothing after 4
    assert short.propose_from(copies=False) == (CORPUS, [6, 7])
    assert long.propose_from() == (COPY, [9, 1, 2])
    assert long.propose_from(copies=False) == ("", [])  # a 2-token match never takes corpus guesses
    assert index_of([9, 5], **config).propose_from(corpus=False) == ("", [])  # no match: nothing to copy
    assert short.propose_from(copies=False, corpus=False) == ("", [])
    assert index_of([4, 3, 4], **config).propose_from(copies=False) == ("", [])  # the corpus knows nothing after 4


def test_bad_corpus_lengths_are_refused():
    with pytest.raises(InvalidArgumentError, match=r"\[1, -2\]"):
        LookupConfig(corpus_tokens=(1, -2))
    with pytest.raises(InvalidArgumentError, match=r"\[1\]"):
        LookupConfig(corpus_tokens=(1,))


@pytest.mark.parametrize("seed", range(6))
def test_index_with_a_corpus_matches_the_slow_reference(seed):
    rng = random.Random(100 + seed)
    vocab = rng.choice([3, 6, 20])
    corpus = corpus_of({t: rng.randrange(vocab) for t in range(vocab) if rng.random() < 0.7},
                       {(a, b): rng.randrange(vocab) for a in range(vocab) for b in range(vocab) if rng.random() < 0.3})
    config = LookupConfig(min_ngram=rng.randint(1, 2), max_ngram=rng.randint(2, 5), max_tokens=rng.randint(1, 9),
                          corpus=corpus, corpus_tokens=(rng.randint(0, 4), rng.randint(0, 4)))
    assert_index_matches_the_slow_reference(config, [rng.randrange(vocab) for _ in range(rng.randint(0, 80))], rng)


def test_corpus_lengths_follow_the_verify_cost_curve_and_its_survival():
    from blockpilot.decoding.lookup import DEFAULT_CORPUS_TOKENS, lookup_for

    survival = ((0.5, 0.25) + (0.0,) * 6, (0.3,) + (0.0,) * 7)

    class Backend:  # a second token nearly free, the rest 20 % each
        verify_cost = {1: 1.0, 2: 1.03, **{k: 1.03 + 0.2 * (k - 2) for k in range(3, 13)}}

    config = lookup_for(Backend(), corpus_of({1: 2}, survival=survival))
    # no match: L=1 1.5/1.03 = 1.456, L=2 1.75/1.23 = 1.42 -> 1; one-token match: L=1 1.3/1.03 -> 1
    assert config.corpus_tokens == (1, 1) and config.corpus is not None
    assert lookup_for(Backend()).corpus is None
    assert lookup_for(object(), corpus_of({1: 2})).corpus_tokens == DEFAULT_CORPUS_TOKENS  # no curve, no survival
    assert config.describe()["corpus"]["bigrams"] == 1
