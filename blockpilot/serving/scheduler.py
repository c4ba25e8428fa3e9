"""The verifier's decode scheduler: one thread owns the target and runs every request in one loop.

Each iteration of the loop
  1. takes cancelled requests out at once (their pool row, draft session and slot are freed),
  2. starts the requests whose block size has been chosen: their first token goes out and they
     join the batch,
  3. runs one prefill chunk (at most `prefill_chunk_tokens` prompt tokens) of the oldest request
     still prefilling, so a long prompt delays the others' steps by one chunk, never by its
     whole prefill,
  4. runs one step of every session in the batch (BatchDecoder.step: one ragged target pass on the
     torch engine, one pass per session on batch-1 backends).

A request's life: submit() -> its prefill (in chunks) -> notify("prefilled", PrefillInfo) -> the
caller chooses the block size (the policy, on the caller's event loop, while the batch goes on)
and calls decide() -> notify("event", StepEvent) for the first token and every step ->
notify("done") or notify("error", exception). cancel() ends it within one iteration. notify runs on
the scheduler thread: it must only hand the message over (e.g. call_soon_threadsafe).

Caches: a request brings its own target cache (it may hold a reused prefix: a conversation's
earlier turns); the prefill fills it, the batch copies it into a pool row, and when the request
ends with keep_cache the row is copied back, so the caller can keep it for the next turn.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from blockpilot.decoding.batch import BatchDecoder, BatchSession, supports_ragged_batch
from blockpilot.decoding.drafting import DraftProvider
from blockpilot.decoding.lookup import LOOKUP_OFF, LookupConfig
from blockpilot.decoding.speculative import (DecodeState, GenerationResult, SamplingParams, SpeculativeDecoder, StepEvent,
                                             feature_layers_of)
from blockpilot.errors import AbortedError
from blockpilot.models.kv_cache import KVCache

log = logging.getLogger(__name__)

Notify = Callable[[str, object, float], None]  # (kind, payload, seconds since the request's last message)


@dataclass(eq=False)
class ScheduledRequest:
    """One request as the scheduler runs it. The caller fills the first fields; the rest is the
    scheduler's (touched only on its thread).

    cache: the request's own target cache; it may already hold the first cache.length prompt
    tokens, and then prefix_features [cache.length, F] gives their drafter features (when the
    request reads any). drafter: its draft provider (None: no DFlash drafts). keep_cache: copy
    the batch row back into `cache` when the request ends (a session's next turn reuses it)."""

    prompt_ids: list[int]
    params: SamplingParams
    cache: KVCache
    result: GenerationResult
    notify: Notify
    drafter: DraftProvider | None = None
    prefix_features: torch.Tensor | None = None
    collect_features: tuple[int, ...] = ()
    lookup: LookupConfig = LOOKUP_OFF
    keep_cache: bool = False
    load_cap: bool = True  # the batch's load-aware draft cap applies (False: the block size as given)
    # ---- the scheduler's ----
    block_size: int | None = None  # set by decide()
    cancelled: bool = False
    state: DecodeState | None = None
    session: BatchSession | None = None
    chunk_features: list[torch.Tensor] = field(default_factory=list)
    prefill_started: float = 0.0
    last_message: float = field(default_factory=time.perf_counter)
    ended: bool = False
    batch_sessions: int = 0  # sessions in the batch when the prefill finished (the load the policy saw)

    def send(self, kind: str, payload: object = None) -> None:
        now = time.perf_counter()
        since, self.last_message = now - self.last_message, now
        if kind in ("done", "error"):
            self.ended = True
        self.notify(kind, payload, since)


class DecodeScheduler:
    """Owns the target's decode loop on one thread (see the module docstring).

    max_sessions: requests prefilling, waiting for their block size or decoding at once (the
    verifier's stream limit); capacity / max_capacity: tokens per pool row at first / at most;
    max_block_size: the widest block a session may verify; prefill_chunk_tokens: prompt tokens
    per prefill chunk; planners: threads that plan the sessions' steps in parallel (remote draft
    calls overlap; 0 = plan one after another); parallel_passes: on a batch-1 backend, target
    passes of different sessions run at once (about cores / threads per pass; 1 = in turn);
    load_aware: BatchDecoder's load-aware draft cap. on_iteration(batch sessions, tokens
    verified): called after each step (metrics)."""

    def __init__(self, target, *, max_sessions: int, capacity: int, max_capacity: int, max_block_size: int,
                 prefill_chunk_tokens: int = 512, planners: int = 0, parallel_passes: int = 1,
                 load_aware: bool = False, on_iteration: Callable[[int, int], None] | None = None,
                 threads: int | None = None, ragged: bool = True) -> None:
        if prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be >= 1, got {prefill_chunk_tokens}")
        self.target = target
        self.decoder = SpeculativeDecoder(target, None, max_context=target.config.max_position_embeddings)
        self._planner = ThreadPoolExecutor(max_workers=planners, thread_name_prefix="plan") if planners > 0 else None
        batched = ragged and supports_ragged_batch(target)
        if batched and hasattr(target, "prepare_ragged_batches"):
            target.prepare_ragged_batches(max_sessions)  # now, not mid-batch (see there)
        self._passes = (ThreadPoolExecutor(max_workers=parallel_passes, thread_name_prefix="pass")
                        if parallel_passes > 1 and not batched else None)
        self.batch = BatchDecoder(self.decoder, max_sessions=max_sessions, capacity=capacity, max_capacity=max_capacity,
                                  max_block_size=max_block_size, planner=self._planner, passes=self._passes,
                                  parallel_passes=parallel_passes, load_aware=load_aware, ragged=ragged)
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.on_iteration = on_iteration
        self.threads = threads
        self._cond = threading.Condition()
        self._incoming: deque[ScheduledRequest] = deque()
        self._prefilling: deque[ScheduledRequest] = deque()  # the scheduler thread's
        self._parked: list[ScheduledRequest] = []  # prefilled, waiting for decide()
        self._requests: set[ScheduledRequest] = set()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="decode-scheduler", daemon=True)
        self._thread.start()

    # ---- any thread -------------------------------------------------------------------------

    def submit(self, request: ScheduledRequest) -> None:
        with self._cond:
            if self._stop:
                raise AbortedError("the verifier is shutting down")
            self._incoming.append(request)
            self._cond.notify()

    def decide(self, request: ScheduledRequest, block_size: int) -> None:
        """The block size of a prefilled request; it starts at the next iteration."""
        with self._cond:
            request.block_size = block_size
            self._cond.notify()

    def cancel(self, request: ScheduledRequest) -> None:
        """End a request at the next iteration (its resources are freed there; "done" follows)."""
        with self._cond:
            request.cancelled = True
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)
        for pool in (self._planner, self._passes):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    # ---- the scheduler thread ------------------------------------------------------------------

    def _ready(self) -> bool:
        return bool(self._incoming or self._prefilling or self.batch.active
                    or any(r.block_size is not None or r.cancelled for r in self._parked)
                    or any(r.cancelled for r in self._requests))

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        while True:
            with self._cond:
                while not self._stop and not self._ready():
                    self._cond.wait()
                if self._stop:
                    break
                while self._incoming:
                    request = self._incoming.popleft()
                    self._requests.add(request)
                    self._prefilling.append(request)
            try:
                with torch.inference_mode():
                    self._iteration()
            except BaseException as err:  # noqa: BLE001 - an engine fault ends the requests it touched, not the loop
                log.exception("decode iteration failed")
                for request in list(self._requests):
                    self._fail(request, err)
        for request in list(self._requests):
            self._fail(request, AbortedError("the verifier shut down before the request finished"))

    def _iteration(self) -> None:
        for request in [r for r in self._requests if r.cancelled]:
            self._end(request)
        for request in [r for r in self._parked if r.block_size is not None]:
            self._parked.remove(request)
            self._start(request)
        if self._prefilling:
            request = self._prefilling[0]
            try:
                if self._prefill_chunk(request):
                    self._prefilling.popleft()
                    self._parked.append(request)
            except Exception as err:  # noqa: BLE001 - this request's bad input or state
                self._prefilling.popleft()
                self._fail(request, err)
        if self.batch.active:
            sessions = self.batch.active
            outcomes = self.batch.step()
            if self.on_iteration is not None:
                self.on_iteration(sessions, sum(o.drafted + 1 for _, o in outcomes if isinstance(o, StepEvent)))
            for session, outcome in outcomes:
                request = session.owner
                if isinstance(outcome, BaseException):
                    self._fail(request, outcome)
                    continue
                request.send("event", outcome)
                if session.finished:
                    self._end(request)

    def _prefill_chunk(self, request: ScheduledRequest) -> bool:
        """Prefill the request's next chunk; True when its prefill is complete (it is then parked
        until decide())."""
        cache, prompt = request.cache, request.prompt_ids
        if not request.prefill_started:
            request.prefill_started = time.perf_counter()
        layers = feature_layers_of(request.drafter, request.collect_features)
        if len(prompt) - cache.length > self.prefill_chunk_tokens:
            start = cache.length
            chunk = torch.tensor([prompt[start : start + self.prefill_chunk_tokens]], dtype=torch.long, device=self.target.device)
            # num_logits=1: every layer runs, so the cache is complete for the chunk.
            out = self.target(chunk, cache, num_logits=1, hidden_layer_ids=layers)
            if layers:
                request.chunk_features.append(out.hidden[0])
            return False
        prefix = request.prefix_features
        if request.chunk_features:
            parts = ([prefix] if prefix is not None and prefix.shape[0] else []) + request.chunk_features
            prefix = torch.cat(parts)
            request.chunk_features = []
        state, info = self.decoder.prefill(prompt, request.params, cache, request.result, prefix_features=prefix,
                                           collect_features=request.collect_features, lookup=request.lookup,
                                           drafter=request.drafter)
        request.result.ttft_s = time.perf_counter() - request.prefill_started
        request.state = state
        request.batch_sessions = self.batch.active
        request.send("prefilled", info)
        return True

    def _start(self, request: ScheduledRequest) -> None:
        state = request.state
        try:
            self.batch.check_width(request.block_size, state)
            event = self.decoder.start(state, request.block_size)
        except Exception as err:  # noqa: BLE001 - e.g. a block size the drafter cannot draft
            self._fail(request, err)
            return
        request.send("event", event)
        if state.finished:
            self._end(request)
            return
        self.decoder.open_drafting(state)
        try:
            request.session = self.batch.join(state, request.cache, keep_cache=request.keep_cache, owner=request,
                                              load_cap=request.load_cap)
        except Exception as err:  # noqa: BLE001 - no room for a request this long
            self._fail(request, err)

    def _end(self, request: ScheduledRequest, error: BaseException | None = None) -> None:
        """Free everything the request holds and send its last message (once)."""
        if request in self._prefilling:
            self._prefilling.remove(request)
        if request in self._parked:
            self._parked.remove(request)
        self._requests.discard(request)
        if request.session is not None:
            self.batch.release(request.session)  # keeps the row in request.cache when asked
            request.session = None
        elif request.state is not None:
            self.decoder.finish(request.state)
        if not request.ended:
            request.send("error", error) if error is not None else request.send("done")

    def _fail(self, request: ScheduledRequest, error: BaseException) -> None:
        try:
            self._end(request, error)
        except Exception:  # noqa: BLE001 - freeing after an engine fault must not stop the loop
            log.exception("freeing a failed request")
            request.ended = True
            request.notify("error", error, 0.0)
