"""The speculative loop on tiny random models: lossless at T=0, lossless in distribution at T>0."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from blockpilot.decoding import acceptance
from blockpilot.decoding.drafting import LocalDrafter
from blockpilot.decoding.lookup import LookupConfig, PromptLookupIndex
from blockpilot.decoding.speculative import PrefillInfo, SamplingParams, SpeculativeDecoder
from blockpilot.errors import InvalidArgumentError, ResourceExhaustedError
from blockpilot.models.drafter import DFlashDrafter
from blockpilot.models.target import TargetModel
from fake_drafters import OracleDrafter
from tiny_models import build_tiny_hf_model, save_tiny_hf_model

PROMPTS = [[5, 6, 7, 8], [11], [40, 3, 3, 3, 3, 90, 17, 17, 60, 2, 44, 31]]


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    return TargetModel.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def random_drafter(target):
    return LocalDrafter(DFlashDrafter.random(target.config, num_hidden_layers=2, block_size=8, seed=0), target)


def autoregressive(target, prompt, max_new_tokens, stop=()):
    return SpeculativeDecoder(target).generate(prompt, SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=stop), 1)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("max_new_tokens", [1, 7, 45])
def test_greedy_random_drafter_equals_autoregressive(target, random_drafter, prompt, max_new_tokens):
    reference = autoregressive(target, prompt, max_new_tokens)
    decoder = SpeculativeDecoder(target, random_drafter)
    for block_size in range(2, 21):
        result = decoder.generate(prompt, SamplingParams(max_new_tokens=max_new_tokens), block_size)
        assert result.token_ids == reference.token_ids, block_size
        assert len(result.token_ids) == max_new_tokens
        assert result.finish_reason == "length"
        assert sum(result.acceptance_lengths) == max_new_tokens - 1


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_mostly_right_drafter_equals_autoregressive(target, prompt):
    max_new_tokens = 60
    reference = autoregressive(target, prompt, max_new_tokens)
    full = list(prompt) + reference.token_ids
    for block_size in range(2, 21):
        for accuracy in (0.8, 1.0):
            drafter = OracleDrafter(full, target.config.vocab_size, accuracy, seed=block_size)
            result = SpeculativeDecoder(target, drafter).generate(prompt, SamplingParams(max_new_tokens=max_new_tokens), block_size)
            assert result.token_ids == reference.token_ids, (block_size, accuracy)
            assert drafter.closed_sessions == 1
            if accuracy == 1.0:
                # Every block fully accepted plus the bonus token (but the last, cut by max_new_tokens).
                assert result.acceptance_lengths[:-1] == [block_size] * (len(result.acceptance_lengths) - 1)
            elif block_size >= 4:
                assert max(result.acceptance_lengths) >= 4  # long accepted runs happen
                assert result.tau > 1.5


def test_stop_token_ends_generation_like_autoregressive(target):
    prompt = PROMPTS[2]
    free = autoregressive(target, prompt, 40)
    stop = free.token_ids[17]  # a token the model will produce: stop at its first occurrence
    reference = autoregressive(target, prompt, 40, stop=(stop,))
    first = free.token_ids.index(stop)
    assert reference.token_ids == free.token_ids[: first + 1] and reference.finish_reason == "stop"
    full = list(prompt) + free.token_ids
    for block_size in (2, 5, 8, 16):
        drafter = OracleDrafter(full, target.config.vocab_size, 0.9, seed=block_size)
        result = SpeculativeDecoder(target, drafter).generate(
            prompt, SamplingParams(max_new_tokens=40, stop_token_ids=(stop,)), block_size
        )
        assert result.token_ids == reference.token_ids
        assert result.finish_reason == "stop"


def test_block_size_hook_sees_prefill_features_once(target, random_drafter):
    calls: list[PrefillInfo] = []

    def choose(info: PrefillInfo) -> int:
        calls.append(info)
        return 5

    result = SpeculativeDecoder(target, random_drafter).generate(PROMPTS[0], SamplingParams(max_new_tokens=12), choose)
    assert len(calls) == 1 and result.block_size == 5
    info = calls[0]
    assert info.prompt_len == len(PROMPTS[0])
    assert info.last_logits.shape == (target.config.vocab_size,)
    assert info.last_hidden.shape == (len(random_drafter.target_layer_ids) * target.config.hidden_size,)
    assert result.token_ids[0] == int(info.last_logits.argmax())


def test_closing_the_stream_early_frees_the_draft_session(target):
    reference = autoregressive(target, PROMPTS[0], 30)
    drafter = OracleDrafter(list(PROMPTS[0]) + reference.token_ids, target.config.vocab_size, 0.9)
    stream = SpeculativeDecoder(target, drafter).stream(PROMPTS[0], SamplingParams(max_new_tokens=30), 4)
    next(stream), next(stream)
    stream.close()
    assert drafter.closed_sessions == 1


@pytest.mark.parametrize(
    "prompt, params, block_size, error",
    [
        ([], SamplingParams(), 1, InvalidArgumentError),
        ([5, -1], SamplingParams(), 1, InvalidArgumentError),
        ([5, 97], SamplingParams(), 1, InvalidArgumentError),
        ([5], SamplingParams(max_new_tokens=0), 1, InvalidArgumentError),
        ([5], SamplingParams(temperature=-0.5), 1, InvalidArgumentError),
        ([5], SamplingParams(temperature=float("nan")), 1, InvalidArgumentError),
        ([5], SamplingParams(temperature=float("inf")), 1, InvalidArgumentError),
        ([5], SamplingParams(stop_token_ids=(1000,)), 1, InvalidArgumentError),
        ([5], SamplingParams(temperature=1.0, top_k=-1), 1, InvalidArgumentError),
        ([5], SamplingParams(temperature=1.0, top_p=0.0), 1, InvalidArgumentError),
        ([5], SamplingParams(temperature=1.0, top_p=1.5), 1, InvalidArgumentError),
        ([5], SamplingParams(), 0, InvalidArgumentError),
        ([5], SamplingParams(), 65, InvalidArgumentError),
        ([5], SamplingParams(max_new_tokens=600), 1, ResourceExhaustedError),
    ],
)
def test_bad_requests_raise_typed_errors(target, random_drafter, prompt, params, block_size, error):
    with pytest.raises(error):
        SpeculativeDecoder(target, random_drafter).generate(prompt, params, block_size)


def test_block_size_above_one_without_drafter_is_refused(target):
    with pytest.raises(InvalidArgumentError, match="needs a drafter"):
        SpeculativeDecoder(target).generate([5], SamplingParams(), 4)


# ---- T > 0: every committed token is a sample of the target's distribution -------------------


@pytest.fixture(scope="module")
def small_vocab_target(tmp_path_factory):
    hf = build_tiny_hf_model("llama", seed=5, vocab_size=5, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    return TargetModel.from_pretrained(save_tiny_hf_model(hf, tmp_path_factory.mktemp("v5")))


def exact_joint(target, prompt, length, temperature, top_k=0, top_p=1.0):
    """P(first `length` generated tokens) by enumerating every sequence with the target itself.
    With top_k / top_p each step's law is truncated by acceptance.truncate_probs (checked against a
    slow reference in test_acceptance.py; here the loop is under test)."""
    vocab = target.config.vocab_size
    probs = {}
    with torch.inference_mode():
        for seq in itertools.product(range(vocab), repeat=length):
            tokens = torch.tensor([list(prompt) + list(seq[:-1])])
            logits = target(tokens, target.new_cache(16)).logits[0, len(prompt) - 1 :]
            step = acceptance.truncate_probs(torch.softmax(logits.double() / temperature, dim=-1), top_k, top_p)
            probs[seq] = math.prod(step[i, token].item() for i, token in enumerate(seq))
    return probs


def chi_square_p_value(counts: dict, expected_probs: dict, trials: int) -> float:
    from scipy.stats import chisquare

    # A sequence the law forbids (cut by top-k / top-p) must never occur; it has no cell.
    assert all(expected_probs.get(c, 0) > 0 for c in counts), "a forbidden sequence was generated"
    cells = sorted(c for c, p in expected_probs.items() if p > 0)
    observed = [counts.get(c, 0) for c in cells]
    expected = [expected_probs[c] * trials for c in cells]
    return float(chisquare(observed, expected).pvalue)


@pytest.mark.parametrize("draft_sampling", ["greedy", "sample"])
def test_temperature_sampling_is_lossless_in_distribution(small_vocab_target, draft_sampling):
    target = small_vocab_target
    prompt, length, temperature, trials = [1, 3], 3, 1.3, 3000
    exact = exact_joint(target, prompt, length, temperature)
    # An oracle that follows one fixed continuation: right on that path, wrong elsewhere, so
    # acceptances, rejections and bonus tokens all occur.
    greedy = autoregressive(target, prompt, length).token_ids
    drafter = OracleDrafter(list(prompt) + greedy, target.config.vocab_size, 0.7, seed=1)
    decoder = SpeculativeDecoder(target, drafter)
    counts: dict[tuple[int, ...], int] = {}
    accepted_some = 0
    for seed in range(trials):
        result = decoder.generate(
            prompt, SamplingParams(temperature=temperature, max_new_tokens=length, seed=seed, draft_sampling=draft_sampling), 3
        )
        key = tuple(result.token_ids)
        counts[key] = counts.get(key, 0) + 1
        accepted_some += max(result.acceptance_lengths) > 1
    assert accepted_some > trials // 10  # the drafts were actually used
    assert chi_square_p_value(counts, exact, trials) > 1e-3


def test_distribution_test_detects_a_biased_sampler(small_vocab_target):
    """The same test fails for a sampler that is not the target's distribution (T=1.3 vs 1.0)."""
    target = small_vocab_target
    prompt, length, trials = [1, 3], 3, 3000
    exact = exact_joint(target, prompt, length, 1.3)
    decoder = SpeculativeDecoder(target)
    counts: dict[tuple[int, ...], int] = {}
    for seed in range(trials):
        key = tuple(decoder.generate(prompt, SamplingParams(temperature=0.8, max_new_tokens=length, seed=seed), 1).token_ids)
        counts[key] = counts.get(key, 0) + 1
    assert chi_square_p_value(counts, exact, trials) < 1e-3


