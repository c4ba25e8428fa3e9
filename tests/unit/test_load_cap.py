"""Load-aware speculation: the pass-cost fit, the pays-or-not rule by hand, and a batch that caps
drafts keeps every output identical to one-at-a-time decoding."""

from __future__ import annotations

import pytest
import torch

from blockpilot.decoding.batch import BatchDecoder
from blockpilot.decoding.load_cap import DraftRecord, Others, PassCostModel, SpeculationGate, draft_pays
from blockpilot.decoding.lookup import COPY, CORPUS, LookupConfig
from blockpilot.decoding.speculative import GATE_SOURCES, SamplingParams

LOOKUP = LookupConfig(min_ngram=2, max_ngram=4, max_tokens=6, max_tokens_by_ngram=())


def test_the_pass_cost_fit_recovers_fixed_and_per_token_costs():
    model = PassCostModel(window=8)
    assert model.fit() is None
    model.observe(4, 0.052)
    model.observe(4, 0.052)
    assert model.fit() is None  # one size only: the slope is unknown
    for tokens in (1, 8, 16, 32):
        model.observe(tokens, 0.04 + 0.003 * tokens)
    fixed, per_token = model.fit()
    assert fixed == pytest.approx(0.04, abs=1e-3) and per_token == pytest.approx(0.003, abs=1e-4)


def line(fixed: float, per_token: float):
    return lambda tokens: fixed + per_token * tokens


def test_a_draft_pays_alone_but_not_in_a_compute_bound_batch():
    record = DraftRecord()
    assert draft_pays(record, line(0.04, 0.004))  # no evidence yet: try
    record.add(drafted=2, committed=2, draft_seconds=0.0)  # tau 2 over drafts of 2
    record.add(drafted=2, committed=1, draft_seconds=0.0)  # -> tau 1.5: half a token per 2 drafted
    # Alone: a plain step commits 1 token in 0.04 + 0.004 s (23 tok/s); the draft adds 0.5
    # tokens for 0.008 s (62 tok/s): it pays.
    assert draft_pays(record, line(0.04, 0.004))
    # Beside 15 sessions of one token each: the batch makes 16 tokens in 0.104 s (154 tok/s); the
    # same draft still makes 62 tok/s: it does not.
    assert not draft_pays(record, line(0.04, 0.004), Others(15.0, 15))
    # A drafter pass that costs time counts against it: alone, with a 50 ms drafter pass.
    slow = DraftRecord(steps=1, drafted=2, committed=2, draft_seconds=0.05)
    assert not draft_pays(slow, line(0.04, 0.004))


def test_per_session_passes_price_a_draft_by_its_share_of_the_busy_cores():
    # A drafter pass of 8 ms that adds 0.5 tokens; passes of 40 + 4 ms per token.
    record = DraftRecord(steps=4, drafted=4, committed=6, draft_seconds=0.032)
    cost = line(0.04, 0.004)
    # Alone its rate (0.5 / (4 + 8) ms = 42 tok/s) beats a plain step's (1 / 44 ms = 23 tok/s).
    assert draft_pays(record, cost)
    # Beside one other session on 2 cores, each pass has a core: the iteration makes 2 tokens
    # per 44 ms (45 tok/s) and the draft lengthens it by its whole 12 ms: it does not pay.
    assert not draft_pays(record, cost, Others(committed=1.0, tokens=1, sessions=1, pass_seconds=0.044, parallel=2))
    # The same on 4 cores with a faster drafter (1 ms): (0.5 / (4 + 1) ms = 100 tok/s) > 45 tok/s.
    fast = DraftRecord(steps=4, drafted=4, committed=6, draft_seconds=0.004)
    assert draft_pays(fast, cost, Others(committed=1.0, tokens=1, sessions=1, pass_seconds=0.044, parallel=4))
    # Three others on 2 cores: 4 tokens per (3 x 44 + 44) / 2 ms = 45 tok/s; the fast draft's
    # verify rows now delay one core's share by half their time ((48 - 44) / 2 + 1 ms):
    # 0.5 / 3 ms = 167 tok/s: pays. A shared pass (ragged) of 8 tokens makes 8 / 72 ms = 111
    # tok/s, which the same draft (0.5 / (4 + 1) ms = 100 tok/s) does not beat.
    assert draft_pays(fast, cost, Others(3.0, 3, 3, 0.132, 2))
    assert not draft_pays(fast, cost, Others(7.0, 7))


