"""Tests for the acceptance rules (blockpilot.decoding.acceptance).

Three layers:
1. hand-built blocks whose verdicts can be read off by eye;
2. slow references (plain Python loops over positions and vocabulary entries, python floats,
   sequential as the papers define the rules) that must return the same verdict as the
   vectorized rules on hundreds of random blocks fed the same uniforms (top-k / top-p truncation
   too);
3. distribution tests, the losslessness claim at the math level: on a tiny vocabulary the tokens
   committed by draft-then-verify must follow the target's law, also when that law is truncated
   by top-k / top-p. The same chi-square checks are run on deliberately broken rules to show
   that they can fail.

Everything is seeded; there is no randomness that can flake.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter

import pytest
import torch

from blockpilot.decoding.acceptance import (
    Verdict,
    _sample_and_match_rows,
    _sample_and_match_vectorized,
    draw_uniforms,
    greedy_verify,
    probs_from_logits,
    sample_and_match_verify,
    sample_categorical,
    speculative_sampling_verify,
    token_logprobs,
    truncate_probs,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Every tensor here is tiny: intra-op threads only add wake-up latency, which on a busy
    # machine dominates the run time.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _probs(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _u(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _peaked_logits(tokens: list[int], vocab: int) -> torch.Tensor:
    """[len(tokens), vocab] logits whose row i has its unique maximum at tokens[i]."""
    logits = torch.zeros(len(tokens), vocab)
    logits[torch.arange(len(tokens)), _ids(tokens)] = 5.0
    return logits


# --------------------------------------------------------------------------------------------
# 1. Hand-built cases
# --------------------------------------------------------------------------------------------


def test_verdict_acceptance_length_and_immutability():
    verdict = Verdict(num_accepted=3, next_token=7)
    assert verdict.acceptance_length == 4
    assert Verdict(0, 1).acceptance_length == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.num_accepted = 1  # type: ignore[misc]


def test_draw_uniforms_is_seeded_float64_in_unit_interval():
    first = draw_uniforms(torch.Generator().manual_seed(3), 1000)
    again = draw_uniforms(torch.Generator().manual_seed(3), 1000)
    assert first.dtype == torch.float64 and first.shape == (1000,)
    assert torch.equal(first, again)
    assert bool((first >= 0).all()) and bool((first < 1).all())
    assert draw_uniforms(torch.Generator(), 0).shape == (0,)
    with pytest.raises(ValueError, match="count"):
        draw_uniforms(torch.Generator(), -1)


def test_probs_from_logits_is_tempered_softmax_in_float32():
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(0)) * 4
    for temperature in (0.25, 1.0, 2.5):
        probs = probs_from_logits(logits, temperature)
        assert probs.dtype == torch.float32 and probs.shape == (3, 7)
        expected = torch.softmax(logits.double() / temperature, dim=-1)
        assert torch.allclose(probs.double(), expected, rtol=1e-5, atol=1e-7)
    # Low-precision logits come back as float32 too.
    assert probs_from_logits(logits.to(torch.bfloat16), 1.0).dtype == torch.float32
    # Any batch shape.
    assert probs_from_logits(torch.zeros(2, 3, 4), 1.0).shape == (2, 3, 4)


def test_probs_from_logits_is_stable_at_extremes():
    logits = torch.tensor([[1e4, 0.0, -1e4], [3.0, float("-inf"), 3.0]])
    # A tiny temperature must give a one-hot row, not inf / inf = NaN.
    cold = probs_from_logits(logits, 1e-30)
    assert torch.equal(cold[0], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(cold[1], torch.tensor([0.5, 0.0, 0.5]))
    hot = probs_from_logits(logits, 1e6)
    assert bool(torch.isfinite(hot).all())
    assert torch.allclose(hot.sum(-1), torch.ones(2))
    assert hot[1, 1] == 0  # -inf stays impossible at any temperature


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_probs_from_logits_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        probs_from_logits(torch.zeros(4), temperature)


def test_sample_categorical_inverse_cdf_boundaries():
    probs = _probs([[0.25, 0.25, 0.5]])[0]
    below_quarter = math.nextafter(0.25, 0.0)
    cases = {0.0: 0, below_quarter: 0, 0.25: 1, 0.4999: 1, 0.5: 2, math.nextafter(1.0, 0.0): 2}
    for u, token in cases.items():
        assert sample_categorical(probs, _u([u])[0]).item() == token, u
        # Rows need not be normalized: the threshold is u * row_total.
        assert sample_categorical(probs * 4, _u([u])[0]).item() == token, u
    assert sample_categorical(probs, _u([0.3])[0]).dtype == torch.int64


def test_sample_categorical_never_returns_a_zero_probability_token():
    probs = _probs([[0.0, 0.5, 0.0, 0.5, 0.0]])[0]
    assert sample_categorical(probs, _u([0.0])[0]).item() == 1
    assert sample_categorical(probs, _u([math.nextafter(0.5, 0.0)])[0]).item() == 1
    assert sample_categorical(probs, _u([0.5])[0]).item() == 3
    assert sample_categorical(probs, _u([math.nextafter(1.0, 0.0)])[0]).item() == 3
    # u = 1 is outside the contract; the top-end cap still returns the last possible token.
    assert sample_categorical(probs, _u([1.0])[0]).item() == 3
    grid = torch.linspace(0, 1, 1001, dtype=torch.float64)[:-1]
    tokens = sample_categorical(probs.expand(grid.shape[0], -1), grid)
    assert set(tokens.tolist()) == {1, 3}
    # An all-zero row is invalid input; the id still stays in range.
    assert 0 <= sample_categorical(torch.zeros(4), _u([0.5])[0]).item() < 4


def test_sample_categorical_batched_matches_row_by_row():
    generator = torch.Generator().manual_seed(1)
    probs = torch.rand(2, 3, 11, generator=generator)
    uniforms = draw_uniforms(generator, 6).view(2, 3)
    batched = sample_categorical(probs, uniforms)
    assert batched.shape == (2, 3) and batched.dtype == torch.int64
    for i in range(2):
        for j in range(3):
            assert batched[i, j].item() == sample_categorical(probs[i, j], uniforms[i, j]).item()


def test_sample_categorical_rejects_bad_shapes():
    with pytest.raises(ValueError, match="uniforms must have shape"):
        sample_categorical(torch.ones(3, 4), _u([0.5]))
    with pytest.raises(ValueError, match="V > 0"):
        sample_categorical(torch.ones(3, 0), _u([0.5, 0.5, 0.5]))


def test_greedy_accepts_everything_and_takes_the_bonus_from_the_last_row():
    logits = _peaked_logits([4, 2, 7, 1], vocab=8)
    assert greedy_verify(_ids([4, 2, 7]), logits) == Verdict(3, 1)


def test_greedy_rejects_first_and_middle():
    logits = _peaked_logits([4, 2, 7, 1], vocab=8)
    assert greedy_verify(_ids([5, 2, 7]), logits) == Verdict(0, 4)
    assert greedy_verify(_ids([4, 3, 7]), logits) == Verdict(1, 2)
    assert greedy_verify(_ids([4, 2, 0]), logits) == Verdict(2, 7)
    # A later position that would match does not count after a rejection: accepted is a prefix.
    assert greedy_verify(_ids([4, 0, 7]), logits) == Verdict(1, 2)


def test_greedy_with_no_draft_is_a_plain_step():
    assert greedy_verify(_ids([]), _peaked_logits([6], vocab=8)) == Verdict(0, 6)


def test_greedy_ties_go_to_the_lowest_token_id():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0]])
    assert greedy_verify(_ids([1]), logits) == Verdict(1, 0)
    assert greedy_verify(_ids([3]), logits) == Verdict(0, 1)


def test_greedy_accepts_int32_drafts():
    logits = _peaked_logits([4, 2], vocab=8)
    assert greedy_verify(torch.tensor([4], dtype=torch.int32), logits) == Verdict(1, 2)


def test_greedy_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"target_logits must have shape \[3, V\]"):
        greedy_verify(_ids([1, 2]), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="draft_tokens"):
        greedy_verify(torch.zeros(1, 2, dtype=torch.int64), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="draft_tokens"):
        greedy_verify(torch.tensor([1.0]), torch.zeros(2, 5))


def test_sample_and_match_with_point_mass_target_is_greedy():
    # One-hot target rows: whatever the uniforms, the sample is the one possible token.
    probs = _probs([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0]])
    uniforms = _u([0.9, 0.1, 0.5])
    assert sample_and_match_verify(_ids([2, 1]), probs, uniforms) == Verdict(2, 0)
    assert sample_and_match_verify(_ids([2, 3]), probs, uniforms) == Verdict(1, 1)
    assert sample_and_match_verify(_ids([0, 1]), probs, uniforms) == Verdict(0, 2)


def test_sample_and_match_hand_case():
    probs = _probs([[0.25, 0.25, 0.5], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    # x = [sample row 0 at 0.3 -> 1, row 1 at 0.7 -> 1, row 2 -> 2].
    uniforms = _u([0.3, 0.7, 0.1])
    assert sample_and_match_verify(_ids([1, 1]), probs, uniforms) == Verdict(2, 2)
    assert sample_and_match_verify(_ids([1, 0]), probs, uniforms) == Verdict(1, 1)
    assert sample_and_match_verify(_ids([2, 1]), probs, uniforms) == Verdict(0, 1)
    # n = 0: a plain sampled step.
    assert sample_and_match_verify(_ids([]), probs[:1], _u([0.9])) == Verdict(0, 2)


def test_sample_and_match_rejects_bad_shapes():
    probs = _probs([[0.5, 0.5]] * 3)
    with pytest.raises(ValueError, match=r"uniforms must have shape \[3\]"):
        sample_and_match_verify(_ids([0, 1]), probs, _u([0.5, 0.5]))
    with pytest.raises(ValueError, match="target_probs"):
        sample_and_match_verify(_ids([0]), probs, _u([0.5, 0.5]))


def test_speculative_with_draft_equal_to_target_accepts_everything():
    generator = torch.Generator().manual_seed(5)
    target = probs_from_logits(torch.randn(4, 9, generator=generator), 1.0)
    draft_tokens = _ids([3, 0, 8])
    for _ in range(50):
        verdict = speculative_sampling_verify(
            draft_tokens, target[:3].clone(), target, draw_uniforms(generator, 3), 0.6
        )
        assert verdict.num_accepted == 3
        # The bonus is drawn from p_n with the residual uniform.
        assert verdict.next_token == sample_categorical(target[3], _u([0.6])[0]).item()


def test_speculative_rejects_a_zero_target_probability_draft_and_never_emits_it():
    target = _probs([[0.5, 0.0, 0.5], [0.2, 0.3, 0.5]])
    draft = _probs([[0.0, 1.0, 0.0]])
    seen = set()
    for u in torch.linspace(0, 1, 201, dtype=torch.float64)[:-1].tolist():
        verdict = speculative_sampling_verify(_ids([1]), draft, target, _u([0.0]), u)
        assert verdict.num_accepted == 0
        seen.add(verdict.next_token)
    assert seen == {0, 2}


def test_speculative_residual_on_three_tokens():
    # p = [1/2, 1/4, 1/4], q = [1/4, 3/4, 0], d = 1: accept with probability p/q = 1/3.
    target = _probs([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]])
    draft = _probs([[0.25, 0.75, 0.0]])
    # 0.33 * 0.75 < 0.25 accepts; 0.34 * 0.75 > 0.25 rejects.
    assert speculative_sampling_verify(_ids([1]), draft, target, _u([0.33]), 0.5) == Verdict(1, 2)
    # Residual max(0, p - q) = [1/4, 0, 1/4] -> [1/2, 0, 1/2]: never the rejected token.
    for u, token in [(0.0, 0), (0.49, 0), (0.5, 2), (0.99, 2)]:
        assert speculative_sampling_verify(_ids([1]), draft, target, _u([0.34]), u) == Verdict(0, token)

    # p = [1/2, 3/8, 1/8], q = [1/8, 1/4, 5/8], d = 2: residual [3/8, 1/8, 0] -> [3/4, 1/4, 0].
    target = _probs([[0.5, 0.375, 0.125], [1.0, 0.0, 0.0]])
    draft = _probs([[0.125, 0.25, 0.625]])
    assert speculative_sampling_verify(_ids([2]), draft, target, _u([0.19]), 0.0) == Verdict(1, 0)
    assert speculative_sampling_verify(_ids([2]), draft, target, _u([0.21]), 0.74) == Verdict(0, 0)
    assert speculative_sampling_verify(_ids([2]), draft, target, _u([0.21]), 0.75) == Verdict(0, 1)
    assert speculative_sampling_verify(_ids([2]), draft, target, _u([0.21]), 0.99) == Verdict(0, 1)


def test_speculative_residual_uses_the_rejected_row():
    # Row 0 accepts (q == p); row 1 rejects d_2 = 0 and must draw from max(0, p_1 - q_1) = token 2.
    target = _probs([[0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0]])
    draft = _probs([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    for u in (0.0, 0.5, 0.999):
        verdict = speculative_sampling_verify(_ids([1, 0]), draft, target, _u([0.9, 0.6]), u)
        assert verdict == Verdict(1, 2)


def test_speculative_zero_residual_falls_back_to_the_target_row():
    # d = 2 has p = q = 0 (it cannot have been sampled): rejected, and p_0 == q_0 leaves no
    # residual, so the next token comes from p_0 itself.
    target = _probs([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    draft = _probs([[0.5, 0.5, 0.0]])
    assert speculative_sampling_verify(_ids([2]), draft, target, _u([0.0]), 0.2) == Verdict(0, 0)
    assert speculative_sampling_verify(_ids([2]), draft, target, _u([0.0]), 0.7) == Verdict(0, 1)


def test_speculative_draft_with_zero_draft_probability_is_accepted_iff_target_allows_it():
    # Documented decision for this impossible input: the ratio p/q is +inf, so accept iff p > 0.
    target = _probs([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    draft = _probs([[0.0, 1.0, 0.0]])
    assert speculative_sampling_verify(_ids([0]), draft, target, _u([0.99]), 0.5) == Verdict(1, 2)


def test_speculative_with_no_draft_samples_the_first_row():
    target = _probs([[0.25, 0.25, 0.5]])
    empty_draft = torch.zeros(0, 3)
    assert speculative_sampling_verify(_ids([]), empty_draft, target, _u([]), 0.3) == Verdict(0, 1)


def test_speculative_residual_uniform_may_be_a_float_or_a_scalar_tensor():
    target = _probs([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]])
    draft = _probs([[0.25, 0.75, 0.0]])
    as_float = speculative_sampling_verify(_ids([1]), draft, target, _u([0.9]), 0.6)
    as_tensor = speculative_sampling_verify(_ids([1]), draft, target, _u([0.9]), _u([0.6])[0])
    assert as_float == as_tensor == Verdict(0, 2)
    with pytest.raises(ValueError, match="residual_uniform"):
        speculative_sampling_verify(_ids([1]), draft, target, _u([0.9]), _u([0.6]))


def test_speculative_rejects_bad_shapes():
    target = _probs([[0.5, 0.5]] * 3)
    draft = _probs([[0.5, 0.5]] * 2)
    with pytest.raises(ValueError, match=r"draft_probs must have shape \[2, 2\]"):
        speculative_sampling_verify(_ids([0, 1]), draft[:1], target, _u([0.5, 0.5]), 0.5)
    with pytest.raises(ValueError, match="the target's V"):
        speculative_sampling_verify(_ids([0, 1]), torch.ones(2, 3) / 3, target, _u([0.5, 0.5]), 0.5)
    with pytest.raises(ValueError, match=r"accept_uniforms must have shape \[2\]"):
        speculative_sampling_verify(_ids([0, 1]), draft, target, _u([0.5]), 0.5)
    with pytest.raises(ValueError, match=r"target_probs must have shape \[3, V\]"):
        speculative_sampling_verify(_ids([0, 1]), draft, target[:2], _u([0.5, 0.5]), 0.5)


def test_truncate_top_k_keeps_the_k_most_likely_renormalised():
    probs = _probs([[0.1, 0.4, 0.2, 0.3], [0.5, 0.0, 0.25, 0.25]])
    torch.testing.assert_close(truncate_probs(probs, top_k=2), _probs([[0.0, 4 / 7, 0.0, 3 / 7], [2 / 3, 0.0, 1 / 3, 0.0]]))
    # k at or above V keeps everything; a zero-probability token stays at zero even when kept.
    assert torch.equal(truncate_probs(probs, top_k=4), probs)
    assert truncate_probs(probs, top_k=3)[1].tolist() == [0.5, 0.0, 0.25, 0.25]


def test_truncate_ties_go_to_the_lowest_token_id():
    probs = _probs([[0.1, 0.3, 0.3, 0.2, 0.1]])
    assert truncate_probs(probs, top_k=1).tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0]]  # = greedy's choice
    assert truncate_probs(probs, top_k=4)[0].tolist() == pytest.approx([1 / 9, 1 / 3, 1 / 3, 2 / 9, 0.0])
    assert truncate_probs(probs, top_p=1e-9).tolist() == [[0.0, 1.0, 0.0, 0.0, 0.0]]


def test_truncate_top_p_keeps_the_shortest_prefix_that_reaches_it():
    probs = _probs([[0.125, 0.25, 0.5, 0.125]])  # dyadic: the boundary sums are exact
    torch.testing.assert_close(truncate_probs(probs, top_p=0.75), _probs([[0.0, 1 / 3, 2 / 3, 0.0]]))  # 0.5 + 0.25 reaches it
    torch.testing.assert_close(truncate_probs(probs, top_p=0.7501), _probs([[1 / 7, 2 / 7, 4 / 7, 0.0]]))  # needs a third rank
    assert truncate_probs(probs, top_p=0.5).tolist() == [[0.0, 0.0, 1.0, 0.0]]
    assert truncate_probs(probs, top_p=1e-9).tolist() == [[0.0, 0.0, 1.0, 0.0]]  # tiny: the mode alone


def test_truncate_top_k_then_top_p_of_the_renormalised_rest():
    probs = _probs([[0.4, 0.1, 0.2, 0.2, 0.1]])
    # top-k 3 keeps {0, 2, 3} = 0.5, 0.25, 0.25 after renormalising; top-p 0.6 of that needs two.
    torch.testing.assert_close(truncate_probs(probs, top_k=3, top_p=0.6), _probs([[2 / 3, 0.0, 1 / 3, 0.0, 0.0]]))
    # Top-p on the untruncated row would keep three tokens (0.4 + 0.2 = 0.6 does not exceed 0.6 here).
    assert (truncate_probs(probs, top_p=0.61) > 0).sum().item() == 3


def test_truncate_is_applied_by_probs_from_logits_and_rejects_bad_values():
    logits = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    assert torch.equal(probs_from_logits(logits, 0.8, top_k=3, top_p=0.7), truncate_probs(probs_from_logits(logits, 0.8), 3, 0.7))
    for top_k in (-1, 1.5, True):
        with pytest.raises(ValueError, match=rf"top_k must be an integer >= 0 \(0 = off\), got {top_k!r}"):
            truncate_probs(logits.softmax(-1), top_k=top_k)
    for top_p in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="top_p must be in"):
            truncate_probs(logits.softmax(-1), top_p=top_p)


def test_truncated_rows_verify_like_any_other_target():
    # Top-k 1 at temperature > 0 is the greedy choice, so sample-and-match accepts exactly what
    # greedy_verify accepts, whatever the uniforms.
    logits = _peaked_logits([2, 0, 3], vocab=5)
    target = probs_from_logits(logits, 1.0, top_k=1)
    for u in ([0.0, 0.0, 0.0], [0.999, 0.5, 0.999]):
        assert sample_and_match_verify(_ids([2, 1]), target, _u(u)) == greedy_verify(_ids([2, 1]), logits) == Verdict(1, 0)


# --------------------------------------------------------------------------------------------
# 2. Slow references, compared verdict for verdict
# --------------------------------------------------------------------------------------------


def ref_sample(weights: list[float], u: float) -> int:
    """Inverse CDF: the smallest index whose running sum exceeds u * total."""
    running, cdf = 0.0, []
    for w in weights:
        running += w
        cdf.append(running)
    threshold = u * cdf[-1]
    for index, value in enumerate(cdf):
        if value > threshold:
            return index
    raise AssertionError("u * total reached the total; u must lie in [0, 1)")


def ref_argmax(row: list[float]) -> int:
    best = 0
    for index, value in enumerate(row):
        if value > row[best]:
            best = index
    return best


def ref_truncate(row: list[float], top_k: int, top_p: float) -> list[float]:
    """Rank by (probability desc, id asc); keep top_k ranks (0 = all); keep ranks while the mass
    before them is below top_p of the kept total (1 = all); renormalise."""
    kept = sorted(range(len(row)), key=lambda t: (-row[t], t))
    if top_k:
        kept = kept[:top_k]
    if top_p < 1:
        total = 0.0
        for t in kept:
            total += row[t]
        prefix, before = [], 0.0
        for t in kept:
            if before < top_p * total:
                prefix.append(t)
            before += row[t]
        kept = prefix
    mass = sum(row[t] for t in kept)
    return [row[t] / mass if t in kept else 0.0 for t in range(len(row))]


def ref_greedy(draft: list[int], logits: list[list[float]]) -> Verdict:
    for i, token in enumerate(draft):
        choice = ref_argmax(logits[i])
        if token != choice:
            return Verdict(i, choice)
    return Verdict(len(draft), ref_argmax(logits[len(draft)]))


def ref_sample_and_match(draft: list[int], target: list[list[float]], uniforms: list[float]) -> Verdict:
    for i, token in enumerate(draft):
        sample = ref_sample(target[i], uniforms[i])
        if sample != token:
            return Verdict(i, sample)
    return Verdict(len(draft), ref_sample(target[len(draft)], uniforms[len(draft)]))


def ref_speculative(
    draft: list[int],
    draft_probs: list[list[float]],
    target: list[list[float]],
    accept_uniforms: list[float],
    residual_uniform: float,
) -> Verdict:
    for i, token in enumerate(draft):
        p, q = target[i][token], draft_probs[i][token]
        # q = 0 cannot be sampled; the module's documented reading is "p / 0 = inf".
        accept = accept_uniforms[i] < min(1.0, p / q) if q > 0 else p > 0
        if not accept:
            residual = [max(0.0, pj - qj) for pj, qj in zip(target[i], draft_probs[i])]
            if sum(residual) > 0:
                return Verdict(i, ref_sample(residual, residual_uniform))
            return Verdict(i, ref_sample(target[i], residual_uniform))
    return Verdict(len(draft), ref_sample(target[len(draft)], residual_uniform))


def _random_logits(rng: random.Random, generator: torch.Generator, rows: int, vocab: int) -> torch.Tensor:
    """Random logits with some impossible (-inf) entries and, sometimes, exact ties."""
    if rng.random() < 0.3:
        logits = torch.randint(-2, 3, (rows, vocab), generator=generator).float()  # many ties
    else:
        logits = torch.randn(rows, vocab, generator=generator) * rng.choice([0.5, 2.0, 6.0])
    impossible = torch.rand(rows, vocab, generator=generator) < 0.25
    impossible[torch.arange(rows), torch.randint(vocab, (rows,), generator=generator)] = False
    return logits.masked_fill(impossible, float("-inf"))


def _likely_or_random(rng: random.Random, likely: int, vocab: int) -> int:
    """A draft token: usually one the target likes (so acceptance runs long), else anything."""
    return likely if rng.random() < 0.75 else rng.randrange(vocab)


class _Coverage:
    """Counts which kinds of verdict a random sweep produced, so it cannot silently miss one."""

    def __init__(self) -> None:
        self.kinds: Counter[str] = Counter()

    def add(self, n: int, verdict: Verdict) -> None:
        if n == 0:
            self.kinds["no draft"] += 1
        elif verdict.num_accepted == 0:
            self.kinds["first rejected"] += 1
        elif verdict.num_accepted < n:
            self.kinds["middle rejected"] += 1
        else:
            self.kinds["all accepted"] += 1

    def assert_all_seen(self, at_least: int = 10) -> None:
        for kind in ("no draft", "first rejected", "middle rejected", "all accepted"):
            assert self.kinds[kind] >= at_least, self.kinds


CASES = 300


def test_greedy_matches_reference():
    rng, generator, coverage = random.Random(10), torch.Generator().manual_seed(10), _Coverage()
    for case in range(CASES):
        vocab, n = rng.randint(2, 50), rng.randint(0, 8)
        logits = _random_logits(rng, generator, n + 1, vocab)
        rows = logits.tolist()
        draft = [_likely_or_random(rng, ref_argmax(rows[i]), vocab) for i in range(n)]
        verdict = greedy_verify(_ids(draft), logits)
        assert verdict == ref_greedy(draft, rows), case
        coverage.add(n, verdict)
    coverage.assert_all_seen()


def test_sample_and_match_matches_reference():
    rng, generator, coverage = random.Random(11), torch.Generator().manual_seed(11), _Coverage()
    for case in range(CASES):
        vocab, n = rng.randint(2, 50), rng.randint(0, 8)
        target = probs_from_logits(_random_logits(rng, generator, n + 1, vocab), rng.choice([0.3, 1.0, 1.7]))
        rows = target.tolist()
        draft = [_likely_or_random(rng, ref_argmax(rows[i]), vocab) for i in range(n)]
        uniforms = draw_uniforms(generator, n + 1)
        verdict = sample_and_match_verify(_ids(draft), target, uniforms)
        assert verdict == ref_sample_and_match(draft, rows, uniforms.tolist()), case
        coverage.add(n, verdict)
    coverage.assert_all_seen()


def test_speculative_matches_reference():
    rng, generator, coverage = random.Random(12), torch.Generator().manual_seed(12), _Coverage()
    for case in range(CASES):
        vocab, n = rng.randint(2, 50), rng.randint(0, 8)
        temperature = rng.choice([0.3, 1.0, 1.7])
        target = probs_from_logits(_random_logits(rng, generator, n + 1, vocab), temperature)
        kind = rng.random()
        if kind < 0.15:
            # q == p: everything a drafter can sample is accepted; a q(d) = 0 draft below is
            # rejected with an all-zero residual (the fallback to p_a).
            draft_probs = target[:n].clone()
        elif kind < 0.35:
            # A drafter that nearly agrees with the target: long acceptances, bonus from p_n.
            draft_probs = probs_from_logits(torch.log(target[:n] + 1e-3), 1.0)
        else:
            draft_probs = probs_from_logits(_random_logits(rng, generator, n, vocab), temperature)
        target_rows, draft_rows = target.tolist(), draft_probs.tolist()
        draft = []
        for i in range(n):
            if rng.random() < 0.1:
                draft.append(rng.randrange(vocab))  # maybe q(d) = 0: the bad-input path
            else:
                draft.append(ref_sample(draft_rows[i], rng.random()))  # d_{i+1} ~ q_i
        accept_uniforms, residual_uniform = draw_uniforms(generator, n), draw_uniforms(generator, 1)[0]
        verdict = speculative_sampling_verify(_ids(draft), draft_probs, target, accept_uniforms, residual_uniform)
        expected = ref_speculative(draft, draft_rows, target_rows, accept_uniforms.tolist(), residual_uniform.item())
        assert verdict == expected, case
        coverage.add(n, verdict)
    coverage.assert_all_seen()


def test_truncation_matches_reference():
    rng, generator = random.Random(14), torch.Generator().manual_seed(14)
    cut = 0
    for case in range(CASES):
        vocab = rng.randint(1, 50)
        top_k = rng.choice([0, 1, rng.randint(1, vocab + 2)])
        top_p = rng.choice([1.0, 1e-9, rng.uniform(0.05, 0.99)])
        rows = probs_from_logits(_random_logits(rng, generator, 3, vocab), rng.choice([0.3, 1.0, 1.7]))
        truncated = truncate_probs(rows, top_k, top_p)
        for row, got in zip(rows.tolist(), truncated.tolist()):
            expected = ref_truncate(row, top_k, top_p)
            assert [p > 0 for p in got] == [p > 0 for p in expected], case  # the same support, exactly
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-7), case
            cut += sum(p > 0 for p in got) < sum(p > 0 for p in row)
    assert cut > CASES // 2  # most cases did cut something


def test_rules_match_reference_at_full_vocabulary_size():
    # The production vocabulary: float64 CDFs over 49,152 entries must agree with the
    # sequential python sum too.
    vocab, n = 49_152, 4
    rng, generator = random.Random(13), torch.Generator().manual_seed(13)
    for _ in range(2):
        logits = torch.randn(n + 1, vocab, generator=generator) * 3
        target = probs_from_logits(logits, 1.0)
        draft_probs = probs_from_logits(torch.randn(n, vocab, generator=generator) * 3, 1.0)
        target_rows, draft_rows = target.tolist(), draft_probs.tolist()
        draft = [ref_argmax(target_rows[i]) for i in range(n - 1)] + [rng.randrange(vocab)]
        uniforms = draw_uniforms(generator, n + 1)
        assert greedy_verify(_ids(draft), logits) == ref_greedy(draft, logits.tolist())
        assert sample_and_match_verify(_ids(draft), target, uniforms) == ref_sample_and_match(
            draft, target_rows, uniforms.tolist()
        )
        assert speculative_sampling_verify(_ids(draft), draft_probs, target, uniforms[:n], uniforms[n]) == (
            ref_speculative(draft, draft_rows, target_rows, uniforms[:n].tolist(), uniforms[n].item())
        )


# --------------------------------------------------------------------------------------------
# 3. Distribution tests: committed tokens follow the target's law
# --------------------------------------------------------------------------------------------
#
# A toy "language" over V = 5 tokens. The target's law of the first token after the anchor is P0
# and of the second token given the first token x is P1[x]; anything later follows LATER. The
# drafter's laws are Q0, Q1[x], LATER. They differ a lot: Q0 never proposes token 0 (so the
# target's most likely token can only come from the residual) and favours token 4, which the
# target never emits first; P1[0] and P1[3] forbid a token that the drafter proposes.
#
# One trial decodes from the anchor until two tokens are committed: a block of N_DRAFT drafts is
# verified; if only the next token was committed (a = 0), a second block anchored at it follows.
# Losslessness means, for every rule:
#   * the first committed token ~ P0;
#   * the second committed token given the first x ~ P1[x], whether it came from the first block
#     (a >= 1: the first token was the accepted draft d_1 and row 1 of the same block judged the
#     rest) or from the second block. The a >= 1 trials are checked on their own as well: that
#     is the case where a rule's use of rows beyond row 0 shows.

P0 = [0.40, 0.25, 0.20, 0.15, 0.00]
P1 = [
    [0.10, 0.20, 0.30, 0.40, 0.00],
    [0.50, 0.05, 0.05, 0.20, 0.20],
    [0.05, 0.60, 0.15, 0.10, 0.10],
    [0.25, 0.25, 0.25, 0.00, 0.25],
    [0.20, 0.20, 0.20, 0.20, 0.20],  # after token 4: never reached, P0 forbids it
]
Q0 = [0.00, 0.10, 0.35, 0.15, 0.40]
Q1 = [
    [0.40, 0.30, 0.20, 0.05, 0.05],
    [0.05, 0.50, 0.05, 0.20, 0.20],
    [0.30, 0.10, 0.10, 0.25, 0.25],
    [0.10, 0.10, 0.10, 0.60, 0.10],
    [0.20, 0.20, 0.20, 0.20, 0.20],
]
LATER = [0.10, 0.30, 0.20, 0.20, 0.20]
GREEDY_CHOICE = [0.10, 0.10, 0.60, 0.10, 0.10]  # how often the point-mass drafter picks each token
VOCAB, N_DRAFT, TRIALS = 5, 2, 6_000
P_VALUE_FLOOR = 1e-3


def _law(table0: list[float], table1: list[list[float]], committed_and_draft: list[int]) -> list[float]:
    """The law of the next token after the anchor followed by the given tokens."""
    if not committed_and_draft:
        return table0
    if len(committed_and_draft) == 1:
        return table1[committed_and_draft[0]]
    return LATER


# A rule under test: (draft tokens, draft rows, target rows, generator) -> Verdict. It draws its
# own uniforms from the generator.
def sample_and_match_rule(draft, draft_rows, target_rows, generator):
    uniforms = draw_uniforms(generator, len(draft) + 1)
    return sample_and_match_verify(_ids(draft), _probs(target_rows), uniforms)


def speculative_rule(draft, draft_rows, target_rows, generator):
    uniforms = draw_uniforms(generator, len(draft) + 1)
    return speculative_sampling_verify(
        _ids(draft), _probs(draft_rows), _probs(target_rows), uniforms[:-1], uniforms[-1]
    )


def broken_match_fresh_resample(draft, draft_rows, target_rows, generator):
    """Broken: on a mismatch, draws the next token afresh from p_a (it may be the rejected d)."""
    uniforms = draw_uniforms(generator, len(draft) + 2).tolist()
    verdict = ref_sample_and_match(draft, target_rows, uniforms[:-1])
    if verdict.num_accepted < len(draft):
        return Verdict(verdict.num_accepted, ref_sample(target_rows[verdict.num_accepted], uniforms[-1]))
    return verdict


def broken_speculative(mutation: str):
    """A speculative rule with one textbook step replaced by a plausible mistake."""

    def rule(draft, draft_rows, target_rows, generator):
        *accept_uniforms, residual_uniform = draw_uniforms(generator, len(draft) + 1).tolist()
        for i, token in enumerate(draft):
            p, q = target_rows[i][token], draft_rows[i][token]
            if mutation == "accept with min(1, q/p)":
                accept = accept_uniforms[i] < (min(1.0, q / p) if p > 0 else 0.0)
            else:
                accept = accept_uniforms[i] < min(1.0, p / q)
            if not accept:
                if mutation == "residual from p":
                    return Verdict(i, ref_sample(target_rows[i], residual_uniform))
                row = 0 if mutation == "residual from row 0" else i
                residual = [max(0.0, pj - qj) for pj, qj in zip(target_rows[row], draft_rows[row])]
                return Verdict(i, ref_sample(residual, residual_uniform))
        return Verdict(len(draft), ref_sample(target_rows[len(draft)], residual_uniform))

    return rule


def _point_mass_drafter(rng: random.Random, prefix: list[int]) -> tuple[int, list[float]]:
    """A greedy drafter: a point mass on a token that varies from trial to trial.

    Its choice is skewed (mostly token 2): with a uniform choice, even some broken rules would
    keep the right first-token law by symmetry.
    """
    token = ref_sample(GREEDY_CHOICE, rng.random())
    return token, [1.0 if t == token else 0.0 for t in range(VOCAB)]


def _sampling_drafter(rng: random.Random, prefix: list[int]) -> tuple[int, list[float]]:
    """A sampling drafter: d ~ q(. | prefix)."""
    row = _law(Q0, Q1, prefix)
    return ref_sample(row, rng.random()), row


def _decode_two_tokens(rule, drafter, seed: int) -> list[tuple[int, int, bool]]:
    """Run TRIALS trials; each returns (first token, second token, first block accepted d_1)."""
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    outcomes = []
    for _ in range(TRIALS):
        committed: list[int] = []
        first_block_accepted = None
        while len(committed) < 2:
            draft, draft_rows = [], []
            for _ in range(N_DRAFT):
                token, row = drafter(rng, committed + draft)
                draft.append(token)
                draft_rows.append(row)
            target_rows = [_law(P0, P1, committed + draft[:i]) for i in range(N_DRAFT + 1)]
            verdict = rule(draft, draft_rows, target_rows, generator)
            if first_block_accepted is None:
                first_block_accepted = verdict.num_accepted >= 1
            committed += draft[: verdict.num_accepted] + [verdict.next_token]
        outcomes.append((committed[0], committed[1], first_block_accepted))
    return outcomes


def chi_square(observed: list[int], law: list[float]) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom of counts against a law.

    An outcome the law forbids makes the statistic infinite: it must never be observed.
    """
    total = sum(observed)
    statistic, cells = 0.0, 0
    for count, probability in zip(observed, law):
        if probability == 0:
            if count:
                return math.inf, 1
            continue
        expected = total * probability
        assert expected >= 5, "too few trials for a chi-square cell"
        statistic += (count - expected) ** 2 / expected
        cells += 1
    return statistic, cells - 1


