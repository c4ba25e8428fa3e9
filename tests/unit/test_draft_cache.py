"""Kept draft caches (drafter service, multi-turn): LRU + TTL bounds, tags, and a resumed cache
drafting exactly like a fresh one fed the whole context."""

from __future__ import annotations

import torch

from blockpilot.decoding.drafting import DraftRequest, LocalDrafter
from blockpilot.models.drafter import DFlashDrafter
from blockpilot.models.target import TargetModel
from blockpilot.serving.draft_cache import DraftCachePool


class _Session:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_pool_lru_ttl_and_tags():
    clock, sizes = _Clock(), []
    pool = DraftCachePool(2, ttl_s=10.0, on_change=sizes.append, clock=clock)
    a, b, c = _Session(), _Session(), _Session()
    assert pool.keep("a", "t1", a) and pool.keep("b", "t1", b)
    clock.now = 1.0
    assert pool.keep("c", "t1", c)  # over the bound: the least recently kept ("a") is freed
    assert a.closed and len(pool) == 2 and sizes[-1] == 2
    assert pool.take("a", "t1") is None
    assert pool.take("b", "other-tag") is None and b.closed  # stale tag: freed, never resumed
    assert pool.take("c", "t1") is c and not c.closed and len(pool) == 0 and sizes[-1] == 0
    # TTL: an idle cache is freed by expire().
    d = _Session()
    pool.keep("d", "t2", d)
    clock.now = 5.0
    assert pool.expire() == 0 and not d.closed
    clock.now = 11.5
    assert pool.expire() == 1 and d.closed and len(pool) == 0 and sizes[-1] == 0
    # No session id, no tag, or keeping disabled: freed at once.
    for args in [("", "t"), ("e", "")]:
        s = _Session()
        assert not pool.keep(*args, s) and s.closed
    off = DraftCachePool(0, ttl_s=10.0)
    s = _Session()
    assert not off.keep("f", "t", s) and s.closed


def test_resumed_cache_drafts_like_a_fresh_one(tiny_llama_dir):
    torch.manual_seed(0)
    target = TargetModel.from_pretrained(tiny_llama_dir)
    drafter = LocalDrafter(DFlashDrafter.random(target.config, seed=1, block_size=6), target)
    features = torch.randn(40, len(drafter.target_layer_ids) * target.config.hidden_size)

    def step(session, start, context_start, anchor=3):
        return session.propose(DraftRequest(anchor=anchor, start=start, num_draft=5, context=features[context_start:start],
                                            context_start=context_start)).tokens

    # Turn 1 fills 20 context tokens into a small cache; turn 2 keeps 12 of them (the shared
    # prefix), grows the cache and sends positions 12..29 only.
    kept = drafter.open_session(24)
    step(kept, 20, 0)
    assert kept.cached_length == 20
    assert kept.resume(12, 64) == 12 and kept.context_length == 12 and kept.cache.capacity == 64
    fresh = drafter.open_session(64)
    assert torch.equal(step(kept, 30, 12, anchor=7), step(fresh, 30, 0, anchor=7))
    assert torch.equal(step(kept, 35, 30, anchor=9), step(fresh, 35, 30, anchor=9))
    # Asking for more than it holds keeps what it holds.
    assert kept.resume(1000, 64) == 35
