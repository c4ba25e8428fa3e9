"""The Redis session store against a real Redis (the shared server on 6379; unique keys, cleaned
up), and its in-memory twin with the same semantics."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis_required import no_redis

from blockpilot.errors import AbortedError, NotFoundError, UnavailableError
from blockpilot.serving.session_store import MemorySessionStore, RedisSessionStore, meta_key, new_session_id

REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_available() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=0.5).ping())
    except redis.exceptions.ConnectionError:
        return False


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(params=["redis", "memory"])
def store_factory(request):
    if request.param == "redis" and not redis_available():
        no_redis("no Redis on 127.0.0.1:6379")
    created = []

    def make(**kwargs):
        store = RedisSessionStore(REDIS_URL, **kwargs) if request.param == "redis" else MemorySessionStore(
            **{k: v for k, v in kwargs.items() if k == "ttl_s"})
        created.append(store)
        return store

    yield make
    if request.param == "redis":
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter("bp:{test-*"):
            client.delete(key)


def sid() -> str:
    return f"test-{uuid.uuid4().hex}"


def test_keys_are_namespaced_and_hash_tagged():
    assert meta_key("abc") == "bp:{abc}:meta"
    assert len(new_session_id()) == 32


def test_fence_stops_a_stale_writer(store_factory):
    async def scenario():
        store = store_factory()
        session = sid()
        await store.create(session, {"verifier_replica": "a"})
        old = await store.begin_turn(session, lease_s=0.001)  # turn 1 (its lease lapses at once)
        await asyncio.sleep(0.01)
        new = await store.begin_turn(session, lease_s=30)  # turn 2, e.g. on another replica
        assert new > old
        assert await store.write(session, new, {"committed_tokens": 20, "state": "idle"})
        assert not await store.write(session, old, {"committed_tokens": 5})  # stale: fenced off
        record = await store.get(session)
        assert record["committed_tokens"] == "20" and int(record["step"]) == new
        await store.close()

    run(scenario())


def test_session_in_use_and_unknown_session(store_factory):
    async def scenario():
        store = store_factory()
        session = sid()
        with pytest.raises(NotFoundError, match="unknown or expired"):
            await store.begin_turn(session, 10)
        await store.create(session, {})
        fence = await store.begin_turn(session, 10)
        with pytest.raises(AbortedError, match="already in use"):
            await store.begin_turn(session, 10)
        await store.write(session, fence, {"state": "idle", "lease_until": 0})
        assert await store.begin_turn(session, 10) == fence + 1
        await store.close()

    run(scenario())


def test_a_renewed_lease_holds_the_session_and_a_dead_holders_lapses(store_factory):
    """A running turn renews its short lease; a verifier killed mid-turn stops renewing, and the
    session can be continued (on another replica) once the lease has run out, not after minutes."""
    async def scenario():
        store = store_factory()
        session = sid()
        await store.create(session, {})
        fence = await store.begin_turn(session, lease_s=0.3)
        for _ in range(3):  # the live holder renews: still in use past the first lease
            await asyncio.sleep(0.15)
            assert await store.renew(session, fence, 0.3)
        with pytest.raises(AbortedError, match="already in use"):
            await store.begin_turn(session, 0.3)
        await asyncio.sleep(0.4)  # the holder died: no renewal, the lease lapses
        taken = await store.begin_turn(session, 30)
        assert taken > fence
        assert not await store.renew(session, fence, 30)  # the dead turn cannot take it back
        await store.close()

    run(scenario())


def test_every_key_has_a_ttl_and_expires():
    if not redis_available():
        no_redis("no Redis on 127.0.0.1:6379")
    import redis

    async def scenario():
        store = RedisSessionStore(REDIS_URL, ttl_s=1)
        session = sid()
        await store.create(session, {})
        assert 0 < await store.ttl(session) <= 1
        fence = await store.begin_turn(session, 5)
        await store.write(session, fence, {"state": "idle"})
        assert 0 < await store.ttl(session) <= 1
        await store.record_outcome("test-v", f"arm-{session}", {"tokens": 3}, {"decision_id": "d"}, new_session=True)
        await asyncio.sleep(1.6)
        assert await store.get(session) is None
        with pytest.raises(NotFoundError):
            await store.begin_turn(session, 5)
        await store.close()

    run(scenario())
    client = redis.Redis.from_url(REDIS_URL)
    for key in [k for k in client.scan_iter("bp:*")]:
        assert client.ttl(key) > 0, f"{key} has no TTL"
    for key in client.scan_iter("bp:arm:test-v:*"):
        client.delete(key)


def test_memory_store_expires():
    async def scenario():
        store = MemorySessionStore(ttl_s=0.05)
        await store.create("s", {})
        await asyncio.sleep(0.1)
        assert await store.get("s") is None

    run(scenario())


def test_unreachable_redis_fails_open_fast_and_recovers():
    async def scenario():
        store = RedisSessionStore("redis://127.0.0.1:1/0", timeout_s=0.2, retry_after_s=0.2)
        with pytest.raises(UnavailableError):
            await store.get("x")
        assert not store.healthy
        with pytest.raises(UnavailableError, match="retrying"):
            await store.get("x")  # skipped without a network call while marked down
        await asyncio.sleep(0.25)
        assert store.healthy
        await store.close()

    run(scenario())


def test_a_decision_issued_by_one_policy_replica_is_redeemed_once_by_another():
    """Policy replicas share the Redis store: a Report reaching another replica than the one that
    decided is checked there, and a second Report of the same decision is refused."""
    if not redis_available():
        no_redis("no Redis on 127.0.0.1:6379")
    from blockpilot.serving.policy import LocalPolicy, Outcome, PolicyFeatures
    from blockpilot.serving.session_store import RedisSessionStore

    async def scenario():
        stores = [RedisSessionStore("redis://127.0.0.1:6379/0") for _ in range(2)]
        first, second = (LocalPolicy(default_block_size=4, store=store) for store in stores)
        try:
            decision = await first.decide(PolicyFeatures({}, 5, 4, 16, "", "default"))
            outcome = Outcome(decision, "", 5, 3, (2,), 0.1, "length", "")
            await second.report(outcome)
            with pytest.raises(NotFoundError):
                await first.report(outcome)
        finally:
            for policy in (first, second):
                policy.close()
            for store in stores:
                await store.close()

    run(scenario())
