"""The verifier's decode scheduler: requests arriving at any time, with chunked prefills, their own
block sizes and draft sources, reused session caches, cancellation and failures, give each the
output it gets alone; what a request held is freed when it ends."""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from blockpilot.decoding.lookup import LOOKUP_OFF, LookupConfig
from blockpilot.decoding.speculative import GenerationResult, SamplingParams, SpeculativeDecoder
from blockpilot.errors import InvalidArgumentError, ResourceExhaustedError
from blockpilot.models.target import TargetModel
from blockpilot.serving.scheduler import DecodeScheduler, ScheduledRequest

LOOKUP = LookupConfig(min_ngram=2, max_ngram=4, max_tokens=6, max_tokens_by_ngram=())


class Batch1Target:
    """The same engine seen as a batch-1 backend (no ragged batches): the scheduler then runs one
    pass per session per step."""

    def __init__(self, inner: TargetModel) -> None:
        self.inner = inner
        self.config, self.device = inner.config, inner.device

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def new_cache(self, *args, **kwargs):
        return self.inner.new_cache(*args, **kwargs)

    def norm(self, hidden):
        return self.inner.norm(hidden)


class Client:
    """One request's side: collects its messages (delivered from the scheduler thread) and
    answers the block size when the prefill is reported, as the verifier does."""

    def __init__(self, scheduler: DecodeScheduler, prompt, params, block_size: int, *, drafter=None, lookup=LOOKUP_OFF,
                 cache=None, prefix_features=None, collect=(), keep_cache=False) -> None:
        self.scheduler = scheduler
        self.block_size = block_size
        self.messages: queue.Queue = queue.Queue()
        self.tokens: list[int] = []
        self.kinds: list[str] = []
        self.error: BaseException | None = None
        self.ended = threading.Event()
        self.cache = cache if cache is not None else scheduler.target.new_cache(len(prompt) + params.max_new_tokens + 1)
        self.request = ScheduledRequest(list(prompt), params, self.cache, GenerationResult(prompt_token_ids=list(prompt)),
                                        self._notify, drafter=drafter, prefix_features=prefix_features,
                                        collect_features=tuple(collect), lookup=lookup, keep_cache=keep_cache)

    def _notify(self, kind, payload, since) -> None:
        self.kinds.append(kind)
        if kind == "prefilled":
            self.scheduler.decide(self.request, self.block_size)
        elif kind == "event":
            self.tokens.extend(payload.token_ids)
        elif kind == "error":
            self.error = payload
        if kind in ("done", "error"):
            self.ended.set()

    def wait(self, timeout: float = 60.0) -> "Client":
        assert self.ended.wait(timeout), "the request did not end"
        return self


def work(vocab: int, count: int):
    generator = torch.Generator().manual_seed(11)
    out = []
    for i in range(count):
        length = 2 + (i * 13) % 40  # some prompts span several prefill chunks
        prompt = torch.randint(0, vocab, (length,), generator=generator).tolist()
        if i % 3 == 0:
            prompt = (prompt[:5] * 9)[: max(length, 10)]
        out.append((prompt, SamplingParams(max_new_tokens=4 + (i * 7) % 29), 1 + i % 6))
    return out


@pytest.mark.parametrize("ragged", [True, False], ids=["ragged", "batch-1 backend"])
def test_requests_arriving_together_get_their_alone_outputs(tiny_target, tiny_drafter, ragged):
    target, drafter = tiny_target, tiny_drafter
    engine = target if ragged else Batch1Target(target)
    decoder = SpeculativeDecoder(target, drafter)
    requests = work(target.config.vocab_size, 12)
    alone = [decoder.generate(p, params, b, lookup=LOOKUP).token_ids for p, params, b in requests]
    scheduler = DecodeScheduler(engine, max_sessions=12, capacity=32, max_capacity=256, max_block_size=8,
                                prefill_chunk_tokens=7, planners=3, parallel_passes=2)
    try:
        assert scheduler.batch.ragged is ragged
        clients = [Client(scheduler, p, params, b, drafter=drafter, lookup=LOOKUP) for p, params, b in requests]
        for client in clients:
            scheduler.submit(client.request)
        for client, expected in zip(clients, alone):
            assert client.wait().error is None
            assert client.tokens == expected
            assert client.kinds[0] == "prefilled" and client.kinds[-1] == "done"
        assert scheduler.batch.active == 0
        if ragged:
            assert scheduler.batch.pool.capacity > 32  # grew for the longer requests
    finally:
        scheduler.close()


