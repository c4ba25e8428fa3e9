"""Load-aware speculation: the pass-cost fit, the pays-or-not rule by hand, and a batch that caps
drafts keeps every output identical to one-at-a-time decoding."""

from __future__ import annotations

import pytest
import torch

from blockpilot.decoding.batch import BatchDecoder
from blockpilot.decoding.load_cap import DraftRecord, PassCostModel, draft_pays
from blockpilot.decoding.lookup import LookupConfig
from blockpilot.decoding.speculative import SamplingParams

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


def test_a_draft_pays_alone_but_not_in_a_compute_bound_batch():
    record = DraftRecord()
    assert draft_pays(record, (0.04, 0.004), 1.0, 1)  # no evidence yet: try
    record.add(drafted=2, committed=2, draft_seconds=0.0)  # tau 2 over drafts of 2
    record.add(drafted=2, committed=1, draft_seconds=0.0)  # -> tau 1.5: half a token per 2 drafted
    # Alone: the step commits 1.5 tokens in 0.04 + 3 * 0.004 s (29 tok/s); the draft adds 0.5
    # tokens for 0.008 s (62 tok/s): it pays.
    assert draft_pays(record, (0.04, 0.004), 1.5, 3)
    # 16 sessions of one token each: the batch makes 16 tokens in 0.104 s (154 tok/s); the same
    # draft still makes 62 tok/s: it does not.
    assert not draft_pays(record, (0.04, 0.004), 16.0, 16)
    # A drafter pass that costs time counts against it: alone, with a 50 ms drafter pass.
    slow = DraftRecord(steps=1, drafted=2, committed=2, draft_seconds=0.05)
    assert not draft_pays(slow, (0.04, 0.004), 1.0, 1)


def test_a_load_aware_batch_caps_drafts_and_keeps_the_outputs(tiny_decoder):
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
    batch = BatchDecoder(decoder, max_sessions=8, capacity=128, max_block_size=8, load_aware=True)
    # A compute-bound machine: every verified token costs as much as the whole fixed part.
    batch.costs.fit = lambda: (0.001, 0.01)
    results = batch.run(work, lookup=LOOKUP)
    assert [r.token_ids for r in results] == alone
    assert sum(r.capped_steps for r in results) > 0
    # The untrained drafter's drafts never pay there; some lookup copies of repetitive text do.
    assert all(r.accepted_by_source["dflash"] <= 3 for r in results)
