"""The drafter service's batcher: steps that arrive while a pass runs share the next pass; each
step's own failure, cancellation and close stay its own."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from blockpilot.errors import ResourceExhaustedError
from blockpilot.serving.draft_batcher import DraftBatcher


class FakeSession:
    def __init__(self, name: str, *, full: bool = False) -> None:
        self.name, self.full, self.closed, self.closed_during_pass = name, full, False, False

    def check(self, request) -> None:
        if self.full:
            raise ResourceExhaustedError(f"{self.name}: KV cache full")

    def close(self) -> None:
        self.closed = True


class Passes:
    """propose_many that records each pass and can hold one until released."""

    def __init__(self) -> None:
        self.passes: list[list[str]] = []
        self.started = threading.Event()
        self.hold = threading.Event()
        self.hold.set()
        self.in_pass: list[FakeSession] = []

    def __call__(self, sessions, requests):
        self.passes.append([s.name for s in sessions])
        self.in_pass = list(sessions)
        self.started.set()
        self.hold.wait(5)
        for s in sessions:
            s.closed_during_pass |= s.closed
        return [f"{s.name}:{r}" for s, r in zip(sessions, requests)]


@pytest.fixture
def pool():
    with ThreadPoolExecutor(max_workers=1) as executor:
        yield executor


def run(coro):
    return asyncio.run(coro)


async def _held_first_pass(batcher, passes, first):
    """Start `first`'s step and wait until its pass is running (held)."""
    passes.hold.clear()
    task = asyncio.ensure_future(batcher.propose(first, 0))
    await asyncio.to_thread(passes.started.wait, 5)
    return task


def test_a_step_alone_runs_at_once_and_steps_waiting_share_the_next_pass(pool):
    async def main():
        passes, seen = Passes(), []
        batcher = DraftBatcher(passes, pool, max_sessions=8, on_pass=lambda n, s: seen.append(n))
        sessions = [FakeSession(f"s{i}") for i in range(4)]
        first = await _held_first_pass(batcher, passes, sessions[0])
        rest = [asyncio.ensure_future(batcher.propose(s, i + 1)) for i, s in enumerate(sessions[1:])]
        await asyncio.sleep(0.05)
        passes.hold.set()
        results = await asyncio.gather(first, *rest)
        return passes.passes, results, seen

    passes, results, seen = run(main())
    assert passes == [["s0"], ["s1", "s2", "s3"]]
    assert results == ["s0:0", "s1:1", "s2:2", "s3:3"]
    assert seen == [1, 3]


def test_max_sessions_splits_a_crowd_into_passes(pool):
    async def main():
        passes = Passes()
        batcher = DraftBatcher(passes, pool, max_sessions=2)
        first = await _held_first_pass(batcher, passes, FakeSession("a"))
        rest = [asyncio.ensure_future(batcher.propose(FakeSession(n), 0)) for n in "bcde"]
        await asyncio.sleep(0.05)
        passes.hold.set()
        await asyncio.gather(first, *rest)
        return passes.passes

    assert run(main()) == [["a"], ["b", "c"], ["d", "e"]]


def test_a_full_cache_fails_its_own_step_only(pool):
    async def main():
        passes = Passes()
        batcher = DraftBatcher(passes, pool, max_sessions=8)
        full = FakeSession("full", full=True)
        with pytest.raises(ResourceExhaustedError, match="full: KV cache full"):
            await batcher.propose(full, 0)
        return await batcher.propose(FakeSession("ok"), 1), passes.passes

    assert run(main()) == ("ok:1", [["ok"]])


def test_a_step_cancelled_while_waiting_leaves_before_its_pass(pool):
    async def main():
        passes = Passes()
        batcher = DraftBatcher(passes, pool, max_sessions=8)
        first = await _held_first_pass(batcher, passes, FakeSession("a"))
        gone = asyncio.ensure_future(batcher.propose(FakeSession("gone"), 0))
        kept = asyncio.ensure_future(batcher.propose(FakeSession("kept"), 0))
        await asyncio.sleep(0.05)
        gone.cancel()
        passes.hold.set()
        await asyncio.gather(first, kept)
        return passes.passes

    assert run(main()) == [["a"], ["kept"]]


def test_a_session_released_during_its_pass_is_closed_after_it(pool):
    async def main():
        passes = Passes()
        batcher = DraftBatcher(passes, pool, max_sessions=8)
        busy, idle = FakeSession("busy"), FakeSession("idle")
        step = await _held_first_pass(batcher, passes, busy)
        batcher.release(busy)  # its stream ended while the pass writes its cache
        batcher.release(idle)  # not in a pass: closed at once
        closed_at_once = (busy.closed, idle.closed)
        passes.hold.set()
        await step
        return closed_at_once, busy.closed, busy.closed_during_pass

    assert run(main()) == ((False, True), True, False)


def test_a_failed_pass_fails_each_of_its_steps_and_the_next_pass_runs(pool):
    calls = []

    def propose_many(sessions, requests):
        calls.append(len(sessions))
        if len(calls) == 1:
            raise RuntimeError("drafter pass failed")
        return ["ok" for _ in sessions]

    async def main():
        batcher = DraftBatcher(propose_many, pool, max_sessions=8)
        with pytest.raises(RuntimeError, match="drafter pass failed"):
            await batcher.propose(FakeSession("a"), 0)
        return await batcher.propose(FakeSession("b"), 0)

    assert run(main()) == "ok"
