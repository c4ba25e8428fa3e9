"""Many requests, one target pass per step: the loop's phases driven over a ragged batch.

SpeculativeDecoder.stream drives one request through prefill -> start -> plan_step / target pass /
commit_step. BatchDecoder drives the same phases for up to `max_sessions` requests at once; the
difference is the target pass. Each step it
  1. plans every active session's block (its own block size, its own draft source: prompt lookup,
     its own DFlash drafter session, or the anchor alone),
  2. runs ONE target forward over all blocks, their tokens packed ([1, N], N = the sum of the
     block sizes: no padding in the matmuls), each row against its own part of one preallocated
     cache pool (BatchKVCache: row r writes at its own length and sees only its own slots),
  3. projects the logits, then accepts, commits and rolls back per session (rollback = that row's
     length).

A session is admitted between steps (its prefill runs alone, on its own cache, which then is
copied into a free pool row: the caller may prefill in chunks and choose the block size in
between) and leaves as soon as it finishes or is released; the last row moves into the freed one
so the rows in use stay a prefix of the pool (a view per step, never a gather). Backends without
ragged batches run the same loop with one target pass per session.

Terms as in speculative.py. Lossless: each row's math is that row's alone; the batched GEMMs may
still round differently from a batch of one (fp32 blocking), which changes an output only at a near
tie of the target's top two logits (benchmarks/batch_decode.py measures how often).
"""

from __future__ import annotations

import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Sequence

import torch

from blockpilot.decoding.load_cap import ALONE, DraftRecord, Others, SpeculationGate
from blockpilot.decoding.lookup import LOOKUP_OFF, LookupConfig
from blockpilot.decoding.speculative import (GATE_SOURCES, BlockSizeHook, DecodeState, GenerationResult, SamplingParams,
                                             SpeculativeDecoder, StepEvent, StepPlan)
from blockpilot.errors import InvalidArgumentError, ResourceExhaustedError
from blockpilot.models.kv_cache import KVCache


@dataclass(eq=False)
class BatchSession:
    """A request in the batch: its decode state, its own target cache and, in a ragged batch, the
    pool row that cache lives in while the session is in the batch (the own cache is then stale
    until it leaves with keep_cache, which copies the row back). owner: the caller's handle."""

    state: DecodeState
    cache: KVCache
    row: int = -1
    keep_cache: bool = False
    owner: object | None = None
    load_cap: bool = True  # the load-aware cap may leave drafts out (False: the block size as given)
    # Load-aware cap: this session's drafted steps by draft source (see load_cap.py).
    drafts: dict[str, DraftRecord] = field(default_factory=dict)
    pending_draft_s: float = 0.0  # drafter seconds of the step being verified
    last_step: tuple[float, int] = (0.0, 0)  # (committed, verified tokens) of its last step, for the gate
    last_pass_s: float = 0.0  # per-session passes: seconds of its last pass, for the gate

    @property
    def result(self) -> GenerationResult:
        return self.state.result

    @property
    def finished(self) -> bool:
        return self.state.finished


StepOutcome = tuple[BatchSession, "StepEvent | BaseException"]


def supports_ragged_batch(target) -> bool:
    """Whether `target` runs many sequences' blocks in one pass (TargetModel.forward with a
    BatchKVCache); batch-1 graph backends do not."""
    return bool(getattr(target, "supports_ragged_batch", False))


