"""Kept session caches: LRU eviction, TTL expiry, and the prefix a follow-up turn reuses."""

from __future__ import annotations

import torch

from blockpilot.models.kv_cache import KVCache
from blockpilot.serving import session_cache
from blockpilot.serving.session_cache import SessionCaches


def new_cache(capacity: int) -> KVCache:
    return KVCache(1, 1, 2, capacity)


def filled(tokens: list[int], capacity: int = 16) -> KVCache:
    cache = new_cache(capacity)
    cache.keys[0, 0, 0, : len(tokens)] = torch.tensor(tokens, dtype=torch.float32)[:, None]
    cache.length = len(tokens) - 1  # the last token has not been through the target
    return cache


def test_least_recently_used_is_evicted_and_idle_ones_expire(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(session_cache.time, "monotonic", lambda: now[0])
    caches = SessionCaches(max_sessions=2, ttl_s=10)
    for sid in ("a", "b"):
        caches.keep(sid, filled([1, 2, 3]), [1, 2, 3], None)
    assert caches.get("a") is not None  # a is now the most recent
    caches.keep("c", filled([4, 5]), [4, 5], None)
    assert caches.get("b") is None and caches.get("a") is not None and len(caches) == 2
    now[0] += 11
    assert caches.get("c") is None and len(caches) == 1
    off = SessionCaches(max_sessions=0, ttl_s=10)
    off.keep("a", filled([1]), [1], None)
    assert len(off) == 0


def test_reuse_cuts_to_the_shared_prefix_and_grows_the_cache():
    kept = session_cache.KeptSession(filled([1, 2, 3, 4, 5], capacity=8), [1, 2, 3, 4, 5], torch.arange(8.0).view(4, 2))
    # The new prompt shares [1, 2, 3] and needs more room than the kept cache has.
    reuse = SessionCaches.reuse(kept, [1, 2, 3, 9, 9], need=20, reads_features=True, new_cache=new_cache)
    assert reuse.cached_tokens == 3 and reuse.cache.capacity == 20 and reuse.cache.length == 3
    assert reuse.cache.keys[0, 0, 0, :3, 0].tolist() == [1.0, 2.0, 3.0]
    assert torch.equal(reuse.features, kept.features[:3])
    # The whole kept conversation again: all but the prompt's last token is reused.
    again = SessionCaches.reuse(kept, [1, 2, 3, 4, 5], need=8, reads_features=False, new_cache=new_cache)
    assert again.cached_tokens == 4 and again.cache is kept.cache and again.features is None
    # Fewer features kept than cache entries: no further than the features.
    short = session_cache.KeptSession(filled([1, 2, 3, 4, 5]), [1, 2, 3, 4, 5], torch.zeros(2, 2))
    assert SessionCaches.reuse(short, [1, 2, 3, 4, 5, 6], 16, True, new_cache).cached_tokens == 2
    # Nothing shared: a fresh cache.
    fresh = SessionCaches.reuse(kept, [7, 8], need=5, reads_features=True, new_cache=new_cache)
    assert fresh.cached_tokens == 0 and fresh.cache.length == 0 and fresh.features is None