def chi_square_p_value(statistic: float, dof: int) -> float:
    """Upper tail of the chi-square law: Q(dof / 2, statistic / 2)."""
    if math.isinf(statistic):
        return 0.0
    return torch.special.gammaincc(
        torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(statistic / 2, dtype=torch.float64)
    ).item()


def first_token_p_value(outcomes, p0: list[float] = P0) -> float:
    counts = Counter(first for first, _, _ in outcomes)
    return chi_square_p_value(*chi_square([counts[t] for t in range(VOCAB)], p0))


def second_token_p_value(outcomes, only_accepted_first_draft: bool, p1: list[list[float]] = P1) -> float:
    """Second token given the first x ~ P1[x], pooled over x (statistics and dofs add up)."""
    by_first: dict[int, Counter[int]] = {}
    for first, second, accepted in outcomes:
        if accepted or not only_accepted_first_draft:
            by_first.setdefault(first, Counter())[second] += 1
    statistic, dof = 0.0, 0
    for first, counts in by_first.items():
        part_statistic, part_dof = chi_square([counts[t] for t in range(VOCAB)], p1[first])
        statistic, dof = statistic + part_statistic, dof + part_dof
    return chi_square_p_value(statistic, dof)


def test_chi_square_p_value_matches_known_quantiles():
    # 95% quantiles of chi-square with 1 and 5 degrees of freedom, 99.9% with 3.
    assert chi_square_p_value(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-6)
    assert chi_square_p_value(11.070497693516351, 5) == pytest.approx(0.05, rel=1e-6)
    assert chi_square_p_value(16.26623619623813, 3) == pytest.approx(1e-3, rel=1e-6)
    assert chi_square([10, 0], [1.0, 0.0]) == (0.0, 0)
    assert chi_square([10, 1], [1.0, 0.0]) == (math.inf, 1)


