"""The ragged batch: one target pass over many sessions gives each session its one-at-a-time output."""

from __future__ import annotations

import pytest
import torch

from blockpilot.decoding.batch import BatchDecoder
from blockpilot.decoding.lookup import LookupConfig
from blockpilot.decoding.speculative import SamplingParams
from blockpilot.errors import ResourceExhaustedError
from blockpilot.models.kv_cache import BatchKVCache

LOOKUP = LookupConfig(min_ngram=2, max_ngram=4, max_tokens=6, max_tokens_by_ngram=())


def requests(vocab: int, count: int, *, temperature: float = 0.0):
    """Mixed prompt lengths (some repetitive, so lookup drafts get accepted), lengths and block sizes."""
    generator = torch.Generator().manual_seed(7)
    out = []
    for i in range(count):
        length = 1 + (i * 7) % 23
        prompt = torch.randint(0, vocab, (length,), generator=generator).tolist()
        if i % 3 == 0:
            prompt = (prompt[:4] * 6)[: max(length, 8)]
        params = SamplingParams(temperature=temperature, max_new_tokens=5 + (i * 11) % 37, seed=100 + i)
        out.append((prompt, params, 1 + i % 7))
    return out


def test_batch_cache_rows_have_their_own_lengths():
    cache = BatchKVCache(2, 1, 2, 8, batch_size=3)
    cache.rows_in_use = 2
    cache.set_length(0, 3)
    cache.set_length(1, 1)
    starts = cache.reserve_rows(torch.tensor([2, 1]))
    assert starts.tolist() == [3, 1]
    keys = torch.arange(3 * 1 * 2, dtype=torch.float32).view(3, 1, 2)  # [N, K, D]: 2 tokens of row 0, 1 of row 1
    got_k, _ = cache.write_rows(0, torch.tensor([0, 0, 1]), torch.tensor([3, 4, 1]), keys, -keys, end=5)
    assert got_k.shape == (2, 1, 5, 2)  # rows in use, up to the furthest slot written
    assert torch.equal(cache.keys[0, 0, 0, 3:5], keys[:2, 0])
    assert torch.equal(cache.values[0, 1, 0, 1], -keys[2, 0])
    cache.set_length(0, 5)
    cache.move_row(0, 2)
    assert int(cache.lengths[2]) == 5 and torch.equal(cache.keys[:, 2, :, :5], cache.keys[:, 0, :, :5])
    view = cache.row(1)
    assert view.length == 1 and view.keys.data_ptr() == cache.keys[:, 1:2].data_ptr()
    cache.set_length(0, 7)
    with pytest.raises(ResourceExhaustedError, match="length 7 \\+ 2"):
        cache.reserve_rows(torch.tensor([2, 1]))
    cache.reserve_rows(torch.tensor([1, 2]))  # each row's own room counts


def test_ragged_forward_matches_each_row_alone(tiny_target):
    target = tiny_target
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, target.config.vocab_size, (n,), generator=generator) for n in (5, 1, 12)]
    blocks = torch.randint(0, target.config.vocab_size, (3, 4), generator=generator)
    pool = target.new_batch_cache(32, 4)
    alone = []
    for row, prompt in enumerate(prompts):
        view = pool.row(row)
        target(prompt[None], view, num_logits=1)
        pool.set_length(row, view.length)
        cache = target.new_cache(32)
        target(prompt[None], cache, num_logits=1)
        alone.append(target(blocks[row : row + 1], cache).logits[0])
    pool.rows_in_use = 3
    widths = [4, 1, 3]  # ragged: rows 1 and 2 pass fewer tokens than the padded width
    out = target(blocks, pool, row_widths=widths)
    assert out.logits.shape[:2] == (1, sum(widths))
    assert pool.lengths[:3].tolist() == [9, 2, 15]
    for row, logits in enumerate(out.logits[0].split(widths)):
        torch.testing.assert_close(logits, alone[row][: widths[row]], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="row_widths must give 1..4 tokens"):
        target(blocks, pool, row_widths=[4, 0, 3])


@pytest.mark.parametrize("max_sessions", [1, 3, 16])
def test_greedy_batch_equals_one_at_a_time(tiny_decoder, max_sessions):
    decoder = tiny_decoder
    work = requests(decoder.target.config.vocab_size, 16)
    alone = [decoder.generate(ids, params, block, lookup=LOOKUP).token_ids for ids, params, block in work]
    batch = BatchDecoder(decoder, max_sessions=max_sessions, capacity=128, max_block_size=8)
    results = batch.run(work, lookup=LOOKUP)
    assert [r.token_ids for r in results] == alone
    assert all(len(r.token_ids) == p.max_new_tokens for r, (_, p, _) in zip(results, work))
    assert batch.active == 0 and batch.pool.rows_in_use == 0
    sources = {s for r in results for s in r.step_sources}
    assert {"lookup", "dflash", ""} <= sources  # every kind of step ran inside the batch


def test_sampled_batch_equals_one_at_a_time_with_the_same_seeds(tiny_decoder):
    decoder = tiny_decoder
    work = requests(decoder.target.config.vocab_size, 10, temperature=1.0)
    alone = [decoder.generate(ids, params, block, lookup=LOOKUP).token_ids for ids, params, block in work]
    results = BatchDecoder(decoder, max_sessions=4, capacity=128, max_block_size=8).run(work, lookup=LOOKUP)
    assert [r.token_ids for r in results] == alone


def test_arrivals_and_a_release_mid_batch_leave_the_others_unchanged(tiny_decoder):
    decoder = tiny_decoder
    work = requests(decoder.target.config.vocab_size, 6)
    alone = [decoder.generate(ids, params, block).token_ids for ids, params, block in work]
    batch = BatchDecoder(decoder, max_sessions=8, capacity=128, max_block_size=8)
    sessions = [batch.admit(*work[i])[0] for i in range(3)]
    batch.step()
    batch.step()
    sessions += [batch.admit(*work[i])[0] for i in range(3, 6)]  # arrive while others are mid-decode
    cancelled = sessions[1]
    batch.step()
    batch.release(cancelled)
    assert cancelled not in batch.sessions and cancelled.state.session is None
    while batch.active:
        batch.step()
        assert [s.row for s in batch.sessions] == list(range(batch.active))
    for index, session in enumerate(sessions):
        if session is not cancelled:
            assert session.result.token_ids == alone[index], index
    assert cancelled.result.token_ids == alone[1][: len(cancelled.result.token_ids)]


def test_admission_beyond_the_pool_is_refused(tiny_decoder):
    decoder = tiny_decoder
    batch = BatchDecoder(decoder, max_sessions=1, capacity=40, max_block_size=8)
    with pytest.raises(ResourceExhaustedError, match="exceed the batch's 40 tokens"):
        batch.admit([1] * 20, SamplingParams(max_new_tokens=20), 2)
    batch.admit([1, 2, 3], SamplingParams(max_new_tokens=20), 2)
    with pytest.raises(ResourceExhaustedError, match="the batch is full"):
        batch.admit([4], SamplingParams(max_new_tokens=4), 1)