@pytest.mark.parametrize("draft_sampling", ["greedy", "sample"])
def test_truncated_sampling_with_lookup_is_lossless_in_distribution(small_vocab_target, draft_sampling):
    """Top-k / top-p: DFlash drafts (q untruncated) and lookup drafts (one-hot) verified against the
    truncated p; the output law is the truncated target's."""
    target = small_vocab_target
    prompt, length, temperature, top_k, top_p, trials = [1, 3, 1, 3], 4, 1.3, 4, 0.85, 3000
    exact = exact_joint(target, prompt, length, temperature, top_k, top_p)
    assert sum(p == 0 for p in exact.values()) > len(exact) // 4  # the truncation cut many sequences
    greedy = autoregressive(target, prompt, length).token_ids
    decoder = SpeculativeDecoder(target, OracleDrafter(list(prompt) + greedy, target.config.vocab_size, 0.7, seed=1))
    lookup = LookupConfig(min_ngram=1, max_ngram=2, max_tokens=3)
    counts: dict[tuple[int, ...], int] = {}
    accepted = {"dflash": 0, "lookup": 0}
    for seed in range(trials):
        result = decoder.generate(prompt, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=length,
                                                         seed=seed, draft_sampling=draft_sampling), 3, lookup=lookup)
        key = tuple(result.token_ids)
        counts[key] = counts.get(key, 0) + 1
        for source in accepted:
            accepted[source] += result.accepted_by_source[source] > 0
    assert min(accepted.values()) > trials // 20  # both draft sources had drafts accepted
    assert chi_square_p_value(counts, exact, trials) > 1e-3


