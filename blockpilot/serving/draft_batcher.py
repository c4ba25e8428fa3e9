"""The drafter service's batcher: the draft steps of every session that asks while a drafter pass
runs become the next pass, one forward over all of them (`propose_together`).

A drafter pass is bound by reading its weights (DFlashDrafter.forward_packed), so sessions that
share a pass share that cost. No step waits for others to arrive: a step that finds the drafter
idle runs at once, alone; steps that arrive while a pass runs wait for it and go together in the
next (Triton's dynamic batcher with no added delay). Sessions are independent: each step is
checked on its own before it joins a pass (a full cache fails that step only), a cancelled step
leaves before its pass starts, and a session closed while its step is in a pass is closed when
that pass ends (the pass is still writing its cache).

Runs on the service's event loop (no locks: every method is called from the loop); the passes
run in one worker thread, one at a time.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Sequence


@dataclass
class _Step:
    session: Any  # a LocalDraftSession
    request: Any  # its DraftRequest
    future: asyncio.Future


class DraftBatcher:
    """propose_many(sessions, requests) -> drafts: one pass for many sessions (run in `executor`).
    max_sessions: most steps in one pass (the rest wait for the next).
    step_delay_s: an artificial delay per pass (fault-injection tests only).
    on_pass(sessions, seconds): called on the loop after each pass (metrics)."""

    def __init__(self, propose_many: Callable[[Sequence[Any], Sequence[Any]], list[Any]], executor: Executor, *,
                 max_sessions: int, step_delay_s: float = 0.0,
                 on_pass: Callable[[int, float], None] | None = None) -> None:
        self._propose_many = propose_many
        self._executor = executor
        self.max_sessions = max_sessions
        self._step_delay_s = step_delay_s
        self._on_pass = on_pass
        self._waiting: list[_Step] = []
        self._runner: asyncio.Task | None = None
        self._in_pass: list[Any] = []  # sessions of the pass running now
        self._close_after_pass: list[Any] = []

    async def propose(self, session: Any, request: Any) -> Any:
        """This session's draft for `request`, from the next pass (raises the session's own error,
        e.g. a full cache, without touching anyone else's step)."""
        session.check(request)
        step = _Step(session, request, asyncio.get_running_loop().create_future())
        self._waiting.append(step)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._run())
        return await step.future

    def release(self, session: Any) -> None:
        """Close `session` (free its cache) now, or when the pass using it ends."""
        if any(s is session for s in self._in_pass):
            self._close_after_pass.append(session)
        else:
            session.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            taken, self._waiting = self._waiting[:self.max_sessions], self._waiting[self.max_sessions:]
            steps = [step for step in taken if not step.future.done()]  # cancelled while waiting
            if not steps:
                continue
            self._in_pass = [step.session for step in steps]
            started = time.perf_counter()
            try:
                drafts = await loop.run_in_executor(self._executor, self._pass, self._in_pass,
                                                    [step.request for step in steps])
            except Exception as err:  # noqa: BLE001 - every step of the failed pass gets the error
                for step in steps:
                    if not step.future.done():
                        step.future.set_exception(err)
            else:
                for step, draft in zip(steps, drafts):
                    if not step.future.done():
                        step.future.set_result(draft)
            finally:
                self._in_pass = []
                closing, self._close_after_pass = self._close_after_pass, []
                for session in closing:
                    session.close()
            if self._on_pass is not None:
                self._on_pass(len(steps), time.perf_counter() - started)

    def _pass(self, sessions: Sequence[Any], requests: Sequence[Any]) -> list[Any]:
        if self._step_delay_s:
            time.sleep(self._step_delay_s)
        return self._propose_many(sessions, requests)
