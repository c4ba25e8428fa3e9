"""Speed-aware speculation: whether a session's draft pays for itself, alone or in a batch.

A step verifies N tokens (every session's anchor and draft) in one target pass of cost
pass_seconds(N). At batch 1 on a memory-bound engine a draft is nearly free; on an engine whose
matmuls cost grows with their rows (int4 on a CPU) or in a large batch, every drafted token costs
about as much as a committed one. Terms:
- committed: tokens a step commits (the acceptance length, bonus included);
- the others: the rest of the batch in its last step (O tokens verified, C committed); with this
  session's anchor the batch without its draft runs N0 = O + 1 tokens at the rate
  R = (C + 1) / pass_seconds(N0) tokens per second;
- a session's draft of d tokens adds pass_seconds(N0 + d) - pass_seconds(N0) seconds (plus
  draft_seconds, its drafter pass, which shares the machine) and commits (tau - 1) more tokens on
  average, tau being the session's mean acceptance length over its drafted steps, shrunk toward
  that of every session's drafted steps from the same source (as if the session had EVIDENCE more
  steps at the pooled mean: a few steps of one session say little, and a capped session only
  learns from its probes).
The draft pays iff its marginal rate beats the rate without it:
    (tau - 1) / (pass_seconds(N0 + d) - pass_seconds(N0) + draft_seconds) > R.
Alone (N0 = 1) that is tau > pass_seconds(1 + d) / pass_seconds(1) (plus the drafter's share).

Per-session passes (a backend that runs one pass per session, P of them at once on the cores)
share the machine rather than a pass: the iteration verifies every session's block in passes
that take S_o seconds for the others (measured in their last step) plus pass_seconds(1) for this
session's anchor, spread over P' = min(P, sessions) cores, so R = (C + 1) / ((S_o +
pass_seconds(1)) / P'); the draft adds pass_seconds(1 + d) - pass_seconds(1) of verify time (its
pass is the iteration's longest while every pass has a core of its own; divided by P' once
there are more passes than cores) and its drafter pass, which every session of the iteration
waits for. Alone (no others,
P' = 1) this is the rule above; with the cores busy a drafter pass costs the whole iteration.
Otherwise the
session verifies its anchor alone this step (block size 1, no lookup copy): the output is unchanged
(lossless either way), only the speed differs. Until a source has EVIDENCE drafted steps in all
(a handful says little: one rejected copy is tau 1) its drafts are given the benefit of the
doubt, so evidence builds up; a capped source is probed again
every few steps (SpeculationGate.PROBE_EVERY) so a session whose text turns repetitive can win its
drafts back. Beside other sessions a source that needs a drafter pass (DFlash) is not probed:
every session of the iteration would wait for that pass (with 16 sessions, about one probe per
iteration: measured, the default path fell to half of plain decoding's rate), and the pooled
evidence of every session already judges it; it comes back by itself when the load drops.

Seeded sampling (temperature > 0 with a seed) is never capped: the uniforms a sampled step draws
depend on its draft, so capping would make the same seed give other (equally valid) samples;
greedy outputs do not depend on drafts at all.

PassCostModel estimates pass_seconds(N) from the passes this machine runs: with the backend's
verify-cost curve (its shape measured when the graph was exported: exact at the small N where a
pad row makes it far from linear) scaled by the observed passes, else a least-squares line
fixed + per_token * N over a window of recent (N, seconds) pairs. Either way it is this machine's
cost, not an assumed one.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping


class PassCostModel:
    """pass_seconds(N), fitted on the last `window` passes. relative_cost: {k: cost of a k-token
    pass / a 1-token pass} (the backend's verify_cost), or None for a straight line."""

    def __init__(self, window: int = 64, relative_cost: Mapping[int, float] | None = None) -> None:
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)
        self.relative_cost = dict(relative_cost) if relative_cost else None

    def observe(self, tokens: int, seconds: float) -> None:
        self.samples.append((tokens, seconds))

    def fit(self) -> tuple[float, float] | None:
        """(fixed, per_token) of the straight line, or None until passes of two sizes were seen."""
        n = len(self.samples)
        if n < 2:
            return None
        mean_x = sum(x for x, _ in self.samples) / n
        mean_y = sum(y for _, y in self.samples) / n
        var = sum((x - mean_x) ** 2 for x, _ in self.samples)
        if var == 0:
            return None
        per_token = max(0.0, sum((x - mean_x) * (y - mean_y) for x, y in self.samples) / var)
        fixed = max(0.0, mean_y - per_token * mean_x)
        return fixed, per_token

    def curve(self, tokens: float) -> float:
        """relative_cost at `tokens` (a mean draft may be fractional): linear between its points,
        extended past its end along its last segment."""
        cost = self.relative_cost
        last = max(cost)
        if tokens >= last:
            slope = cost[last] - cost.get(last - 1, cost[last])
            return cost[last] + slope * (tokens - last)
        low = max(1, int(tokens))
        high = low + 1
        return cost[low] + (cost[high] - cost[low]) * (tokens - low)

    def pass_seconds(self) -> Callable[[int], float] | None:
        """N -> estimated seconds of an N-token pass, or None until there is enough to estimate."""
        if self.relative_cost is not None:
            if not self.samples:
                return None
            unit = statistics.median(seconds / self.curve(tokens) for tokens, seconds in self.samples)
            return lambda tokens: unit * self.curve(tokens)
        line = self.fit()
        if line is None:
            return None
        fixed, per_token = line
        return lambda tokens: fixed + per_token * tokens


