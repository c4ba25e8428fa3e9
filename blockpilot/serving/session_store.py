"""Session metadata (DESIGN.md §5): Redis, or an in-memory store with the same interface.

Schema (every key has a TTL, refreshed on each write; one session's keys share the hash tag
`{<session>}`, so they sit in one cluster slot):

    bp:{<session>}:meta   hash  state (idle|generating), lease_until, step (the fence), turns,
                                committed_tokens, block_size, policy_version, arm, experiment,
                                decision_id, verifier_replica, verifier_cache_len, drafter_replica,
                                drafter_replica_address (where that replica is dialed directly:
                                the session's next Draft stream opens there), drafter_cache_len,
                                drafter_cache_tag (the tag the drafter keeps that cache under),
                                drafter_cache_digest (digest of the tokens it was built from),
                                fallback_reason, created_at, updated_at
    bp:outcomes           stream of decision outcomes (bounded, MAXLEN ~), for offline training
    bp:arm:<version>:<arm> hash  per-arm counters: sessions, requests, tokens, steps,
                                accepted_tokens, decode_seconds
    bp:experiments, bp:exp:{<name>}:...  A/B experiments and their arm statistics (see
                                blockpilot/policy/experiments.py; same client, same fail-open rules)

Fencing: `begin_turn` atomically checks that no other stream holds the session (a lease), bumps
`step` and returns it as the turn's fence token. `write` (a Lua script) applies only if the stored
step is not newer than the writer's token, so a stale writer (an older turn on a replica that lost
the session) can never overwrite newer state.

Failing open: every Redis error becomes UnavailableError after a short socket timeout; after a
failure the store skips Redis for `retry_after_s` (so a dead Redis costs one timeout, not one per
call) and then tries again: recovery needs no restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, Mapping, Protocol

from blockpilot.errors import AbortedError, NotFoundError, UnavailableError
from blockpilot.serving.status import quoted

log = logging.getLogger(__name__)

OUTCOME_STREAM = "bp:outcomes"


def meta_key(session_id: str) -> str:
    return f"bp:{{{session_id}}}:meta"


def decision_key(decision_id: str) -> str:
    return f"bp:decision:{decision_id}"


def arm_key(policy_version: str, arm: str) -> str:
    return f"bp:arm:{policy_version}:{arm}"


def new_session_id() -> str:
    return uuid.uuid4().hex


class SessionStore(Protocol):
    """Session metadata store. All methods may raise UnavailableError (callers fail open)."""

    kind: str

    async def create(self, session_id: str, fields: Mapping[str, Any]) -> None: ...

    async def get(self, session_id: str) -> dict[str, str] | None: ...

    async def begin_turn(self, session_id: str, lease_s: float) -> int: ...

    async def write(self, session_id: str, fence: int, fields: Mapping[str, Any]) -> bool: ...

    async def record_outcome(self, policy_version: str, arm: str, counters: Mapping[str, float],
                             outcome: Mapping[str, Any], new_session: bool) -> None: ...

    async def renew(self, session_id: str, fence: int, lease_s: float) -> bool: ...

    async def issue_decision(self, decision_id: str, fields: Mapping[str, Any], ttl_s: float) -> None: ...

    async def redeem_decision(self, decision_id: str) -> dict[str, str] | None: ...

    async def close(self) -> None: ...


_BEGIN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until') or '0') or 0
if redis.call('HGET', KEYS[1], 'state') == 'generating' and lease > tonumber(ARGV[1]) then return -2 end
local step = redis.call('HINCRBY', KEYS[1], 'step', 1)
redis.call('HSET', KEYS[1], 'state', 'generating', 'lease_until', ARGV[2], 'updated_at', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return step
"""

