"""Load-aware speculation: whether a session's draft pays for itself in the current batch.

A batch step verifies N tokens (every session's anchor and draft) in one target pass of cost
    pass_seconds(N) = fixed + per_token * N
(`fixed`: streaming the weights once, whatever N; `per_token`: the compute each token adds). At
batch 1 the fixed part dominates and a draft is nearly free; in a large batch the pass is
compute-bound and every drafted token costs as much as a committed one. Terms:
- committed: tokens a step commits (the acceptance length, bonus included);
- batch rate R = (sum of committed over the batch) / pass_seconds(N): tokens per second now;
- a session's draft of d tokens adds per_token * d seconds (plus draft_seconds, its drafter pass,
  which shares the machine) and commits (tau - 1) more tokens on average, tau being the session's
  own mean acceptance length over its drafted steps (until it has a few, that of every session's
drafts from the same source in the batch).
The draft pays iff its marginal rate beats the batch's:
    (tau - 1) / (per_token * d + draft_seconds) > R.
Otherwise the session verifies its anchor alone this step (block size 1, no lookup copy): the
output is unchanged (lossless either way), only the speed differs. Without any evidence (the batch's
first drafts from a source) a draft is given the benefit of the doubt, so evidence builds up; a
capped source is probed again every few steps (BatchDecoder.PROBE_EVERY) so a session whose text
turns repetitive can win its drafts back.

Seeded sampling (temperature > 0 with a seed) is never capped: the uniforms a sampled step draws
depend on its draft, so capping by load would make the same seed give other (equally valid)
samples; greedy outputs do not depend on drafts at all.

PassCostModel fits fixed and per_token online from the passes the batch runs (least squares over a
window of recent (N, seconds) pairs), so it is this machine's cost, not an assumed one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


class PassCostModel:
    """pass_seconds(N) = fixed + per_token * N, fitted on the last `window` passes."""

    def __init__(self, window: int = 64) -> None:
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)

    def observe(self, tokens: int, seconds: float) -> None:
        self.samples.append((tokens, seconds))

    def fit(self) -> tuple[float, float] | None:
        """(fixed, per_token), or None until passes of at least two sizes were seen."""
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


def draft_pays(record: DraftRecord, cost: tuple[float, float] | None, batch_committed: float, batch_tokens: int) -> bool:
    """Whether the session's next draft is worth its cost in a batch whose last step committed
    `batch_committed` tokens over `batch_tokens` verified (see the module docstring)."""
    if cost is None or record.steps == 0 or batch_tokens == 0:
        return True
    fixed, per_token = cost
    pass_seconds = fixed + per_token * batch_tokens
    batch_rate = batch_committed / pass_seconds if pass_seconds > 0 else 0.0
    marginal_cost = per_token * record.mean_draft + record.mean_draft_seconds
    if marginal_cost <= 0:
        return True
    return (record.tau - 1.0) / marginal_cost > batch_rate