def test_top_k_1_is_greedy_at_every_block_size(target, random_drafter):
    """Top-k 1 leaves the argmax alone (ties: the lowest id, as greedy), so sampling is greedy."""
    reference = autoregressive(target, PROMPTS[2], 30).token_ids
    decoder = SpeculativeDecoder(target, random_drafter)
    for block_size, draft_sampling in itertools.product((1, 2, 5, 8), ("greedy", "sample")):
        params = SamplingParams(temperature=1.5, top_k=1, top_p=0.9, max_new_tokens=30, seed=block_size,
                                draft_sampling=draft_sampling)
        assert decoder.generate(PROMPTS[2], params, block_size).token_ids == reference, (block_size, draft_sampling)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (20, 1.0), (0, 0.8), (20, 0.9)])
def test_block_size_1_with_a_seed_is_the_plain_truncated_sampler(target, top_k, top_p):
    """The loop at block size 1 draws exactly what a plain sampler does: no cache, token t by
    inverse CDF of the truncated p with the request's uniform of output position t."""
    prompt, length, temperature, seed = PROMPTS[0], 25, 1.2, 11
    uniforms = acceptance.PositionalUniforms(seed)
    tokens: list[int] = []
    with torch.inference_mode():
        for position in range(length):
            ids = torch.tensor([list(prompt) + tokens])
            logits = target(ids, target.new_cache(ids.shape[1] + 1)).logits[0, -1]
            probs = acceptance.probs_from_logits(logits, temperature, top_k=top_k, top_p=top_p)
            tokens.append(int(acceptance.sample_categorical(probs, uniforms.at(position, 1)[0])))
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=length, seed=seed)
    assert SpeculativeDecoder(target).generate(prompt, params, 1).token_ids == tokens


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (20, 0.9)])
def test_a_seed_gives_the_same_tokens_from_every_draft_source_when_sampled_and_matched(target, random_drafter, top_k, top_p):
    """Sample-and-match reads the uniforms of the output positions its tokens land on, so a seeded
    request commits the plain sampler's tokens whatever was drafted: every block size, drafter,
    prompt lookup, corpus n-grams, and drafts dropped by the speed gate."""
    prompt, length = REPETITIVE_PROMPTS[2], 40
    params = SamplingParams(temperature=1.1, top_k=top_k, top_p=top_p, max_new_tokens=length, seed=29)
    reference = SpeculativeDecoder(target).generate(prompt, params, 1).token_ids
    oracle = OracleDrafter(list(prompt) + reference, target.config.vocab_size, 0.8, seed=3)
    lookup = corpus_lookup(target, [[5, 6, 7, 9], [12]])
    accepted = 0
    for drafter, block_size, lookup_config in ((random_drafter, 4, LookupConfig(enabled=False)), (oracle, 8, LookupConfig(enabled=False)),
                                               (oracle, 6, LOOKUP_CONFIGS[1]), (None, 1, lookup), (oracle, 5, lookup)):
        result = SpeculativeDecoder(target, drafter).generate(prompt, params, block_size, lookup=lookup_config)
        assert result.token_ids == reference, (drafter, block_size)
        accepted += sum(result.accepted_by_source.values())
    assert accepted > length  # drafts were accepted, not only rejected
    # The p/q rule reads other uniforms: its tokens are a sample of the same law, not the same sample.
    sampled = SpeculativeDecoder(target, oracle).generate(prompt, dataclasses.replace(params, draft_sampling="sample"), 8)
    assert len(sampled.token_ids) == length