@pytest.fixture(scope="module")
def match_outcomes():
    return _decode_two_tokens(sample_and_match_rule, _point_mass_drafter, seed=20)


@pytest.fixture(scope="module")
def speculative_outcomes():
    return _decode_two_tokens(speculative_rule, _sampling_drafter, seed=21)


def test_sample_and_match_is_lossless(match_outcomes):
    assert sum(accepted for _, _, accepted in match_outcomes) > TRIALS // 10  # the a >= 1 path ran
    assert first_token_p_value(match_outcomes) > P_VALUE_FLOOR
    assert second_token_p_value(match_outcomes, only_accepted_first_draft=True) > P_VALUE_FLOOR
    assert second_token_p_value(match_outcomes, only_accepted_first_draft=False) > P_VALUE_FLOOR


def test_speculative_sampling_is_lossless(speculative_outcomes):
    assert sum(accepted for _, _, accepted in speculative_outcomes) > TRIALS // 10
    assert first_token_p_value(speculative_outcomes) > P_VALUE_FLOOR
    assert second_token_p_value(speculative_outcomes, only_accepted_first_draft=True) > P_VALUE_FLOOR
    assert second_token_p_value(speculative_outcomes, only_accepted_first_draft=False) > P_VALUE_FLOOR


def test_distribution_checks_catch_a_broken_sample_and_match():
    outcomes = _decode_two_tokens(broken_match_fresh_resample, _point_mass_drafter, seed=20)
    assert first_token_p_value(outcomes) < P_VALUE_FLOOR


