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
  that of every session's recent drafted steps from the same source (as if the session had
  EVIDENCE more steps at the pooled mean: a few steps of one session say little, and a capped
  session only learns from its probes). The pooled record forgets: each drafted step weighs
  1 - 1/POOLED_MEMORY of the one after it, so a source judged on a bad start (a drafter's first
  steps of a response are its worst) is judged again on what its probes find later; a session's
  own record forgets faster (SESSION_MEMORY), following the part of the response it is in.
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
drafts back. A probe stays due until the source really drafts: a DFlash probe on a step that a
lookup copy wins is not used up (measured on a Zen 3: otherwise lookup took nearly every probe, and
DFlash, judged on its first 8 steps, never came back although its drafts paid by a third). Beside other sessions a source that needs a drafter pass (DFlash) is not probed:
every session of the iteration would wait for that pass (with 16 sessions, about one probe per
iteration: measured, the default path fell to half of plain decoding's rate), and the pooled
evidence of every session already judges it; it comes back by itself when the load drops.
The sources the gate judges are the decoding loop's GATE_SOURCES: the drafter, and prompt lookup's
copies and corpus guesses apart (one-token guesses where the text has nothing to copy pay or not
on other terms than multi-token copies; judged as one, either could cap the other).

Seeded sampling with the min(1, p/q) rule (draft_sampling "sample") is never capped: its tokens
depend on the drafts, so capping would make the same seed give other (equally valid) samples.
Greedy outputs do not depend on drafts at all, and neither do seeded samples accepted by
sample-and-match (the default): their uniforms are addressed by output position
(acceptance.PositionalUniforms), so a capped step commits the very token a drafted one would.

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
    """pass_seconds(N), from the passes this machine ran. relative_cost: {k: cost of a k-token
    pass / a 1-token pass} (the backend's verify_cost), or None for a straight line fitted on the
    last `window` passes. Where at least OWN_MEDIAN_AFTER passes of one size were seen, their
    median (of the last `per_size_window`) is that size's estimate: the exported curve's shape was
    measured once, at export time, and can be off where it matters most (measured on an AMD Zen 3:
    the curve said a 2-token pass costs 1.20 x a 1-token one, the passes while decoding 1.06 x,
    which priced a one-token DFlash draft out although it paid)."""

    OWN_MEDIAN_AFTER = 8

    def __init__(self, window: int = 64, relative_cost: Mapping[int, float] | None = None,
                 per_size_window: int = 32) -> None:
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)
        self.relative_cost = dict(relative_cost) if relative_cost else None
        self.per_size_window = per_size_window
        self.by_size: dict[int, deque[float]] = {}

    def observe(self, tokens: int, seconds: float) -> None:
        self.samples.append((tokens, seconds))
        self.by_size.setdefault(tokens, deque(maxlen=self.per_size_window)).append(seconds)

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

    def pass_seconds(self) -> Callable[[float], float] | None:
        """N -> estimated seconds of an N-token pass (N may be fractional: a mean draft), or None
        until there is enough to estimate."""
        if self.relative_cost is not None:
            if not self.samples:
                return None
            unit = statistics.median(seconds / self.curve(tokens) for tokens, seconds in self.samples)
            shape = lambda tokens: unit * self.curve(tokens)  # noqa: E731
        else:
            line = self.fit()
            if line is None:
                return None
            fixed, per_token = line
            shape = lambda tokens: fixed + per_token * tokens  # noqa: E731
        measured = {size: statistics.median(seconds) for size, seconds in self.by_size.items()
                    if len(seconds) >= self.OWN_MEDIAN_AFTER}
        if not measured:
            return shape

        def point(size: int) -> float:
            return measured[size] if size in measured else shape(size)

        def estimate(tokens: float) -> float:
            low = max(1, int(tokens))
            fraction = tokens - low
            return point(low) if fraction <= 0 else point(low) * (1 - fraction) + point(low + 1) * fraction
        return estimate


@dataclass
class DraftRecord:
    """One session's drafted steps so far: steps, tokens drafted, tokens committed by them, and
    seconds spent in its drafter passes."""

    steps: float = 0  # (weighted, in a record that forgets)
    drafted: float = 0
    committed: float = 0
    draft_seconds: float = 0.0
    capped_in_a_row: int = 0
    seen: int = 0  # drafted steps ever added (never forgotten)

    def add(self, drafted: int, committed: int, draft_seconds: float, *, keep: float = 1.0) -> None:
        """One drafted step; keep < 1 first scales the earlier steps down (a record that forgets)."""
        if drafted > 0:
            self.seen += 1
            self.steps = self.steps * keep + 1
            self.drafted = self.drafted * keep + drafted
            self.committed = self.committed * keep + committed
            self.draft_seconds = self.draft_seconds * keep + draft_seconds

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
    POOLED_MEMORY = 64  # drafted steps the pooled record remembers (older ones fade)
    SESSION_MEMORY = 32  # drafted steps a session's own record remembers

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

    def check_sources(self, sources: Iterable[str]) -> None:
        """Refuse a gate that keeps no record for one of the decoding loop's sources (made for
        another loop), before it is asked about a draft it cannot judge."""
        missing = sorted(set(sources) - set(self.pooled))
        if missing:
            raise ValueError(f"this speed gate keeps no record of draft sources {missing} (it judges {sorted(self.pooled)}): "
                             f"make it with the decoder's speed_gate()")

    def new_records(self) -> dict[str, DraftRecord]:
        """A session's own drafted steps by source, for allowed() and drafted()."""
        return {source: DraftRecord() for source in self.pooled}

    def allowed(self, records: dict[str, DraftRecord], temperature: float, seed: int | None,
                others: Others = ALONE, *, draft_sampling: str = "greedy") -> frozenset[str] | None:
        """The draft sources that pay for this session now (None: all). others: the rest of its
        iteration in the last step (ALONE when there is none)."""
        if temperature > 0 and seed is not None and draft_sampling == "sample":
            # The p/q rule's tokens depend on the draft: a seeded request keeps its drafts so the
            # same seed gives the same tokens under any load.
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
            judged = pooled.seen >= self.EVIDENCE
            probe = record.capped_in_a_row >= self.PROBE_EVERY and (alone or source not in self.drafter_sources)
            if not judged or draft_pays(self._shrunk(record, pooled), pass_seconds, others):
                record.capped_in_a_row = 0
                allowed.add(source)
            elif probe:  # due until the source drafts (drafted() ends it)
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
        own = records[source]
        own.add(drafted, committed, draft_seconds, keep=1.0 - 1.0 / self.SESSION_MEMORY)
        own.capped_in_a_row = 0  # a probe, if one was due, is used up
        self.pooled[source].add(drafted, committed, draft_seconds, keep=1.0 - 1.0 / self.POOLED_MEMORY)
