"""Labels of the block-size predictor: the max-τ rule (ties to the smaller size) and the tokens/s rule."""

from __future__ import annotations

import pytest

from blockpilot.errors import InvalidArgumentError
from blockpilot.policy.labels import best_index, label_index


def records(taus: dict[int, float], speeds: dict[int, float] | None = None) -> dict[int, dict]:
    speeds = speeds or {b: 10.0 for b in taus}
    return {b: {"tau": taus[b], "decode_tokens_per_s": speeds[b]} for b in taus}


def test_max_tau_picks_the_highest_tau():
    by_size = records({5: 2.0, 6: 2.5, 7: 3.1, 8: 2.9})
    assert label_index(by_size, (5, 6, 7, 8), "max_tau") == 2


def test_ties_go_to_the_smaller_size():
    # τ = tokens / steps: equal steps give bitwise-equal τ at several sizes.
    by_size = records({5: 2.0, 6: 128 / 40, 7: 128 / 40, 8: 128 / 40})
    assert label_index(by_size, (5, 6, 7, 8), "max_tau") == 1
    # A difference in the last bit (another summation order) is still a tie.
    assert best_index([0.3, 0.1 + 0.2]) == 0 and 0.1 + 0.2 > 0.3
    assert best_index([3.0, 3.0, 3.0]) == 0


def test_tokens_per_s_rule_can_prefer_a_smaller_block_than_tau():
    # The larger block accepts a little more but each of its steps costs more.
    by_size = records({4: 3.0, 8: 3.2}, speeds={4: 40.0, 8: 35.0})
    assert label_index(by_size, (4, 8), "max_tau") == 1
    assert label_index(by_size, (4, 8), "max_tokens_per_s") == 0


def test_labels_index_the_given_candidates_only():
    by_size = records({1: 1.0, 2: 1.5, 3: 9.0})
    assert label_index(by_size, (1, 2), "max_tau") == 1  # size 3 is not a candidate
    with pytest.raises(InvalidArgumentError, match=r"\[4\]"):
        label_index(by_size, (2, 4), "max_tau")
    with pytest.raises(InvalidArgumentError, match="'fastest'"):
        label_index(by_size, (1, 2), "fastest")