@pytest.mark.parametrize("mutation", ["accept with min(1, q/p)", "residual from p"])
def test_distribution_checks_catch_a_broken_first_token(mutation):
    outcomes = _decode_two_tokens(broken_speculative(mutation), _sampling_drafter, seed=21)
    assert first_token_p_value(outcomes) < P_VALUE_FLOOR


def test_distribution_checks_catch_a_broken_later_row():
    # Using row 0's residual at every position leaves the first token right; only the
    # second-token check (on trials where the first draft was accepted) can see it.
    outcomes = _decode_two_tokens(broken_speculative("residual from row 0"), _sampling_drafter, seed=21)
    assert first_token_p_value(outcomes) > P_VALUE_FLOOR
    assert second_token_p_value(outcomes, only_accepted_first_draft=True) < P_VALUE_FLOOR


@pytest.mark.parametrize("seed", range(8))
def test_sample_and_match_row_by_row_equals_the_vectorized_pass(seed):
    """The CPU path (rows drawn up to the first rejection) and the one-pass path (used off the
    CPU) give the same verdict for the same uniforms."""
    generator = torch.Generator().manual_seed(seed)
    vocab, n = 6, int(torch.randint(0, 7, (), generator=generator))
    probs = torch.softmax(3 * torch.randn(n + 1, vocab, generator=generator), dim=-1)
    for _ in range(50):
        uniforms = torch.rand(n + 1, generator=generator, dtype=torch.float64)
        # Drafts that often agree with the most likely token, so long accepted runs occur too.
        drafts = torch.where(torch.rand(n, generator=generator) < 0.7, probs[:n].argmax(-1),
                             torch.randint(vocab, (n,), generator=generator))
        assert _sample_and_match_rows(drafts, probs, uniforms) == _sample_and_match_vectorized(drafts, probs, uniforms)


