"""Corpus n-grams (blockpilot.decoding.corpus): the tables by hand, the continuation, the files, the
survival measurement, the build from a drafter data folder, and which table an engine takes."""

from __future__ import annotations

import json

import pytest

from blockpilot.decoding.corpus import (METADATA_FILE, SURVIVAL_LENGTH, CorpusNgrams, build_from_responses, held_out,
                                        measure_survival)
from blockpilot.decoding.lookup import LookupConfig
from blockpilot.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from blockpilot.training.shards import ResponseRecord, ResponseStore

TARGET = {"name": "tiny", "weights_digest": "abc", "vocab_size": 100}


def test_count_keeps_each_keys_most_frequent_next_token():
    corpus = CorpusNgrams.count([[1, 2, 3], [1, 2, 3], [1, 2, 4], [5, 2, 4], [7, 8]], min_count=2)
    # bigram 2 -> 3 twice, -> 4 twice: a tie goes to the smaller id
    assert corpus.bigram == {1: 2, 2: 3, 5: 2, 7: 8}
    # (1, 2) -> 3 twice (kept), (5, 2) -> 4 once (below min_count: left to the bigram)
    assert corpus.trigram == {(1, 2): 3}
    assert CorpusNgrams.count([[5, 2, 4]], min_count=1).trigram == {(5, 2): 4}
    with pytest.raises(InvalidArgumentError, match="0"):
        CorpusNgrams.count([], min_count=0)


def test_continuation_prefers_the_trigram_then_the_bigram_and_stops_where_neither_knows():
    corpus = CorpusNgrams(bigram={1: 2, 2: 9, 3: 4}, trigram={(1, 2): 3, (2, 3): 5})
    assert corpus.continuation([0, 1], 10) == [2, 3, 5]  # (0,1)? no -> bigram 1->2; (1,2)->3; (2,3)->5; 5 unknown
    assert corpus.continuation([7, 2], 2) == [9]  # bigram only; 9 unknown
    assert corpus.continuation([1], 2) == [2, 3]  # one token of history: the bigram first
    assert corpus.continuation([4, 6], 3) == []
    assert corpus.continuation([0, 1], 1) == [2]


def test_files_round_trip(tmp_path):
    corpus = CorpusNgrams.count([[1, 2, 3], [1, 2, 3], [4, 5]], info={"target": TARGET, "records": 3})
    corpus = corpus.with_survival([[0.5] * SURVIVAL_LENGTH, [0.25] * SURVIVAL_LENGTH])
    loaded = CorpusNgrams.load(corpus.save(tmp_path / "t", vocab_size=100))
    assert loaded.bigram == corpus.bigram and loaded.trigram == corpus.trigram
    assert loaded.survival == corpus.survival
    assert loaded.info["target"] == TARGET and loaded.info["vocab_size"] == 100


def test_load_refuses_a_missing_or_foreign_folder(tmp_path):
    with pytest.raises(NotFoundError, match="blockpilot drafter corpus"):
        CorpusNgrams.load(tmp_path)
    CorpusNgrams.count([[1, 2]]).save(tmp_path, vocab_size=10)
    (tmp_path / METADATA_FILE).write_text(json.dumps({"format": "something-else/9"}))
    with pytest.raises(FailedPreconditionError, match="something-else/9"):
        CorpusNgrams.load(tmp_path)


def test_survival_counts_runs_of_right_guesses_by_match_case():
    corpus = CorpusNgrams(bigram={10: 11, 11: 12, 12: 13}, trigram={})
    # Prompt [1, 2]; response 10 11 12 99: at 10 (no earlier 10: case 0) guesses 11 12 13 -> 2 right;
    # at 11 (case 0) 12 13 -> 1 right; at 12 (case 0) 13 vs 99 -> 0 right.
    no_match, one_token = measure_survival(corpus, [([1, 2], [10, 11, 12, 99])], LookupConfig())
    assert no_match[:3] == pytest.approx((2 / 3, 1 / 3, 0.0), abs=1e-4)  # rounded to 4 places
    assert one_token == (0.0,) * SURVIVAL_LENGTH  # no position had a 1-token match
    # A response repeating its anchor: at the second 10 the longest match is 1 token (case 1).
    _, one_token = measure_survival(corpus, [([10], [5, 10, 11])], LookupConfig())
    assert one_token[0] == 1.0


def test_build_counts_greedy_records_and_measures_on_the_held_out_ones():
    records = [ResponseRecord(f"r/{i}", "d", mode, [0, 1, 2], [10, 11, 12, 13], "stop")
               for i in range(200) for mode in ("greedy", "sample")]
    corpus = build_from_responses(records, TARGET, holdout_share=0.1)
    test = sum(held_out(f"r/{i}", 0.1) for i in range(200))
    assert 0 < test < 200 and corpus.info["held_out_records"] == test and corpus.info["records"] == 200 - test
    assert corpus.info["tokens"] == 4 * (200 - test)  # greedy records only
    assert corpus.continuation([1, 2], 4) == [10, 11, 12, 13]  # the prompt's last 2 tokens lead in
    # every guess right; a position near the end has fewer tokens left to be right about
    assert corpus.survival[0][:4] == pytest.approx((1.0, 2 / 3, 1 / 3, 0.0), abs=1e-4)
    with pytest.raises(FailedPreconditionError, match="greedy records"):
        build_from_responses(records[1::2], TARGET)  # sampled records only


def test_the_cli_builds_a_table_from_a_data_folder(tmp_path, capsys):
    from blockpilot.cli import main

    store = ResponseStore(tmp_path / "data")
    store.bind_target(TARGET)
    store.write_shard([ResponseRecord(f"r/{i}", "d", "greedy", [0, 1, 2], [10 + i % 3, 11, 12], "stop") for i in range(60)], {})
    assert main(["drafter", "corpus", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "t"), "--holdout-share", "0.2"]) == 0
    report = json.loads(capsys.readouterr().out)
    loaded = CorpusNgrams.load(tmp_path / "t")
    assert loaded.info["target"] == TARGET and report["trigrams"] == len(loaded.trigram) > 0


def test_an_engine_takes_a_table_only_for_the_weights_it_was_counted_over(tmp_path, tiny_target):
    target = tiny_target
    from blockpilot.backends.onnx_export import weights_digest
    from blockpilot.runtime import resolve_corpus

    vocab = target.config.vocab_size
    assert resolve_corpus("none", target) is None
    assert resolve_corpus("auto", target) is None  # the shipped table is the default target's
    other = CorpusNgrams.count([[1, 2, 3]], info={"target": TARGET}).save(tmp_path / "other", vocab)
    with pytest.raises(FailedPreconditionError, match="another target"):
        resolve_corpus(str(other), target)
    own = CorpusNgrams.count([[1, 2, 3]], info={"target": {"weights_digest": weights_digest(target)}}).save(tmp_path / "own", vocab)
    assert resolve_corpus(str(own), target).bigram == {1: 2, 2: 3}
    # A digest already known (a graph backend's checked export) is taken as given, not recomputed.
    from blockpilot.backends.base import checked_weights_digest

    assert checked_weights_digest(target) is None  # the torch engine checked none
    assert resolve_corpus(str(other), target, digest=TARGET["weights_digest"]).bigram == {1: 2, 2: 3}
    with pytest.raises(FailedPreconditionError, match="another target"):
        resolve_corpus(str(own), target, digest=TARGET["weights_digest"])