@pytest.mark.parametrize("ragged", [True, False])  # one shared pass per step, or a pass per session
def test_a_load_aware_batch_caps_drafts_and_keeps_the_outputs(tiny_decoder, ragged):
    decoder = tiny_decoder
    vocab = decoder.target.config.vocab_size
    generator = torch.Generator().manual_seed(5)
    work = []
    for i in range(8):
        prompt = torch.randint(0, vocab, (6 + i,), generator=generator).tolist()
        if i % 2 == 0:
            prompt = (prompt[:3] * 8)  # repetitive: lookup drafts get accepted
        work.append((prompt, SamplingParams(max_new_tokens=30), 4))
    alone = [decoder.generate(p, params, b, lookup=LOOKUP).token_ids for p, params, b in work]
    batch = BatchDecoder(decoder, max_sessions=8, capacity=128, max_block_size=8, load_aware=True, ragged=ragged)
    # A compute-bound machine: every verified token costs as much as the whole fixed part.
    batch.gate.costs.pass_seconds = lambda: line(0.001, 0.01)
    results = batch.run(work, lookup=LOOKUP)
    assert [r.token_ids for r in results] == alone
    assert sum(r.capped_steps for r in results) > 0
    # The untrained drafter's drafts never pay there; some lookup copies of repetitive text do.
    assert all(r.accepted_by_source["dflash"] <= 3 for r in results)


def test_the_curve_cost_model_scales_the_exported_shape_by_the_observed_passes():
    # A padded one-token pass costs about what a two-token one does; past that, rows add cost.
    curve = {1: 1.0, 2: 1.1, 3: 1.5, 4: 1.9}
    model = PassCostModel(relative_cost=curve)
    assert model.pass_seconds() is None  # nothing observed yet
    model.observe(1, 0.030)
    model.observe(3, 0.045)
    model.observe(1, 0.031)
    seconds = model.pass_seconds()
    assert seconds(1) == pytest.approx(0.030, rel=0.05)
    assert seconds(2) == pytest.approx(0.033, rel=0.05)
    assert seconds(6) == pytest.approx(0.030 * (1.9 + 2 * 0.4), rel=0.05)  # extended along the last segment
    assert seconds(2.5) == pytest.approx(0.030 * 1.3, rel=0.05)  # a fractional mean draft: between the points
    # The padded curve makes a one-token draft nearly free, which a straight line would not.
    record = DraftRecord(steps=4, drafted=4, committed=6)  # tau 1.5 over one-token drafts
    assert draft_pays(record, seconds)
    assert not draft_pays(record, line(0.015, 0.015))  # unpadded, linear in rows: 2 x the cost


def test_one_stream_with_a_gate_drops_drafts_that_do_not_pay_and_keeps_the_output(tiny_decoder):
    decoder = tiny_decoder
    vocab = decoder.target.config.vocab_size
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, vocab, (6,), generator=generator).tolist() * 4 for _ in range(3)]
    params = SamplingParams(max_new_tokens=40)
    plain = [decoder.generate(p, params, 1).token_ids for p in prompts]

    free = decoder.speed_gate()
    free.costs.pass_seconds = lambda: line(0.03, 0.0)  # verifying more rows costs nothing
    for prompt, expected in zip(prompts, plain):
        assert decoder.generate(prompt, params, 4, lookup=LOOKUP, gate=free).token_ids == expected
        assert decoder.generate(prompt, params, 4, lookup=LOOKUP).capped_steps == 0  # no gate: never capped

    dear = decoder.speed_gate()
    dear.costs.pass_seconds = lambda: line(0.0, 0.03)  # every row costs a whole pass: nothing pays
    results = [decoder.generate(p, params, 4, lookup=LOOKUP, gate=dear) for p in prompts]
    assert [r.token_ids for r in results] == plain
    assert all(r.capped_steps > 0 for r in results)
    # Drafts came back only as probes (every PROBE_EVERY capped steps) once evidence existed.
    drafted = sum(len(r.acceptance_lengths) for r in results) - sum(r.capped_steps for r in results)
    assert drafted < sum(len(r.acceptance_lengths) for r in results) / 2