# Top-k / top-p: the target's law becomes the truncated one (reference truncation of P0 / P1);
# the rules get the rows truncated by truncate_probs, the drafters stay untruncated.
TRUNCATIONS = [(3, 1.0), (0, 0.72), (3, 0.83)]  # top-p away from the tables' exact partial sums


def truncating(rule, top_k: int, top_p: float):
    def truncated_rule(draft, draft_rows, target_rows, generator):
        return rule(draft, draft_rows, truncate_probs(_probs(target_rows), top_k, top_p).tolist(), generator)

    return truncated_rule


@pytest.mark.parametrize("top_k, top_p", TRUNCATIONS)
@pytest.mark.parametrize("rule, drafter, seed", [(sample_and_match_rule, _point_mass_drafter, 22),
                                                 (speculative_rule, _sampling_drafter, 23)])
def test_truncated_target_is_lossless(rule, drafter, seed, top_k, top_p):
    p0, p1 = ref_truncate(P0, top_k, top_p), [ref_truncate(row, top_k, top_p) for row in P1]
    outcomes = _decode_two_tokens(truncating(rule, top_k, top_p), drafter, seed)
    assert sum(accepted for _, _, accepted in outcomes) > TRIALS // 20  # the a >= 1 path ran
    assert all(p0[first] > 0 and p1[first][second] > 0 for first, second, _ in outcomes)  # nothing cut was committed
    assert first_token_p_value(outcomes, p0) > P_VALUE_FLOOR
    assert second_token_p_value(outcomes, True, p1) > P_VALUE_FLOOR
    assert second_token_p_value(outcomes, False, p1) > P_VALUE_FLOOR