_WRITE = """
local current = tonumber(redis.call('HGET', KEYS[1], 'step') or '-1') or -1
if current > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'step', ARGV[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


_RENEW = """
if redis.call('HGET', KEYS[1], 'step') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'state') ~= 'generating' then return 0 end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[2])
return 1
"""


def _flatten(fields: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in fields.items():
        out += [key, str(value)]
    return out


class RedisSessionStore:
    kind = "redis"

    def __init__(self, url: str, *, ttl_s: float = 1800.0, timeout_s: float = 0.5, retry_after_s: float = 1.0,
                 outcome_maxlen: int = 100000, stats_ttl_s: float = 7 * 86400.0) -> None:
        import redis.asyncio as aioredis

        self.url = url
        self.ttl_s = max(1, int(ttl_s))
        self.stats_ttl_s = max(1, int(stats_ttl_s))
        self.outcome_maxlen = outcome_maxlen
        self.retry_after_s = retry_after_s
        self._client = aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                         decode_responses=True, retry_on_timeout=False)
        self._begin = self._client.register_script(_BEGIN)
        self._write = self._client.register_script(_WRITE)
        self._renew = self._client.register_script(_RENEW)
        self._down_until = 0.0
        self.failures = 0

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self._down_until

    async def _call(self, what: str, coro_factory):
        import redis.exceptions as rex

        if not self.healthy:
            raise UnavailableError(f"session store {self.url} is unavailable (retrying in {self._down_until - time.monotonic():.1f} s)")
        try:
            return await coro_factory()
        except (rex.ConnectionError, rex.TimeoutError, rex.BusyLoadingError, OSError, asyncio.TimeoutError) as err:
            self.failures += 1
            self._down_until = time.monotonic() + self.retry_after_s
            log.warning("Redis %s failed (%s): failing open for %.1f s", what, err, self.retry_after_s)
            raise UnavailableError(f"session store {self.url} is unavailable: {err}") from None

    @property
    def client(self):
        """The redis.asyncio client (decode_responses=True), for other key families (experiments)."""
        return self._client

    async def call(self, what: str, coro_factory):
        """Run one Redis operation with this store's fail-open rules (UnavailableError, back-off)."""
        return await self._call(what, coro_factory)

    async def ping(self) -> bool:
        return bool(await self._call("ping", self._client.ping))

    async def create(self, session_id: str, fields: Mapping[str, Any]) -> None:
        now = time.time()
        data = {"state": "idle", "step": 0, "turns": 0, "created_at": now, "updated_at": now, **fields}

        async def run():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(meta_key(session_id), mapping={k: str(v) for k, v in data.items()})
                pipe.expire(meta_key(session_id), self.ttl_s)
                await pipe.execute()

        await self._call("create", run)

    async def get(self, session_id: str) -> dict[str, str] | None:
        data = await self._call("get", lambda: self._client.hgetall(meta_key(session_id)))
        return data or None

    async def begin_turn(self, session_id: str, lease_s: float) -> int:
        now = time.time()
        result = int(await self._call("begin_turn", lambda: self._begin(keys=[meta_key(session_id)],
                                                                          args=[now, now + lease_s, self.ttl_s])))
        if result == -1:
            raise NotFoundError(f"unknown or expired session {quoted(session_id)}")
        if result == -2:
            raise AbortedError(f"session {quoted(session_id)} is already in use by another stream")
        return result

    async def write(self, session_id: str, fence: int, fields: Mapping[str, Any]) -> bool:
        fields = {**fields, "updated_at": time.time()}
        ok = await self._call("write", lambda: self._write(keys=[meta_key(session_id)],
                                                            args=[fence, self.ttl_s, *_flatten(fields)]))
        return bool(int(ok))

    async def ttl(self, session_id: str) -> int:
        return int(await self._call("ttl", lambda: self._client.ttl(meta_key(session_id))))

    async def record_outcome(self, policy_version: str, arm: str, counters: Mapping[str, float],
                             outcome: Mapping[str, Any], new_session: bool) -> None:
        async def run():
            key = arm_key(policy_version, arm)
            async with self._client.pipeline(transaction=False) as pipe:
                for name, value in counters.items():
                    pipe.hincrbyfloat(key, name, float(value))
                if new_session:
                    pipe.hincrby(key, "sessions", 1)
                pipe.expire(key, self.stats_ttl_s)
                pipe.xadd(OUTCOME_STREAM, {k: str(v) for k, v in outcome.items()}, maxlen=self.outcome_maxlen, approximate=True)
                pipe.expire(OUTCOME_STREAM, self.stats_ttl_s)
                await pipe.execute()

        await self._call("record_outcome", run)

    async def renew(self, session_id: str, fence: int, lease_s: float) -> bool:
        """Extend the running turn's hold on the session to now + lease_s; False when the turn no
        longer holds it (a newer turn took over after the lease ran out)."""
        until = time.time() + lease_s
        return bool(await self._call("renew", lambda: self._renew(keys=[meta_key(session_id)], args=[fence, until])))

    async def issue_decision(self, decision_id: str, fields: Mapping[str, Any], ttl_s: float) -> None:
        """Remember a decision the policy issued, for `ttl_s`, so its one Report can be checked
        (any policy replica may receive it)."""
        data = json.dumps({k: str(v) for k, v in fields.items()})
        await self._call("issue_decision", lambda: self._client.set(decision_key(decision_id), data, ex=max(1, int(ttl_s))))

    async def redeem_decision(self, decision_id: str) -> dict[str, str] | None:
        """The issued decision's fields, once (atomically removed); None when unknown, expired or
        already redeemed."""
        data = await self._call("redeem_decision", lambda: self._client.getdel(decision_key(decision_id)))
        return json.loads(data) if data else None

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except Exception:  # noqa: BLE001 - closing a broken connection is best effort
            pass