def test_copies_and_corpus_guesses_are_judged_apart_and_the_output_stays(tiny_decoder):
    """Prompt lookup's two kinds keep records of their own (GATE_SOURCES): corpus guesses that do
    not pay are capped while copies that pay go on, and the reverse; greedy output is unchanged."""
    from blockpilot.decoding.corpus import CorpusNgrams

    decoder = tiny_decoder
    vocab = decoder.target.config.vocab_size
    generator = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, vocab, (6,), generator=generator).tolist() * 4 for _ in range(3)]
    params = SamplingParams(max_new_tokens=40)
    corpus = CorpusNgrams(bigram={t: (t * 7 + 3) % vocab for t in range(vocab)}, trigram={})
    lookup = LookupConfig(min_ngram=1, max_ngram=4, max_tokens=6, max_tokens_by_ngram=(), corpus=corpus, corpus_tokens=(2, 1))
    gate = decoder.speed_gate()
    gate.costs.pass_seconds = lambda: line(0.03, 0.0)  # free rows: every kind drafts while evidence builds
    for prompt in prompts:
        assert decoder.generate(prompt, params, 1, lookup=lookup, gate=gate).token_ids == decoder.generate(prompt, params, 1).token_ids
    assert gate.pooled[COPY].seen > 0 and gate.pooled[CORPUS].seen > 0 and gate.pooled["dflash"].seen == 0

    judged = SpeculationGate(GATE_SOURCES)
    judged.costs.pass_seconds = lambda: line(0.01, 0.01)
    judged.passed(tokens=1, seconds=0.02)
    records = judged.new_records()
    for _ in range(SpeculationGate.EVIDENCE):
        judged.drafted(records, COPY, drafted=3, committed=4, draft_seconds=0.0)  # tau 4: pays
        judged.drafted(records, CORPUS, drafted=1, committed=1, draft_seconds=0.0)  # tau 1: never pays
    assert judged.allowed(records, 0.0, None) == frozenset({"dflash", COPY})
    for _ in range(SpeculationGate.POOLED_MEMORY):
        judged.drafted(records, COPY, drafted=3, committed=1, draft_seconds=0.0)
        judged.drafted(records, CORPUS, drafted=1, committed=2, draft_seconds=0.0)
    assert judged.allowed(records, 0.0, None) == frozenset({"dflash", CORPUS})


def test_a_step_counts_as_capped_only_where_the_request_could_have_drafted(tiny_decoder):
    """capped_steps: a sampled request proposes no corpus guesses, so a gate leaving corpus out caps
    none of its steps; a greedy one with a corpus is capped where its guesses were left out. A gate
    without a record for one of the loop's sources is refused before decoding."""
    from blockpilot.decoding.corpus import CorpusNgrams

    decoder = tiny_decoder
    vocab = decoder.target.config.vocab_size
    prompt = torch.randint(0, vocab, (6,), generator=torch.Generator().manual_seed(5)).tolist() * 3
    corpus = CorpusNgrams(bigram={t: (t * 5 + 1) % vocab for t in range(vocab)}, trigram={})
    lookup = LookupConfig(min_ngram=1, max_ngram=4, max_tokens=6, max_tokens_by_ngram=(), corpus=corpus, corpus_tokens=(2, 1))
    gate = decoder.speed_gate()
    gate.allowed = lambda *args, **kwargs: frozenset({"dflash", COPY})  # corpus guesses left out
    sampled = decoder.generate(prompt, SamplingParams(temperature=1.0, seed=3, max_new_tokens=30), 1, lookup=lookup, gate=gate)
    greedy = decoder.generate(prompt, SamplingParams(max_new_tokens=30), 1, lookup=lookup, gate=gate)
    assert sampled.capped_steps == 0 and greedy.capped_steps > 0
    assert greedy.token_ids == decoder.generate(prompt, SamplingParams(max_new_tokens=30), 1).token_ids
    with pytest.raises(ValueError, match="corpus"):
        decoder.generate(prompt, SamplingParams(max_new_tokens=4), 1, lookup=lookup, gate=SpeculationGate(("dflash", "lookup")))