@dataclass
class DraftRecord:
    """One session's drafted steps so far: steps, tokens drafted, tokens committed by them, and
    seconds spent in its drafter passes."""

    steps: int = 0
    drafted: float = 0
    committed: float = 0
    draft_seconds: float = 0.0
    capped_in_a_row: int = 0

    def add(self, drafted: int, committed: int, draft_seconds: float) -> None:
        if drafted > 0:
            self.steps += 1
            self.drafted += drafted
            self.committed += committed
            self.draft_seconds += draft_seconds

    @property
    def tau(self) -> float:
        return self.committed / self.steps if self.steps else 0.0

    @property
    def mean_draft(self) -> float:
        return self.drafted / self.steps if self.steps else 0.0

    @property
    def mean_draft_seconds(self) -> float:
        return self.draft_seconds / self.steps if self.steps else 0.0


@dataclass(frozen=True)
class Others:
    """The rest of a session's iteration in its last step: the tokens its other sessions committed
    and verified, and, for per-session passes, how many sessions, the seconds of their passes
    and how many passes run at once (parallel). pass_seconds None: they shared this session's
    pass (a ragged batch, or alone)."""

    committed: float = 0.0
    tokens: int = 0
    sessions: int = 0
    pass_seconds: float | None = None
    parallel: int = 1


ALONE = Others()


def draft_pays(record: DraftRecord, pass_seconds: Callable[[int], float] | None, others: Others = ALONE) -> bool:
    """Whether the session's next draft is worth its cost beside the rest of its iteration
    (`others`; see the module docstring)."""
    if pass_seconds is None or record.steps == 0:
        return True
    if others.pass_seconds is None:  # one pass shared with the others
        without = others.tokens + 1  # the others and this session's anchor
        seconds = pass_seconds(without)
        extra_verify = pass_seconds(without + record.mean_draft) - seconds
    else:  # passes of their own on `parallel` cores
        sessions = others.sessions + 1
        cores = max(1, min(others.parallel, sessions))
        anchor = pass_seconds(1)
        seconds = (others.pass_seconds + anchor) / cores
        extra_verify = pass_seconds(1 + record.mean_draft) - anchor
        if sessions > others.parallel:  # more passes than cores: the extra rows delay each core's share
            extra_verify /= cores
    rate_without = (others.committed + 1.0) / seconds if seconds > 0 else 0.0
    marginal_cost = extra_verify + record.mean_draft_seconds
    if marginal_cost <= 0:
        return True
    return (record.tau - 1.0) / marginal_cost > rate_without


class SpeculationGate:
    """Which draft sources each session may use on its next step (draft_pays per source), from
    the passes and drafted steps it is told about; one per decode loop (a batch, or one stream).

    allowed(records, ...) before planning a step; passed(tokens, seconds) after each target
    pass; drafted(records, source, ...) after each drafted step."""

    PROBE_EVERY = 16  # a capped source is tried again after this many capped steps in a row
    EVIDENCE = 8  # drafted steps (of every session) before a source is judged; the weight of the pooled mean

    def __init__(self, sources: Iterable[str], relative_cost: Mapping[int, float] | None = None,
                 drafter_sources: Iterable[str] = ("dflash",)) -> None:
        """drafter_sources: the sources whose drafts take a drafter pass (not probed beside others)."""
        self.costs = PassCostModel(relative_cost=relative_cost)
        self.drafter_sources = frozenset(drafter_sources)
        self.pooled = {source: DraftRecord() for source in sources}  # every session's drafted steps
        # costs.pass_seconds() as of the last pass: every session of a step prices with the same
        # estimate, fitted once per pass rather than once per session.
        self._estimate: Callable[[int], float] | None = None
        self._estimate_stale = True

    def new_records(self) -> dict[str, DraftRecord]:
        """A session's own drafted steps by source, for allowed() and drafted()."""
        return {source: DraftRecord() for source in self.pooled}

    def allowed(self, records: dict[str, DraftRecord], temperature: float, seed: int | None,
                others: Others = ALONE) -> frozenset[str] | None:
        """The draft sources that pay for this session now (None: all). others: the rest of its
        iteration in the last step (ALONE when there is none)."""
        if temperature > 0 and seed is not None:
            # Which uniforms a sampled step draws depends on its draft: a seeded request keeps
            # its drafts so the same seed gives the same tokens under any load.
            return None
        if self._estimate_stale:
            self._estimate, self._estimate_stale = self.costs.pass_seconds(), False
        pass_seconds = self._estimate
        if pass_seconds is None:
            return None
        allowed = set()
        alone = others.tokens == 0
        for source, record in records.items():
            pooled = self.pooled[source]
            judged = pooled.steps >= self.EVIDENCE
            probe = record.capped_in_a_row >= self.PROBE_EVERY and (alone or source not in self.drafter_sources)
            if not judged or draft_pays(self._shrunk(record, pooled), pass_seconds, others) or probe:
                record.capped_in_a_row = 0
                allowed.add(source)
            else:
                record.capped_in_a_row += 1
        return frozenset(allowed)

    def _shrunk(self, own: DraftRecord, pooled: DraftRecord) -> DraftRecord:
        """The session's record with EVIDENCE steps at the pooled means added (see the module docstring)."""
        weight = self.EVIDENCE
        return DraftRecord(steps=own.steps + weight, drafted=own.drafted + weight * pooled.mean_draft,
                           committed=own.committed + weight * pooled.tau,
                           draft_seconds=own.draft_seconds + weight * pooled.mean_draft_seconds)

    def passed(self, tokens: int, seconds: float) -> None:
        """One target pass verified `tokens` tokens in `seconds`."""
        self.costs.observe(tokens, seconds)
        self._estimate_stale = True

    def drafted(self, records: dict[str, DraftRecord], source: str, drafted: int, committed: int, draft_seconds: float) -> None:
        for record in (records[source], self.pooled[source]):
            record.add(drafted, committed, draft_seconds)