def test_distribution_checks_catch_an_untruncated_target(match_outcomes):
    """Verifying against the full p while the law asked for is truncated fails the same check."""
    assert first_token_p_value(match_outcomes, ref_truncate(P0, *TRUNCATIONS[0])) < P_VALUE_FLOOR


def test_token_logprobs_hand_built_and_against_a_slow_reference():
    # Hand-built: two equal logits -> log(1/2); a -inf logit's token -> -inf.
    logits = torch.tensor([[0.0, 0.0, -math.inf], [math.log(3.0), 0.0, 0.0]])
    got = token_logprobs(logits, torch.tensor([1, 0]))
    assert got.tolist() == pytest.approx([math.log(0.5), math.log(3 / 5)])
    assert token_logprobs(logits, torch.tensor([2, 2]))[0] == -math.inf
    # Slow reference: log(exp(l_t) / sum exp(l)) row by row in float64.
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=gen) * 4
    tokens = torch.randint(0, 50, (6,), generator=gen)
    slow = [math.log(math.exp(float(row[t])) / sum(math.exp(float(v)) for v in row)) for row, t in zip(logits.double(), tokens)]
    assert token_logprobs(logits, tokens).tolist() == pytest.approx(slow, abs=1e-5)
    with pytest.raises(ValueError):
        token_logprobs(logits, tokens[:3])
