"""Speed-aware speculation: whether a session's draft pays for itself, alone or in a batch.

A step verifies N tokens (every session's anchor and draft) in one target pass of cost
pass_seconds(N). At batch 1 on a memory-bound engine a draft is nearly free; on an engine whose
matmuls cost grows with their rows (int4 on a CPU) or in a large batch, every drafted token costs
about as much as a committed one. Terms:
- committed: tokens a step commits (the acceptance length, bonus included);
- batch rate R = (sum of committed over the batch) / pass_seconds(N): tokens per second now;
- a session's draft of d tokens adds pass_seconds(N) - pass_seconds(N - d) seconds (plus
  draft_seconds, its drafter pass, which shares the machine) and commits (tau - 1) more tokens on
  average, tau being the session's own mean acceptance length over its drafted steps (until it has
  a few, that of every drafted step from the same source so far).
The draft pays iff its marginal rate beats the batch's:
    (tau - 1) / (pass_seconds(N) - pass_seconds(N - d) + draft_seconds) > R.
(Beating the rate with the draft is the same as beating the rate without it.) Alone (N = 1 + d)
that is tau > pass_seconds(1 + d) / pass_seconds(1) (plus the drafter's share). Otherwise the
session verifies its anchor alone this step (block size 1, no lookup copy): the output is unchanged
(lossless either way), only the speed differs. Without any evidence (the first drafts from a source)
a draft is given the benefit of the doubt, so evidence builds up; a capped source is probed again
every few steps (SpeculationGate.PROBE_EVERY) so a session whose text turns repetitive can win its
drafts back.

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

    def curve(self, tokens: int) -> float:
        """relative_cost at `tokens`, extended past its end along its last segment."""
        cost = self.relative_cost
        if tokens in cost:
            return cost[tokens]
        last = max(cost)
        slope = cost[last] - cost.get(last - 1, cost[last])
        return cost[last] + slope * (tokens - last)

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
    drafted: int = 0
    committed: int = 0
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


def draft_pays(record: DraftRecord, pass_seconds: Callable[[int], float] | None, batch_committed: float,
               batch_tokens: int) -> bool:
    """Whether the session's next draft is worth its cost in a batch whose last step committed
    `batch_committed` tokens over `batch_tokens` verified (see the module docstring)."""
    if pass_seconds is None or record.steps == 0 or batch_tokens == 0:
        return True
    now = pass_seconds(batch_tokens)
    batch_rate = batch_committed / now if now > 0 else 0.0
    drafted = record.mean_draft
    without = max(1.0, batch_tokens - drafted)  # the batch's tokens without this draft
    marginal_cost = pass_seconds(without + drafted) - pass_seconds(without) + record.mean_draft_seconds
    if marginal_cost <= 0:
        return True
    return (record.tau - 1.0) / marginal_cost > batch_rate


class SpeculationGate:
    """Which draft sources each session may use on its next step (draft_pays per source), from
    the passes and drafted steps it is told about; one per decode loop (a batch, or one stream).

    allowed(records, params) before planning a step; passed(tokens, seconds, committed) after each
    target pass; drafted(records, source, ...) after each drafted step."""

    PROBE_EVERY = 16  # a capped source is tried again after this many capped steps in a row
    OWN_EVIDENCE = 3  # drafted steps of its own before a session is judged by them (before: all sessions')

    def __init__(self, sources: Iterable[str], relative_cost: Mapping[int, float] | None = None) -> None:
        self.costs = PassCostModel(relative_cost=relative_cost)
        self.pooled = {source: DraftRecord() for source in sources}  # every session's drafted steps
        self._last_step = (0.0, 0)  # (committed, verified tokens) of the last pass

    def new_records(self) -> dict[str, DraftRecord]:
        """A session's own drafted steps by source, for allowed() and drafted()."""
        return {source: DraftRecord() for source in self.pooled}

    def allowed(self, records: dict[str, DraftRecord], temperature: float, seed: int | None) -> frozenset[str] | None:
        """The draft sources that pay for this session now (None: all)."""
        if temperature > 0 and seed is not None:
            # Which uniforms a sampled step draws depends on its draft: a seeded request keeps
            # its drafts so the same seed gives the same tokens under any load.
            return None
        pass_seconds = self.costs.pass_seconds()
        if pass_seconds is None:
            return None
        committed, tokens = self._last_step
        allowed = set()
        for source, record in records.items():
            # A new session is judged by what drafts from this source have done so far.
            evidence = record if record.steps >= self.OWN_EVIDENCE else self.pooled[source]
            if draft_pays(evidence, pass_seconds, committed, tokens) or record.capped_in_a_row >= self.PROBE_EVERY:
                record.capped_in_a_row = 0
                allowed.add(source)
            else:
                record.capped_in_a_row += 1
        return frozenset(allowed)

    def passed(self, tokens: int, seconds: float, committed: float) -> None:
        """One target pass verified `tokens` tokens in `seconds`, committing `committed`."""
        self.costs.observe(tokens, seconds)
        self._last_step = (committed, tokens)

    def drafted(self, records: dict[str, DraftRecord], source: str, drafted: int, committed: int, draft_seconds: float) -> None:
        for record in (records[source], self.pooled[source]):
            record.add(drafted, committed, draft_seconds)
