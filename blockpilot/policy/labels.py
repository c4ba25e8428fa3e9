"""Training data of the predictor: one feature row and one label per prompt of a sweep.

Label rules (metadata.LABEL_RULES):
- max_tau: the candidate with the highest τ (the released BlockPilot code's rule,
  research/papers.md §1: files scanned in ascending block size with a strict `>`, so ties go to
  the smaller size);
- max_tokens_per_s: the candidate with the highest decode tokens/s (measured or cost-modelled on
  the sweep's machine), ties likewise to the smaller size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from blockpilot.errors import InvalidArgumentError
from blockpilot.policy.metadata import LABEL_RULES
from blockpilot.policy.sweep import BASELINE_BLOCK_SIZE, Sweep

RULE_METRIC = {"max_tau": "tau", "max_tokens_per_s": "decode_tokens_per_s"}


def check_rule(rule: str) -> str:
    if rule not in LABEL_RULES:
        raise InvalidArgumentError(f"label rule must be one of {LABEL_RULES}, got {rule!r}")
    return rule


def best_index(values: Sequence[float]) -> int:
    """Index of the largest value; ties (equal up to float rounding) go to the lowest index."""
    best = 0
    for i, value in enumerate(values):
        if value > values[best] and not math.isclose(value, values[best], rel_tol=1e-12, abs_tol=0.0):
            best = i
    return best


def label_index(by_size: Mapping[int, Mapping], candidates: Sequence[int], rule: str) -> int:
    """The label of one prompt: an index into `candidates`. by_size maps block size -> sweep record."""
    metric = RULE_METRIC[check_rule(rule)]
    missing = [c for c in candidates if c not in by_size]
    if missing:
        raise InvalidArgumentError(f"the sweep has no records at block sizes {missing}")
    return best_index([float(by_size[c][metric]) for c in candidates])


@dataclass
class PolicyData:
    """Per prompt (rows): id, dataset, the feature row, the label and the metrics at every
    candidate (τ, decode tokens/s) plus the autoregressive baseline's decode tokens/s."""

    ids: list[str]
    datasets: list[str]
    features: np.ndarray  # [N, D] float32
    labels: np.ndarray  # [N] int64 index into candidates
    tau: np.ndarray  # [N, C]
    tokens_per_s: np.ndarray  # [N, C]
    baseline_tokens_per_s: np.ndarray  # [N]
    candidates: tuple[int, ...]
    rule: str

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows: Sequence[int] | np.ndarray) -> "PolicyData":
        rows = np.asarray(rows, dtype=np.int64)
        return PolicyData([self.ids[i] for i in rows], [self.datasets[i] for i in rows], self.features[rows],
                          self.labels[rows], self.tau[rows], self.tokens_per_s[rows], self.baseline_tokens_per_s[rows],
                          self.candidates, self.rule)

    def values(self) -> np.ndarray:
        """[N, C] the metric the label rule maximizes."""
        return self.tau if self.rule == "max_tau" else self.tokens_per_s


def policy_data(sweep: Sweep, kind: str, rule: str, candidates: Sequence[int] | None = None) -> PolicyData:
    """Rows for every prompt of the sweep with at least one decode step (a prompt whose first token
    ends the reply ties at every size and teaches nothing)."""
    check_rule(rule)
    candidates = tuple(candidates or sweep.candidates)
    missing = [c for c in candidates if c not in sweep.block_sizes]
    if missing:
        raise InvalidArgumentError(f"candidates {missing} were not swept (the sweep has {list(sweep.block_sizes)})")
    features = sweep.features(kind)
    keep = [p for p in sweep.prompts if p["by_size"][BASELINE_BLOCK_SIZE]["steps"] > 0]
    if not keep:
        raise InvalidArgumentError(f"the sweep at '{sweep.directory}' has no prompt with a decode step")
    rows = np.array([p["feature_row"] for p in keep], dtype=np.int64)
    return PolicyData(
        ids=[p["id"] for p in keep],
        datasets=[p["dataset"] for p in keep],
        features=np.asarray(features[rows], dtype=np.float32),
        labels=np.array([label_index(p["by_size"], candidates, rule) for p in keep], dtype=np.int64),
        tau=np.array([[p["by_size"][c]["tau"] for c in candidates] for p in keep], dtype=np.float64),
        tokens_per_s=np.array([[p["by_size"][c]["decode_tokens_per_s"] for c in candidates] for p in keep], dtype=np.float64),
        baseline_tokens_per_s=np.array([_baseline_tokens_per_s(p["by_size"][BASELINE_BLOCK_SIZE]) for p in keep], dtype=np.float64),
        candidates=candidates,
        rule=rule,
    )


def _baseline_tokens_per_s(record: Mapping) -> float:
    """Plain autoregressive decode tokens/s of a prompt (see the sweep's baseline_decode_s)."""
    seconds = float(record.get("baseline_decode_s", record["decode_s"]))
    return record["tokens"] / seconds if seconds > 0 else 0.0