class MemorySessionStore:
    """The same interface in process memory: the explicit local default (one replica only)."""

    kind = "memory"
    healthy = True

    def __init__(self, *, ttl_s: float = 1800.0, outcome_maxlen: int = 10000) -> None:
        self.ttl_s = ttl_s
        self.outcome_maxlen = outcome_maxlen
        self._meta: dict[str, tuple[float, dict[str, str]]] = {}
        self.arms: dict[str, dict[str, float]] = {}
        self.outcomes: list[dict[str, str]] = []
        self._decisions: dict[str, tuple[float, dict[str, str]]] = {}  # id -> (expiry, fields), insertion order

    def _live(self, session_id: str) -> dict[str, str] | None:
        entry = self._meta.get(session_id)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            del self._meta[session_id]
            return None
        return entry[1]

    def _touch(self, session_id: str, data: dict[str, str]) -> None:
        self._meta[session_id] = (time.monotonic() + self.ttl_s, data)

    async def ping(self) -> bool:
        return True

    async def create(self, session_id: str, fields: Mapping[str, Any]) -> None:
        now = time.time()
        data = {"state": "idle", "step": 0, "turns": 0, "created_at": now, "updated_at": now, **fields}
        self._touch(session_id, {k: str(v) for k, v in data.items()})

    async def get(self, session_id: str) -> dict[str, str] | None:
        data = self._live(session_id)
        return dict(data) if data is not None else None

    async def begin_turn(self, session_id: str, lease_s: float) -> int:
        data = self._live(session_id)
        if data is None:
            raise NotFoundError(f"unknown or expired session {quoted(session_id)}")
        now = time.time()
        if data.get("state") == "generating" and float(data.get("lease_until", 0)) > now:
            raise AbortedError(f"session {quoted(session_id)} is already in use by another stream")
        step = int(data.get("step", 0)) + 1
        data.update(step=str(step), state="generating", lease_until=str(now + lease_s), updated_at=str(now))
        self._touch(session_id, data)
        return step

    async def write(self, session_id: str, fence: int, fields: Mapping[str, Any]) -> bool:
        data = self._live(session_id) or {}
        if int(data.get("step", -1)) > fence:
            return False
        data.update({k: str(v) for k, v in fields.items()}, step=str(fence), updated_at=str(time.time()))
        self._touch(session_id, data)
        return True

    async def record_outcome(self, policy_version: str, arm: str, counters: Mapping[str, float],
                             outcome: Mapping[str, Any], new_session: bool) -> None:
        stats = self.arms.setdefault(arm_key(policy_version, arm), {})
        for name, value in counters.items():
            stats[name] = stats.get(name, 0.0) + float(value)
        if new_session:
            stats["sessions"] = stats.get("sessions", 0.0) + 1
        self.outcomes.append({k: str(v) for k, v in outcome.items()})
        del self.outcomes[: max(0, len(self.outcomes) - self.outcome_maxlen)]

    async def renew(self, session_id: str, fence: int, lease_s: float) -> bool:
        data = self._live(session_id)
        if data is None or int(data.get("step", -1)) != fence or data.get("state") != "generating":
            return False
        data["lease_until"] = str(time.time() + lease_s)
        return True

    MAX_DECISIONS = 100_000  # issued decisions kept (oldest dropped first): memory stays bounded

    async def issue_decision(self, decision_id: str, fields: Mapping[str, Any], ttl_s: float) -> None:
        self._decisions[decision_id] = (time.monotonic() + ttl_s, {k: str(v) for k, v in fields.items()})
        while len(self._decisions) > self.MAX_DECISIONS:
            self._decisions.pop(next(iter(self._decisions)))

    async def redeem_decision(self, decision_id: str) -> dict[str, str] | None:
        entry = self._decisions.pop(decision_id, None)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    async def close(self) -> None:
        pass


def open_store(url: str, **kwargs: Any) -> RedisSessionStore | MemorySessionStore:
    """'memory' or '' -> MemorySessionStore (logged); else a RedisSessionStore for the URL."""
    if url in ("", "memory"):
        log.warning("session store: in-memory (sessions live in this process only; not for several replicas)")
        memory_kwargs = {k: v for k, v in kwargs.items() if k in ("ttl_s", "outcome_maxlen")}
        return MemorySessionStore(**memory_kwargs)
    return RedisSessionStore(url, **kwargs)