def test_a_session_cache_is_reused_and_kept(tiny_target, tiny_drafter):
    target, drafter = tiny_target, tiny_drafter
    """A follow-up turn brings a cache holding its earlier tokens (and their features); it gets
    the same output as a fresh prefill, and with keep_cache the row comes back into its cache."""
    decoder = SpeculativeDecoder(target, drafter)
    layers = tuple(drafter.target_layer_ids)
    prompt = list(range(3, 40))
    params = SamplingParams(max_new_tokens=12)
    expected = decoder.generate(prompt, params, 4).token_ids
    scheduler = DecodeScheduler(target, max_sessions=2, capacity=64, max_capacity=128, max_block_size=8, prefill_chunk_tokens=8)
    try:
        cache = target.new_cache(len(prompt) + params.max_new_tokens + 1)
        out = target(torch.tensor([prompt[:20]]), cache, num_logits=1, hidden_layer_ids=layers)
        client = Client(scheduler, prompt, params, 4, drafter=drafter, cache=cache, prefix_features=out.hidden[0],
                        collect=layers, keep_cache=True)
        scheduler.submit(client.request)
        assert client.wait().tokens == expected
        committed = prompt + expected
        assert cache.length == len(committed) - 1  # everything but the last token has been through the target
        # The kept cache continues the conversation exactly as a fresh pass over all of it.
        step = target(torch.tensor([[committed[-1]]]), cache, num_logits=1).logits[0, -1]
        following = target(torch.tensor([committed]), target.new_cache(len(committed) + 1), num_logits=1).logits[0, -1]
        torch.testing.assert_close(step, following, rtol=1e-4, atol=1e-4)
        assert client.request.result.context_features.shape[0] == len(committed) - 1
    finally:
        scheduler.close()


def test_cancel_frees_the_row_and_the_draft_session_while_others_go_on(tiny_target, tiny_drafter):
    target, drafter = tiny_target, tiny_drafter
    opened, closed = [], []

    class Counting:
        def __init__(self, inner):
            self.inner = inner
            self.block_size, self.max_block_size = inner.block_size, inner.max_block_size
            self.target_layer_ids = inner.target_layer_ids

        def open_session(self, capacity):
            session = self.inner.open_session(capacity)
            opened.append(session)
            original = session.close
            session.close = lambda: (closed.append(session), original())
            return session

    decoder = SpeculativeDecoder(target, drafter)
    counting = Counting(drafter)
    scheduler = DecodeScheduler(target, max_sessions=4, capacity=256, max_capacity=256, max_block_size=8)
    try:
        long = Client(scheduler, [5, 6, 7], SamplingParams(max_new_tokens=200), 4, drafter=counting)
        short_params = SamplingParams(max_new_tokens=30)
        short = Client(scheduler, [9, 8, 7, 6], short_params, 3, drafter=counting)
        scheduler.submit(long.request)
        scheduler.submit(short.request)
        while len(long.tokens) < 5:
            threading.Event().wait(0.01)
        scheduler.cancel(long.request)
        assert long.wait(10).kinds[-1] == "done" and len(long.tokens) < 200
        assert short.wait().tokens == decoder.generate([9, 8, 7, 6], short_params, 3).token_ids
        # The load the second request's block size was chosen under: the first was decoding.
        assert long.request.batch_sessions == 0 and short.request.batch_sessions == 1
        assert scheduler.batch.active == 0 and scheduler.batch.pool.rows_in_use == 0
        assert len(opened) == 2 and set(map(id, closed)) == set(map(id, opened))
    finally:
        scheduler.close()


def test_a_bad_request_fails_alone(tiny_target, tiny_drafter):
    target, drafter = tiny_target, tiny_drafter
    decoder = SpeculativeDecoder(target, drafter)
    scheduler = DecodeScheduler(target, max_sessions=4, capacity=64, max_capacity=64, max_block_size=8)
    try:
        params = SamplingParams(max_new_tokens=20)
        good = Client(scheduler, [4, 5, 6], params, 3, drafter=drafter)
        bad_token = Client(scheduler, [4, target.config.vocab_size], params, 1)
        bad_size = Client(scheduler, [4, 5], params, 9, drafter=drafter)  # wider than the batch allows (8)
        too_long = Client(scheduler, list(range(3, 40)), SamplingParams(max_new_tokens=30), 2, drafter=drafter)
        for client in (good, bad_token, bad_size, too_long):
            scheduler.submit(client.request)
        assert isinstance(bad_token.wait().error, InvalidArgumentError)
        assert isinstance(bad_size.wait().error, InvalidArgumentError)
        assert isinstance(too_long.wait().error, ResourceExhaustedError)  # 37 + 30 + 1 + 8 > 64 per row
        assert good.wait().error is None
        assert good.tokens == decoder.generate([4, 5, 6], params, 3).token_ids
        assert scheduler.batch.active == 0
    finally:
        scheduler.close()