def test_seeded_sampling_is_gated_only_where_drafts_cannot_change_its_tokens():
    gate = SpeculationGate(("dflash", "lookup"))
    gate.costs.pass_seconds = lambda: line(0.0, 1.0)
    gate.passed(tokens=1, seconds=1.0)
    records = gate.new_records()
    for _ in range(SpeculationGate.EVIDENCE):
        gate.drafted(records, "dflash", drafted=3, committed=1, draft_seconds=0.0)
    assert gate.allowed(records, 1.0, 123, draft_sampling="sample") is None  # the p/q rule: tokens depend on drafts
    assert gate.allowed(records, 1.0, 123) == frozenset({"lookup"})  # sample-and-match: uniforms by position
    assert gate.allowed(records, 0.0, None) == frozenset({"lookup"})  # lookup: no evidence yet, tried


def test_the_gate_judges_a_new_session_by_every_session_and_probes_a_capped_source():
    gate = SpeculationGate(("dflash", "lookup"))
    gate.costs.pass_seconds = lambda: line(0.01, 0.01)
    gate.passed(tokens=1, seconds=0.02)
    veteran = gate.new_records()
    for _ in range(SpeculationGate.EVIDENCE):
        gate.drafted(veteran, "lookup", drafted=4, committed=5, draft_seconds=0.0)  # tau 5 for 4 rows: pays
        gate.drafted(veteran, "dflash", drafted=4, committed=1, draft_seconds=0.0)  # tau 1: never pays
    assert gate.allowed(veteran, 0.0, None) == frozenset({"lookup"})
    newcomer = gate.new_records()  # no steps of its own: judged by the pooled records
    assert gate.allowed(newcomer, 0.0, None) == frozenset({"lookup"})
    for _ in range(SpeculationGate.PROBE_EVERY - 1):
        assert "dflash" not in gate.allowed(newcomer, 0.0, None)
    assert "dflash" in gate.allowed(newcomer, 0.0, None)  # the probe: tried again after PROBE_EVERY capped steps


def test_a_few_failed_drafts_do_not_cap_a_source():
    gate = SpeculationGate(("dflash", "lookup"))
    gate.costs.pass_seconds = lambda: line(0.03, 0.0)
    gate.passed(tokens=2, seconds=0.03)
    records = gate.new_records()
    for _ in range(SpeculationGate.EVIDENCE - 1):
        gate.drafted(records, "lookup", drafted=1, committed=1, draft_seconds=0.001)  # every copy rejected
    assert gate.allowed(records, 0.0, None) == frozenset({"dflash", "lookup"})
    gate.drafted(records, "lookup", drafted=1, committed=1, draft_seconds=0.001)
    assert gate.allowed(records, 0.0, None) == frozenset({"dflash"})  # now judged: tau 1 never pays


def test_a_drafter_source_is_not_probed_beside_other_sessions():
    gate = SpeculationGate(("dflash", "lookup"))
    gate.costs.pass_seconds = lambda: line(0.01, 0.01)
    gate.passed(tokens=1, seconds=0.02)
    records = gate.new_records()
    for _ in range(SpeculationGate.EVIDENCE):
        gate.drafted(records, "lookup", drafted=4, committed=1, draft_seconds=0.0)  # tau 1: never pays
        gate.drafted(records, "dflash", drafted=4, committed=1, draft_seconds=0.0)
    busy = Others(committed=7.0, tokens=7)  # a shared pass with 7 other sessions
    for _ in range(3 * SpeculationGate.PROBE_EVERY):
        sources = gate.allowed(records, 0.0, None, busy)
        assert "dflash" not in sources  # every session would wait for its drafter pass
    probes = 0
    for _ in range(3 * SpeculationGate.PROBE_EVERY):
        probes += "lookup" in gate.allowed(records, 0.0, None, busy)  # extra rows only: still probed
    assert probes >= 2
    assert any("dflash" in gate.allowed(records, 0.0, None) for _ in range(SpeculationGate.PROBE_EVERY + 1))  # alone: probed