def test_positional_uniforms_are_addressed_by_position_and_stream():
    uniforms = acceptance.PositionalUniforms(5)
    whole = uniforms.at(0, 200)
    assert torch.equal(torch.cat([uniforms.at(0, 70), uniforms.at(70, 1), uniforms.at(71, 129)]), whole)
    assert torch.equal(acceptance.PositionalUniforms(5).at(130, 3), whole[130:133])  # no draws before needed
    assert not torch.equal(uniforms.at(0, 8, acceptance.PositionalUniforms.ACCEPT), whole[:8])
    assert not torch.equal(acceptance.PositionalUniforms(6).at(0, 8), whole[:8])
    assert uniforms.at(10, 0).shape == (0,) and ((whole >= 0) & (whole < 1)).all()
    with pytest.raises(ValueError, match="-1"):
        uniforms.at(-1, 2)


def test_seeded_sampling_is_reproducible(target, random_drafter):
    params = SamplingParams(temperature=1.0, max_new_tokens=20, seed=7)
    decoder = SpeculativeDecoder(target, random_drafter)
    assert decoder.generate(PROMPTS[0], params, 4).token_ids == decoder.generate(PROMPTS[0], params, 4).token_ids


# ---- prompt lookup: another draft source through the same loop -------------------------------

REPETITIVE_PROMPTS = [[9, 8, 7, 6, 9, 8, 7, 6, 9, 8], [3, 3, 3, 3, 3, 3], [40, 3, 3, 3, 3, 90, 17, 17, 60, 2, 44, 31, 90, 17]]
LOOKUP_CONFIGS = [LookupConfig(), LookupConfig(min_ngram=1, max_ngram=3, max_tokens=12)]


