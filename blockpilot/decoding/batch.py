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

A session is admitted between steps (its prefill runs alone, into a free pool row) and leaves as
soon as it finishes or is released; the last row moves into the freed one so the rows in use stay
a prefix of the pool (a view per step, never a gather).

Terms as in speculative.py. Lossless: each row's math is that row's alone; the batched GEMMs may
still round differently from a batch of one (fp32 blocking), which changes an output only at a near
tie of the target's top two logits (benchmarks/batch_decode.py measures how often).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from blockpilot.decoding.lookup import LOOKUP_OFF, LookupConfig
from blockpilot.decoding.speculative import BlockSizeHook, DecodeState, GenerationResult, SamplingParams, SpeculativeDecoder, StepEvent
from blockpilot.errors import InvalidArgumentError, ResourceExhaustedError


@dataclass(eq=False)
class BatchSession:
    """A request in the batch: its decode state and the pool row its target cache is."""

    state: DecodeState
    row: int

    @property
    def result(self) -> GenerationResult:
        return self.state.result

    @property
    def finished(self) -> bool:
        return self.state.finished


class BatchDecoder:
    """Runs up to `max_sessions` requests against one target (torch backend) and optional drafter.

    capacity: tokens per pool row; a request needs prompt + max_new_tokens + 1 plus room for the
    padding of the widest block in the batch. max_block_size: the widest block any session may
    verify (its block size, or a lookup proposal + its anchor); admission checks both.
    """

    def __init__(self, decoder: SpeculativeDecoder, *, max_sessions: int, capacity: int, max_block_size: int = 16) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.decoder = decoder
        self.target = decoder.target
        self.max_block_size = max_block_size
        self.pool = self.target.new_batch_cache(capacity, max_sessions)
        self.sessions: list[BatchSession] = []  # sessions[i].row == i

    @property
    def active(self) -> int:
        return len(self.sessions)

    @torch.inference_mode()
    def admit(
        self, prompt_ids: Sequence[int], params: SamplingParams, block_size: int | BlockSizeHook, *,
        lookup: LookupConfig = LOOKUP_OFF, result: GenerationResult | None = None,
    ) -> tuple[BatchSession, StepEvent]:
        """Prefill a new request into a free row; returns it and its first token's event. A
        request finished by its first token is not kept in the batch. block_size: a size, or a
        choice made from the prefill (PrefillInfo -> size, e.g. the policy's)."""
        if self.active >= self.pool.max_rows:
            raise ResourceExhaustedError(f"the batch is full ({self.pool.max_rows} sessions)")
        need = len(prompt_ids) + params.max_new_tokens + 1 + self.max_block_size
        if need > self.pool.capacity:
            raise ResourceExhaustedError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) + block padding "
                f"({self.max_block_size}) exceed the batch's {self.pool.capacity} tokens per session"
            )
        if lookup.enabled and lookup.max_tokens + 1 > self.max_block_size:
            raise InvalidArgumentError(
                f"lookup proposals of up to {lookup.max_tokens} tokens exceed the batch's widest block of {self.max_block_size}"
            )
        if not callable(block_size):
            self._check_width(block_size)
        row = self.active
        self.pool.set_length(row, 0)
        view = self.pool.row(row)
        state, info = self.decoder.prefill(prompt_ids, params, view, result, lookup=lookup)
        self.pool.set_length(row, view.length)
        if callable(block_size):
            block_size = block_size(info)
            self._check_width(block_size)
        event = self.decoder.start(state, block_size)
        session = BatchSession(state, row)
        if state.finished:
            self.decoder.finish(state)
            return session, event
        self.decoder.open_drafting(state)
        self.sessions.append(session)
        self.pool.rows_in_use = self.active
        return session, event

    def _check_width(self, block_size: int) -> None:
        self.decoder.check_block_size(block_size)
        if block_size > self.max_block_size:
            raise InvalidArgumentError(f"block size {block_size} exceeds the batch's widest block of {self.max_block_size}")

    @torch.inference_mode()
    def step(self) -> list[tuple[BatchSession, StepEvent]]:
        """One step of every active session (one target pass); finished sessions leave the batch."""
        if not self.sessions:
            return []
        decoder = self.decoder
        plans = [decoder.plan_step(s.state) for s in self.sessions]
        widths = [len(plan.tokens) for plan in plans]
        width = max(widths)
        tokens = torch.zeros((len(plans), width), dtype=torch.long)
        for row, plan in enumerate(plans):
            tokens[row, : len(plan.tokens)] = torch.tensor(plan.tokens)
        # Every session of one decoder reads the same feature layers (the drafter's), or none.
        layers = max((s.state.feature_layers for s in self.sessions), key=len)
        began = time.perf_counter()
        out = self.target(tokens.to(self.target.device), self.pool, num_logits=0, hidden_layer_ids=layers, row_widths=widths)
        logits = self.target.logits(out.final_state[0]).split(widths)
        hiddens = out.hidden[0].split(widths) if out.hidden is not None else [None] * len(widths)
        passed = time.perf_counter() - began
        events = []
        for row, (session, plan) in enumerate(zip(self.sessions, plans)):
            state = session.state
            state.result.phase_s["verify"] += passed
            hidden = hiddens[row] if state.feature_layers else None
            event = decoder.commit_step(state, plan, logits[row], hidden)
            self.pool.set_length(row, state.cache_length)
            events.append((session, event))
        for session in [s for s in self.sessions if s.finished]:
            self.release(session)
        return events

    def release(self, session: BatchSession) -> None:
        """Take a session out of the batch now (finished, cancelled or expired): its draft session
        closes, its row is reused at once (the last row moves into it)."""
        if session not in self.sessions:
            return
        self.decoder.finish(session.state)
        row = session.row
        last = self.sessions.pop()
        if last is not session:
            self.pool.move_row(last.row, row)
            last.row = row
            self.sessions[row] = last
        self.pool.rows_in_use = self.active

    def run(self, requests: Sequence[tuple[Sequence[int], SamplingParams, int | BlockSizeHook]], *,
            lookup: LookupConfig = LOOKUP_OFF) -> list[GenerationResult]:
        """Decode every request to the end, admitting the next as soon as a row is free."""
        results = [GenerationResult(prompt_token_ids=list(ids)) for ids, _, _ in requests]
        waiting = list(range(len(requests)))
        while waiting or self.sessions:
            while waiting and self.active < self.pool.max_rows:
                index = waiting.pop(0)
                ids, params, block_size = requests[index]
                self.admit(ids, params, block_size, lookup=lookup, result=results[index])
            self.step()
        return results