@pytest.mark.parametrize("curve", [{1: 1.0, 2: 1.2, 3: 1.45, 4: 1.75}, None])
def test_sizes_seen_often_are_priced_by_their_own_passes(curve):
    """Once OWN_MEDIAN_AFTER passes of one size were seen, their median is that size's cost, not
    the exported curve's (or the line's) estimate; other sizes keep the model's; a fractional
    size interpolates between its neighbours. The case measured on a Zen 3: the curve priced a
    2-token pass at 1.20 x a 1-token one, the real passes at 1.06 x."""
    model = PassCostModel(relative_cost=curve)
    enough = PassCostModel.OWN_MEDIAN_AFTER
    for _ in range(enough - 1):
        model.observe(1, 0.0246)
        model.observe(2, 0.0261)
        model.observe(4, 0.0424)
    before = model.pass_seconds()
    assert before(2) / before(1) > 1.1  # too few passes of each size: the model's shape
    model.observe(1, 0.0246)
    model.observe(2, 0.0261)
    seconds = model.pass_seconds()
    assert seconds(1) == pytest.approx(0.0246) and seconds(2) == pytest.approx(0.0261)
    assert seconds(1.5) == pytest.approx((0.0246 + 0.0261) / 2)
    assert seconds(3) == pytest.approx(before(3), rel=0.15)  # never seen: the model's estimate
    assert seconds(2.5) == pytest.approx((0.0261 + seconds(3)) / 2)
    # The decision that changed: a one-token DFlash draft at tau 1.41 with a 5.8 ms drafter pass.
    dflash = DraftRecord(steps=20, drafted=22, committed=28.2, draft_seconds=20 * 0.0058)
    assert draft_pays(dflash, seconds)
    if curve is not None:
        assert not draft_pays(dflash, before)


def test_a_probe_stays_due_until_the_source_drafts_and_old_failures_fade():
    """A DFlash probe that a lookup copy wins is not used up; and a source capped on a bad start
    comes back once its probes keep paying (the pooled record forgets)."""
    gate = SpeculationGate(("dflash", "lookup"))
    gate.costs.pass_seconds = lambda: line(0.02, 0.002)
    gate.passed(tokens=2, seconds=0.024)
    records = gate.new_records()
    for _ in range(SpeculationGate.EVIDENCE):
        gate.drafted(records, "dflash", drafted=1, committed=1, draft_seconds=0.006)  # a bad start: tau 1
        gate.drafted(records, "lookup", drafted=3, committed=4, draft_seconds=0.0)
    for _ in range(SpeculationGate.PROBE_EVERY):
        assert "dflash" not in gate.allowed(records, 0.0, None)
    assert "dflash" in gate.allowed(records, 0.0, None)  # the probe is due...
    gate.drafted(records, "lookup", drafted=3, committed=4, draft_seconds=0.0)  # ...but a copy won the step
    assert "dflash" in gate.allowed(records, 0.0, None)  # still due
    gate.drafted(records, "dflash", drafted=1, committed=2, draft_seconds=0.006)
    assert "dflash" not in gate.allowed(records, 0.0, None)  # the probe is used up
    # New requests whose probes all commit both tokens (tau 2: a 6 ms drafter pass pays): the
    # source comes back for good, not only as a probe every PROBE_EVERY steps.
    allowed_in_a_row = 0
    for step in range(400):
        if step % 50 == 0:
            records = gate.new_records()
        if "dflash" in gate.allowed(records, 0.0, None):
            gate.drafted(records, "dflash", drafted=1, committed=2, draft_seconds=0.006)
            allowed_in_a_row += 1
        else:
            allowed_in_a_row = 0
    assert allowed_in_a_row > 50