@pytest.mark.parametrize("prompt", PROMPTS + REPETITIVE_PROMPTS)
@pytest.mark.parametrize("lookup", LOOKUP_CONFIGS)
def test_greedy_with_lookup_equals_autoregressive(target, random_drafter, prompt, lookup):
    max_new_tokens = 50
    reference = autoregressive(target, prompt, max_new_tokens)
    full = list(prompt) + reference.token_ids
    oracle = OracleDrafter(full, target.config.vocab_size, 0.8, seed=3)
    sources_seen = set()
    for drafter in (random_drafter, oracle, None):
        decoder = SpeculativeDecoder(target, drafter)
        for block_size in range(1, 17) if drafter is not None else (1,):
            result = decoder.generate(prompt, SamplingParams(max_new_tokens=max_new_tokens), block_size, lookup=lookup)
            assert result.token_ids == reference.token_ids, (drafter, block_size)
            assert sum(result.acceptance_lengths) == max_new_tokens - 1
            assert len(result.step_sources) == len(result.acceptance_lengths) == len(result.verify_sizes)
            # Accepted drafts + one target token per step = the tokens the steps committed.
            assert sum(result.accepted_by_source.values()) + len(result.acceptance_lengths) == max_new_tokens - 1
            if drafter is None or block_size == 1:
                assert "dflash" not in result.step_sources and result.drafter_passes_skipped == 0
            else:
                assert result.drafter_passes_skipped == result.step_sources.count("lookup") or \
                    result.verify_sizes[-1] < block_size  # the last step may have no room for a DFlash draft
            sources_seen.update(result.step_sources)
    assert "lookup" in sources_seen  # tiny random models repeat themselves: copies were verified


def test_lookup_off_never_copies(target, random_drafter):
    prompt = REPETITIVE_PROMPTS[0]
    result = SpeculativeDecoder(target, random_drafter).generate(prompt, SamplingParams(max_new_tokens=40), 4)
    assert "lookup" not in result.step_sources and result.accepted_by_source["lookup"] == 0


def test_lookup_copies_a_repeated_continuation_in_long_steps(target):
    """A continuation that repeats itself is copied: far fewer steps than tokens."""
    prompt = REPETITIVE_PROMPTS[0]
    reference = autoregressive(target, prompt, 80)
    full = list(prompt) + reference.token_ids
    result = SpeculativeDecoder(target).generate(prompt, SamplingParams(max_new_tokens=80), 1,
                                                 lookup=LookupConfig(min_ngram=1, max_ngram=4, max_tokens=10))
    assert result.token_ids == reference.token_ids
    # How many steps a perfect copier needs is a property of the continuation; the loop must copy
    # at least whenever its last 4 tokens already occurred with the same next token.
    repeats = sum(1 for i in range(len(prompt) + 4, len(full)) if full[i - 4 : i] in
                  [full[j - 4 : j] for j in range(4, i)])
    if repeats > 20:
        assert result.tau > 1.3


def test_drafter_gets_every_committed_token_after_lookup_steps(target):
    """Steps that copy make no drafter call; the next drafter call sends the context they committed
    (OracleSession asserts that context arrives in order with no gap)."""
    prompt = REPETITIVE_PROMPTS[2]
    reference = autoregressive(target, prompt, 60)
    drafter = OracleDrafter(list(prompt) + reference.token_ids, target.config.vocab_size, 0.5, seed=0)
    result = SpeculativeDecoder(target, drafter).generate(prompt, SamplingParams(max_new_tokens=60), 4,
                                                          lookup=LookupConfig(min_ngram=1, max_ngram=2))
    assert result.token_ids == reference.token_ids
    assert {"lookup", "dflash"} <= set(result.step_sources)
    requests = drafter.sessions[0].requests
    assert sum(r.num_draft > 0 for r in requests) == result.step_sources.count("dflash")


@pytest.mark.parametrize("draft_sampling", ["greedy", "sample"])
def test_temperature_sampling_with_lookup_is_lossless_in_distribution(small_vocab_target, draft_sampling):
    """Lookup drafts are deterministic proposals (one-hot q) accepted by sample-and-match; mixed
    with DFlash drafts (both acceptance rules) the output law is still the target's."""
    target = small_vocab_target
    prompt, length, temperature, trials = [1, 3, 1, 3], 4, 1.3, 3000
    exact = exact_joint(target, prompt, length, temperature)
    greedy = autoregressive(target, prompt, length).token_ids
    drafter = OracleDrafter(list(prompt) + greedy, target.config.vocab_size, 0.7, seed=1)
    decoder = SpeculativeDecoder(target, drafter)
    lookup = LookupConfig(min_ngram=1, max_ngram=2, max_tokens=3)
    counts: dict[tuple[int, ...], int] = {}
    copied = lookup_steps = 0
    for seed in range(trials):
        result = decoder.generate(prompt, SamplingParams(temperature=temperature, max_new_tokens=length, seed=seed,
                                                         draft_sampling=draft_sampling), 3, lookup=lookup)
        key = tuple(result.token_ids)
        counts[key] = counts.get(key, 0) + 1
        copied += result.accepted_by_source["lookup"] > 0
        lookup_steps += "lookup" in result.step_sources
    # Lookup drafts were verified in most requests, accepted in some (and rejected in others).
    assert lookup_steps > trials // 5 and copied > trials // 20
    assert chi_square_p_value(counts, exact, trials) > 1e-3


