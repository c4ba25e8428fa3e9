"""`blockpilot policy train`: sweep -> labels -> model selection -> predictor -> published version.

1. Labels from the sweep (labels.py), one row per prompt.
2. Split by prompt, per dataset: a held-out share that nothing below sees until the end.
3. Model selection on the training rows only: every configuration of the grid (feature kind x
   width x rank) that fits the size budget is cross-validated; the best mean objective (the label
   rule's metric at the decided sizes relative to each prompt's best) wins.
4. The chosen configuration is trained on all training rows and measured once on the held-out
   rows: accuracy, ±1 accuracy, confusion matrix, τ and tokens/s at the decided sizes next to the
   default size, the best fixed size and the oracle.
5. That network is exported to ONNX and published with its metadata (export.py).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from blockpilot.errors import InvalidArgumentError
from blockpilot.policy.export import DEFAULT_MAX_BYTES, next_version, publish
from blockpilot.policy.labels import PolicyData, check_rule, policy_data
from blockpilot.policy.metadata import FEATURE_KINDS, PolicyMetadata
from blockpilot.policy.predictor import (
    PredictorConfig, decision_metrics, objective, select_config, split_by_prompt, train_predictor,
)
from blockpilot.policy.sweep import feature_file, file_sha256, load_sweep

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainPolicyConfig:
    """name / version: where the policy is published (version None = the next free one).
    label_rule: metadata.LABEL_RULES. feature_kinds / widths / ranks: the selection grid (ranks
    apply to last_logits only). holdout_fraction: share of prompts held out per dataset.
    folds: cross-validation folds for the selection (1 = no selection: the grid must hold one
    configuration). base: every other predictor setting (epochs, lr, dropout, top_k, ...)."""

    name: str
    version: int | None = None
    label_rule: str = "max_tau"
    feature_kinds: tuple[str, ...] = FEATURE_KINDS
    widths: tuple[int, ...] = (64, 256)
    ranks: tuple[int, ...] = (32,)
    holdout_fraction: float = 0.2
    folds: int = 4
    seed: int = 0
    max_bytes: int = DEFAULT_MAX_BYTES
    base: PredictorConfig = PredictorConfig("final_hidden")

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise InvalidArgumentError(f"policy name must be a plain folder name, got {self.name!r}")
        if self.version is not None and (not isinstance(self.version, int) or self.version < 1):
            raise InvalidArgumentError(f"version must be a positive integer, got {self.version!r}")
        check_rule(self.label_rule)
        if not self.feature_kinds or any(k not in FEATURE_KINDS for k in self.feature_kinds):
            raise InvalidArgumentError(f"feature kinds must be among {FEATURE_KINDS}, got {list(self.feature_kinds)!r}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise InvalidArgumentError(f"widths must be >= 1, got {list(self.widths)!r}")
        if not self.ranks or any(r < 0 for r in self.ranks):
            raise InvalidArgumentError(f"ranks must be >= 0, got {list(self.ranks)!r}")
        if self.folds < 1:
            raise InvalidArgumentError(f"folds must be >= 1, got {self.folds!r}")
        if self.max_bytes < 1:
            raise InvalidArgumentError(f"max_bytes must be >= 1, got {self.max_bytes!r}")

    def grid(self) -> list[PredictorConfig]:
        configs = []
        for kind in self.feature_kinds:
            for width in self.widths:
                ranks = self.ranks if kind == "last_logits" else (self.base.rank,)
                for rank in ranks:
                    configs.append(replace(self.base, feature_kind=kind, width=width, rank=rank, seed=self.seed))
        return configs


def train_policy(sweep_dir: Path, repository: Path, cfg: TrainPolicyConfig, *, progress: bool = True) -> dict:
    """Train, measure and publish; returns a summary (the version folder and the metrics)."""
    started = time.perf_counter()
    sweep = load_sweep(sweep_dir)
    if not sweep.prompts:
        raise InvalidArgumentError(f"the sweep at '{sweep_dir}' holds no complete prompt")
    data_by_kind: dict[str, PolicyData] = {kind: policy_data(sweep, kind, cfg.label_rule) for kind in cfg.feature_kinds}
    reference = data_by_kind[cfg.feature_kinds[0]]
    train_rows, held_rows = split_by_prompt(reference, cfg.holdout_fraction, cfg.seed)
    train_by_kind = {kind: data.subset(train_rows) for kind, data in data_by_kind.items()}
    grid = cfg.grid()

    def report(row: dict) -> None:
        if progress:
            print(f"policy train: {json.dumps(row)}", file=sys.stderr, flush=True)

    if cfg.folds > 1 and len(grid) > 1:
        selection = select_config(grid, train_by_kind, cfg.folds, cfg.seed, cfg.max_bytes, progress=report)
        chosen, table = selection.chosen, selection.table
    elif len(grid) == 1:
        chosen, table = grid[0], []
    else:
        raise InvalidArgumentError(f"{len(grid)} configurations and folds=1: choose one (or cross-validate with folds >= 2)")

    data = data_by_kind[chosen.feature_kind]
    train, held = data.subset(train_rows), data.subset(held_rows)
    net, losses = train_predictor(chosen, train)
    candidates = data.candidates
    trained_size = int(sweep.manifest["drafter_block_size"])
    default_index = candidates.index(trained_size) if trained_size in candidates else None
    best_fixed = int(np.argmax(train.values().mean(axis=0)))
    decided = net.predict(held.features)
    holdout = decision_metrics(decided, held, default_index, best_fixed)
    holdout["objective"] = objective(decided, held)
    train_metrics = decision_metrics(net.predict(train.features), train, default_index, best_fixed)
    metrics = {
        "holdout": holdout,
        "train": {k: train_metrics[k] for k in ("prompts", "accuracy", "within_one", "label_counts", "tau", "tokens_per_s")},
        "train_loss": [round(losses[0], 4), round(losses[-1], 4)],
        "selection": table,
        "predictor": asdict(chosen),
        "train_datasets": sorted(set(train.datasets)),
        "default_block_size": trained_size,
        "best_fixed_block_size": candidates[best_fixed],
        "sweep": {"directory": _portable(Path(sweep_dir)), "mode": sweep.manifest["mode"],
                  "prompts": len(data), "train_prompts": len(train), "holdout_prompts": len(held),
                  "max_new_tokens": sweep.manifest["max_new_tokens"],
                  "features_sha256": file_sha256(feature_file(sweep.directory, chosen.feature_kind))},
    }
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    version = cfg.version or next_version(repository, cfg.name)
    metadata = PolicyMetadata(
        name=cfg.name, version=version, candidates=tuple(candidates), feature_kind=chosen.feature_kind,
        feature_dim=int(data.features.shape[1]), normalization=chosen.normalization(), label_rule=cfg.label_rule,
        target=sweep.manifest["target"], drafter=sweep.manifest["drafter"], data_digest=sweep.digest(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), metrics=metrics,
    )
    # The ONNX check runs on real features: the held-out rows and a sample of the training rows.
    check = np.concatenate([held.features, train.features[: min(len(train), 256)]])
    version_dir = publish(net, metadata, repository, check, cfg.max_bytes)
    return {"version_dir": str(version_dir), "policy_version": metadata.policy_version, "chosen": chosen.label,
            "holdout": {k: holdout[k] for k in ("prompts", "accuracy", "within_one", "tau", "tokens_per_s", "objective")},
            "selection": table}


def _portable(path: Path) -> str:
    """The sweep folder as metadata records it: relative to the working directory when it lies
    below it (published policies travel to other machines; an absolute path would not mean
    anything there), else as given."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