class BatchDecoder:
    """Runs up to `max_sessions` requests against one target and their draft sources.

    A target that supports ragged batches (`supports_ragged_batch`: the torch engine, ONNX
    Runtime's fused graph) runs one packed pass per step over all sessions, each in a row of one
    BatchKVCache pool; any other backend (TensorRT and the portable ONNX graph: batch-1 graphs)
    runs one pass per session per step, each on the session's own cache, in the same loop.

    capacity: tokens per pool row at first; max_capacity: how far the pool may grow for a long
    request (default: capacity). A request needs prompt + max_new_tokens + 1 + max_block_size.
    max_block_size: the widest block any session may verify (its block size, or a lookup proposal
    plus its anchor). planner: an executor that plans the sessions' steps in parallel (a remote
    drafter's round trips overlap); None plans them one after another. passes: on a batch-1
    backend, an executor that runs the sessions' target passes in parallel (each on its own cache;
    ONNX Runtime releases the GIL, so passes on different cores overlap); None runs them in turn.
    parallel_passes: how many passes `passes` runs at once (its workers; the cap prices a draft
    by its share of the iteration).
    load_aware: a session drafts from a source only while its drafts pay for their cost in the
    pass it runs in (load_cap.py: measured pass costs, the session's own acceptance); a capped
    step verifies the anchor alone (same output) and is counted in result.capped_steps.
    """

    def __init__(self, decoder: SpeculativeDecoder, *, max_sessions: int, capacity: int, max_block_size: int = 16,
                 max_capacity: int | None = None, planner: Executor | None = None, passes: Executor | None = None,
                 parallel_passes: int = 1, load_aware: bool = False, ragged: bool = True) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.decoder = decoder
        self.target = decoder.target
        self.max_sessions = max_sessions
        self.max_block_size = max_block_size
        self.max_capacity = max(capacity, max_capacity or capacity)
        self.planner = planner
        self.passes = passes
        self.parallel_passes = max(1, parallel_passes) if passes is not None else 1
        self.ragged = ragged and supports_ragged_batch(self.target)
        # The cap prices a session's draft in the pass it shares (ragged: all sessions'; else a
        # pass of its own), shaped by the backend's verify-cost curve where it has one (the
        # matmuls' rows drive the cost).
        self.gate = SpeculationGate(GATE_SOURCES, getattr(self.target, "verify_cost", None)) if load_aware else None
        self._last_pass = (0.0, 0)  # ragged: (committed, verified tokens) of the last shared pass
        # Per-session passes: (sessions, committed, verified tokens, pass seconds) of the last iteration.
        self._last_iteration = (0, 0.0, 0, 0.0)
        self.pool = self.target.new_batch_cache(capacity, max_sessions) if self.ragged else None
        self.sessions: list[BatchSession] = []  # ragged: sessions[i].row == i

    @property
    def active(self) -> int:
        return len(self.sessions)

    def needed_capacity(self, prompt_len: int, params: SamplingParams) -> int:
        return prompt_len + params.max_new_tokens + 1 + self.max_block_size

    def check_admission(self, prompt_len: int, params: SamplingParams, lookup: LookupConfig = LOOKUP_OFF) -> None:
        """Raises ResourceExhaustedError / InvalidArgumentError when a request cannot join."""
        if self.active >= self.max_sessions:
            raise ResourceExhaustedError(f"the batch is full ({self.max_sessions} sessions)")
        need = self.needed_capacity(prompt_len, params)
        if need > self.max_capacity:
            raise ResourceExhaustedError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({params.max_new_tokens}) + block padding "
                f"({self.max_block_size}) exceed the batch's {self.max_capacity} tokens per session"
            )
        if lookup.enabled and lookup.max_tokens + 1 > self.max_block_size:
            raise InvalidArgumentError(
                f"lookup proposals of up to {lookup.max_tokens} tokens exceed the batch's widest block of {self.max_block_size}"
            )

    @torch.inference_mode()
    def admit(
        self, prompt_ids: Sequence[int], params: SamplingParams, block_size: int | BlockSizeHook, *,
        lookup: LookupConfig = LOOKUP_OFF, result: GenerationResult | None = None,
    ) -> tuple[BatchSession, StepEvent]:
        """Prefill a new request on its own cache and join it to the batch; returns it and its
        first token's event. A request finished by its first token does not join. block_size: a
        size, or a choice made from the prefill (PrefillInfo -> size, e.g. the policy's)."""
        self.check_admission(len(prompt_ids), params, lookup)
        if not callable(block_size):
            self.check_width(block_size)
        cache = self.target.new_cache(self.needed_capacity(len(prompt_ids), params))
        state, info = self.decoder.prefill(prompt_ids, params, cache, result, lookup=lookup)
        if callable(block_size):
            block_size = block_size(info)
            self.check_width(block_size, state)
        event = self.decoder.start(state, block_size)
        if state.finished:
            self.decoder.finish(state)
            return BatchSession(state, cache), event
        self.decoder.open_drafting(state)
        return self.join(state, cache), event

    def check_width(self, block_size: int, state: DecodeState | None = None) -> None:
        self.decoder.check_block_size(block_size, state.drafter if state is not None else "decoder")
        if block_size > self.max_block_size:
            raise InvalidArgumentError(f"block size {block_size} exceeds the batch's widest block of {self.max_block_size}")

    def join(self, state: DecodeState, cache: KVCache, *, keep_cache: bool = False, owner: object | None = None,
             load_cap: bool = True) -> BatchSession:
        """Add a request that was prefilled and started on its own cache (prefill, start,
        open_drafting) to the batch; a ragged batch copies the cache into a free pool row
        (growing the pool's rows when the request needs more room). keep_cache: when the session
        leaves (finished or released), its row is copied back into `cache`. load_cap: whether the
        load-aware cap applies to it (a block size the client fixed is honoured as given)."""
        if self.active >= self.max_sessions:
            raise ResourceExhaustedError(f"the batch is full ({self.max_sessions} sessions)")
        session = BatchSession(state, cache, keep_cache=keep_cache, owner=owner, load_cap=load_cap)
        if self.gate is not None:
            session.drafts = self.gate.new_records()
        if self.ragged:
            need = self.needed_capacity(state.prompt_len, state.params)
            if need > self.pool.capacity:
                if need > self.max_capacity:
                    raise ResourceExhaustedError(f"the request needs {need} tokens per session; the batch allows {self.max_capacity}")
                self.pool = self.pool.grown(min(self.max_capacity, max(need, 2 * self.pool.capacity)))
            session.row = self.active
            self.pool.load_row(session.row, cache)
        self.sessions.append(session)
        if self.ragged:
            self.pool.rows_in_use = self.active
        return session

    @torch.inference_mode()
    def step(self) -> list[StepOutcome]:
        """One step of every active session (one target pass when ragged). Returns each
        session's event, or the error that ended it (a failure of one session's draft source
        beyond the drafter fallback); finished and failed sessions leave the batch."""
        if not self.sessions:
            return []
        outcomes: list[StepOutcome] = []
        planned: list[tuple[BatchSession, StepPlan]] = []
        for session, plan in zip(list(self.sessions), self._plan()):
            if isinstance(plan, BaseException):
                outcomes.append((session, plan))
                self.release(session)
            else:
                planned.append((session, plan))
        if planned:
            outcomes += self._verify_ragged(planned) if self.ragged else self._verify_each(planned)
        for session in [s for s in self.sessions if s.finished]:
            self.release(session)
        return outcomes

    def _plan(self) -> list["StepPlan | BaseException"]:
        def plan(session: BatchSession):
            try:
                state = session.state
                params = state.params
                sources = (self.gate.allowed(session.drafts, params.temperature, params.seed, self._others(session),
                                             draft_sampling=params.draft_sampling)
                           if self.gate is not None and session.load_cap else None)
                before = state.result.phase_s["draft"]
                planned = self.decoder.plan_step(state, sources)
                if state.was_capped(sources, planned):
                    state.result.capped_steps += 1
                if planned.source:
                    session.pending_draft_s = state.result.phase_s["draft"] - before
                return planned
            except Exception as err:  # noqa: BLE001 - this session's failure, not the batch's
                return err

        if self.planner is None or self.active == 1:
            return [plan(s) for s in self.sessions]
        return list(self.planner.map(plan, self.sessions))

    def _verify_ragged(self, planned: list[tuple[BatchSession, StepPlan]]) -> list[StepOutcome]:
        # Failed sessions have left, so the planned ones are exactly the rows in use, in row order.
        decoder = self.decoder
        widths = [len(plan.tokens) for _, plan in planned]
        tokens = torch.zeros((len(planned), max(widths)), dtype=torch.long)
        for row, (_, plan) in enumerate(planned):
            tokens[row, : len(plan.tokens)] = torch.tensor(plan.tokens)
        # Every session of one batch reads the same feature layers (the drafter's), or none.
        layers = max((s.state.feature_layers for s, _ in planned), key=len)
        began = time.perf_counter()
        out = self.target(tokens.to(self.target.device), self.pool, num_logits=None, hidden_layer_ids=layers, row_widths=widths)
        logits = out.logits[0].split(widths)
        hiddens = out.hidden[0].split(widths) if out.hidden is not None else [None] * len(widths)
        passed = time.perf_counter() - began
        outcomes: list[StepOutcome] = []
        for (session, plan), row_logits, hidden in zip(planned, logits, hiddens):
            state = session.state
            state.result.phase_s["verify"] += passed
            event = decoder.commit_step(state, plan, row_logits, hidden if state.feature_layers else None)
            self.pool.set_length(session.row, state.cache_length)
            outcomes.append((session, event))
            session.last_step = (float(len(event.token_ids)), len(plan.tokens))
            if plan.kind and self.gate is not None:
                self.gate.drafted(session.drafts, plan.kind, event.drafted, len(event.token_ids), session.pending_draft_s)
        if self.gate is not None:
            self.gate.passed(sum(widths), passed)
            self._last_pass = (float(sum(len(e.token_ids) for _, e in outcomes)), sum(widths))
        return outcomes

    def _others(self, session: BatchSession) -> Others:
        """The rest of the session's iteration in the last step: the last shared pass less the
        session's own step in a ragged batch; with per-session passes, the other sessions' steps
        and the seconds of their passes (load_cap.Others)."""
        committed, tokens = session.last_step
        if self.ragged:
            shared_committed, shared_tokens = self._last_pass
            return Others(max(0.0, shared_committed - committed), max(0, shared_tokens - tokens))
        sessions, all_committed, all_tokens, seconds = self._last_iteration
        if sessions <= 1 or not session.last_pass_s:
            return ALONE
        return Others(max(0.0, all_committed - committed), max(0, all_tokens - tokens), sessions - 1,
                      max(0.0, seconds - session.last_pass_s), self.parallel_passes)

    def _verify_each(self, planned: list[tuple[BatchSession, StepPlan]]) -> list[StepOutcome]:
        @torch.inference_mode()
        def verify(item: tuple[BatchSession, StepPlan]) -> tuple[BatchSession, StepEvent, float]:
            session, plan = item
            state = session.state
            began = time.perf_counter()
            block = torch.tensor([plan.tokens], dtype=torch.long, device=self.target.device)
            out = self.target(block, session.cache, num_logits=None, hidden_layer_ids=state.feature_layers)
            passed = time.perf_counter() - began
            state.result.phase_s["verify"] += passed
            hidden = out.hidden[0] if out.hidden is not None else None
            event = self.decoder.commit_step(state, plan, out.logits[0], hidden)
            session.cache.truncate(state.cache_length)
            return session, event, passed

        if self.passes is None or len(planned) == 1:
            done = [verify(item) for item in planned]
        else:
            done = list(self.passes.map(verify, planned))
        if self.gate is not None:  # here, not in the pass threads: the records are shared
            for (session, event, passed), (_, plan) in zip(done, planned):
                self.gate.passed(len(plan.tokens), passed)
                session.last_step, session.last_pass_s = (float(len(event.token_ids)), len(plan.tokens)), passed
                if plan.kind:
                    self.gate.drafted(session.drafts, plan.kind, event.drafted, len(event.token_ids), session.pending_draft_s)
            self._last_iteration = (len(done), float(sum(len(e.token_ids) for _, e, _ in done)),
                                    sum(len(plan.tokens) for _, plan in planned), sum(passed for _, _, passed in done))
        return [(session, event) for session, event, _ in done]

    def release(self, session: BatchSession, *, keep_cache: bool = False) -> None:
        """Take a session out of the batch now (finished, cancelled or expired): its draft session
        closes, its row is reused at once (the last row moves into it). keep_cache (or the
        session's own flag): first copy its row into the session's own cache (a conversation's
        next turn reuses it)."""
        if session not in self.sessions:
            return
        self.decoder.finish(session.state)
        self.sessions.remove(session)
        if not self.ragged:
            return
        row = session.row
        if keep_cache or session.keep_cache:
            self.pool.store_row(row, session.cache)
        last_row = len(self.sessions)
        if row != last_row:
            last = self.sessions[-1]
            self.pool.move_row(last.row, row)
            last.row = row
            self.sessions.remove(last)
            self.sessions.insert(row, last)
        session.row = -1
        self.pool.rows_in_use = self.active

    def run(self, requests: Sequence[tuple[Sequence[int], SamplingParams, int | BlockSizeHook]], *,
            lookup: LookupConfig = LOOKUP_OFF) -> list[GenerationResult]:
        """Decode every request to the end, admitting the next as soon as a row is free."""
        results = [GenerationResult(prompt_token_ids=list(ids)) for ids, _, _ in requests]
        waiting = list(range(len(requests)))
        while waiting or self.sessions:
            while waiting and self.active < self.max_sessions:
                index = waiting.pop(0)
                ids, params, block_size = requests[index]
                self.admit(ids, params, block_size, lookup=lookup, result=results[index])
            for _, outcome in self.step():
                if isinstance(outcome, BaseException):
                    raise outcome
        return results