def corpus_lookup(target, prompts, length=40):
    """Lookup with corpus n-grams counted over the target's own greedy replies to `prompts`."""
    from blockpilot.decoding.corpus import CorpusNgrams

    corpus = CorpusNgrams.count([list(p[-2:]) + autoregressive(target, p, length).token_ids for p in prompts], min_count=1)
    return LookupConfig(min_ngram=1, max_ngram=3, max_tokens=6, corpus=corpus, corpus_tokens=(3, 2))


def test_greedy_with_corpus_ngrams_equals_autoregressive(target, random_drafter):
    """Corpus continuations are drafts like copies: the output is the target's own at every block
    size, and (counted over the target's own replies) they are proposed and accepted."""
    lookup = corpus_lookup(target, [[5, 6, 7, 9], [12], [40, 3, 3, 90, 17]])
    accepted = 0
    for prompt in PROMPTS + REPETITIVE_PROMPTS[:1]:
        reference = autoregressive(target, prompt, 40).token_ids
        for drafter, block_size in ((None, 1), (random_drafter, 4), (random_drafter, 8)):
            result = SpeculativeDecoder(target, drafter).generate(prompt, SamplingParams(max_new_tokens=40), block_size, lookup=lookup)
            assert result.token_ids == reference, (prompt, block_size)
            accepted += result.accepted_by_source["lookup"]
    assert accepted > 0


def test_corpus_ngrams_are_proposed_at_temperature_0_only(target):
    """Sampled, a corpus guess is accepted with the target's probability of it only (they did not
    pay at T = 1): a sampled request's lookup copies from its own text alone."""
    lookup = corpus_lookup(target, [[5, 6, 7, 9], [12]])
    decoder = SpeculativeDecoder(target)
    for temperature, corpus in ((0.0, lookup.corpus), (0.9, None)):
        state, _ = decoder.prefill(PROMPTS[1], SamplingParams(temperature=temperature, max_new_tokens=8, seed=1),
                                   target.new_cache(32), lookup=lookup)
        decoder.start(state, 1)
        decoder.open_drafting(state)
        assert state.index.config.corpus is corpus


# ---- logprobs of the committed tokens -----------------------------------------------------------

def transformers_logprobs(model_dir, prompt, tokens) -> list[float]:
    """Reference: log_softmax of transformers' own logits over prompt + tokens, at each token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(tokens)])).logits[0].float()
    rows = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)], dim=-1)
    return rows.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_are_the_targets_raw_ones_at_every_block_size_and_source(tiny_llama_dir, target, random_drafter, temperature):
    prompt, max_new_tokens = REPETITIVE_PROMPTS[2], 30
    full_reference = None
    decoder = SpeculativeDecoder(target, random_drafter)
    for block_size, lookup in ((1, LookupConfig(enabled=False)), (4, LookupConfig(enabled=False)), (8, LOOKUP_CONFIGS[1])):
        params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=5, logprobs=True)
        result = decoder.generate(prompt, params, block_size, lookup=lookup)
        events = list(decoder.stream(prompt, params, block_size, lookup=lookup))
        assert [lp for e in events for lp in e.logprobs] == pytest.approx(result.logprobs, abs=1e-6)
        assert all(len(e.logprobs) == len(e.token_ids) for e in events)
        assert len(result.logprobs) == len(result.token_ids) and all(lp <= 0 for lp in result.logprobs)
        # Raw log-probabilities (temperature 1, untruncated) of exactly the committed tokens.
        expected = transformers_logprobs(tiny_llama_dir, prompt, result.token_ids)
        assert result.logprobs == pytest.approx(expected, abs=1e-4), block_size
        if temperature == 0:
            full_reference = full_reference or result.token_ids
            assert result.token_ids == full_reference
    assert decoder.generate(prompt, SamplingParams(max_new_tokens=5), 4).logprobs == []  # not asked: none
