"""The block-size predictor: the paper's MLP behind a fixed, in-graph input encoder.

The paper's predictor (research/papers.md §1) is Linear(V→2048), ReLU, Dropout; Linear(2048→2048),
ReLU, Dropout with a residual connection; Linear(2048→C), trained with cross-entropy. Its first
layer alone is V x 2048 weights (0.32B parameters for Qwen3); the shipped policy here must fit in
10 MB, and the sweeps hold about a thousand prompts, so the input goes through an encoder that is
part of the exported graph (the verifier sends the raw feature):

- final_hidden [hidden]: per-dimension standardization (training mean and std) -> MLP.
- last_logits [vocab]: two parts, concatenated -> MLP:
    * projection: per-dimension standardization, then a learned Linear(vocab → rank) without
      bias (rank 32 = 1.6M weights for a 49,152 vocabulary: what a 10 MB budget allows);
    * distribution statistics: log-softmax, its top-k values sorted (how peaked the next-token
      distribution is), its entropy, the logsumexp, mean and std of the logits; standardized.
  rank 0 or top_k 0 switches a part off.

Dropout, kaiming-uniform hidden layers, xavier output layer and zero biases as in the released code.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from blockpilot.errors import InvalidArgumentError
from blockpilot.policy.features import check_kind
from blockpilot.policy.labels import PolicyData

STAT_EXTRAS = ("entropy", "logsumexp", "mean", "std")


@dataclass(frozen=True)
class PredictorConfig:
    """feature_kind: the input (metadata.FEATURE_KINDS).
    width: hidden width of both MLP layers.
    rank / top_k: the last_logits encoder (see the module docstring); ignored for final_hidden.
    dropout, epochs, batch_size, lr, weight_decay, seed: training (AdamW, cross-entropy)."""

    feature_kind: str
    width: int = 256
    rank: int = 32
    top_k: int = 32
    dropout: float = 0.2
    epochs: int = 150
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    seed: int = 0

    def __post_init__(self) -> None:
        check_kind(self.feature_kind)
        for name in ("width", "epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("rank", "top_k"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise InvalidArgumentError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.feature_kind == "last_logits" and self.rank == 0 and self.top_k == 0:
            raise InvalidArgumentError("a last_logits predictor needs rank > 0 or top_k > 0 (both are 0)")
        if not 0 <= self.dropout < 1:
            raise InvalidArgumentError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidArgumentError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise InvalidArgumentError(f"weight_decay must be >= 0, got {self.weight_decay!r}")

    @property
    def label(self) -> str:
        """A short name for reports: 'final_hidden/w256' or 'last_logits/w256/r32/k32'."""
        if self.feature_kind == "final_hidden":
            return f"final_hidden/w{self.width}"
        return f"last_logits/w{self.width}/r{self.rank}/k{self.top_k}"

    def normalization(self) -> str:
        """What the graph does to the raw feature (PolicyMetadata.normalization)."""
        if self.feature_kind == "final_hidden":
            return "per-dimension standardization (training mean/std)"
        parts = []
        if self.rank:
            parts.append(f"per-dimension standardization then a learned rank-{self.rank} linear projection")
        if self.top_k:
            parts.append(f"log-softmax top-{self.top_k} values, entropy, logsumexp, mean and std of the logits, standardized")
        return "; ".join(parts)


def logit_statistics(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """[N, V] -> [N, top_k + 4]: sorted top-k log-probabilities, entropy, logsumexp, mean, std."""
    logp = torch.log_softmax(logits, dim=-1)
    top = torch.topk(logp, top_k, dim=-1).values
    entropy = -(logp.exp() * logp).sum(dim=-1, keepdim=True)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    mean = logits.mean(dim=-1, keepdim=True)
    std = (logits - mean).pow(2).mean(dim=-1, keepdim=True).sqrt()
    return torch.cat([top, entropy, lse, mean, std], dim=-1)


class PolicyNet(nn.Module):
    """Raw feature [N, D] -> logits over the candidates [N, C] (what model.onnx computes)."""

    def __init__(self, cfg: PredictorConfig, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        if cfg.feature_kind == "last_logits" and cfg.top_k > feature_dim:
            raise InvalidArgumentError(f"top_k {cfg.top_k} exceeds the feature width {feature_dim}")
        self.cfg = cfg
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        logits_kind = cfg.feature_kind == "last_logits"
        # The raw feature is standardized unless only its statistics are used (empty constants then).
        self.use_projection = not logits_kind or cfg.rank > 0
        standardized = feature_dim if self.use_projection else 0
        self.register_buffer("in_mean", torch.zeros(standardized))
        self.register_buffer("in_scale", torch.ones(standardized))
        self.top_k = cfg.top_k if logits_kind else 0
        stats = self.top_k + len(STAT_EXTRAS) if self.top_k else 0
        self.register_buffer("stat_mean", torch.zeros(stats))
        self.register_buffer("stat_scale", torch.ones(stats))
        self.project = nn.Linear(feature_dim, cfg.rank, bias=False) if logits_kind and cfg.rank else None
        encoded = (cfg.rank if self.project is not None else feature_dim if self.use_projection else 0) + stats
        self.fc1 = nn.Linear(encoded, cfg.width)
        self.fc2 = nn.Linear(cfg.width, cfg.width)
        self.out = nn.Linear(cfg.width, num_classes)
        self.dropout = nn.Dropout(cfg.dropout)
        for layer in (self.fc1, self.fc2):
            nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        if self.project is not None:
            # Keeps each projected value at unit scale for standardized inputs.
            nn.init.normal_(self.project.weight, std=1.0 / math.sqrt(feature_dim))

    def fit_normalization(self, features: np.ndarray | torch.Tensor) -> None:
        """Standardization constants from the training features (constant-width dims get scale 1)."""
        x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        with torch.no_grad():
            if self.use_projection:
                mean, std = x.mean(0), x.std(0, unbiased=False)
                self.in_mean.copy_(mean)
                self.in_scale.copy_(torch.where(std > 1e-6, 1.0 / std.clamp_min(1e-6), torch.ones_like(std)))
            if self.top_k:
                stats = torch.cat([logit_statistics(x[i : i + 256], self.top_k) for i in range(0, len(x), 256)])
                mean, std = stats.mean(0), stats.std(0, unbiased=False)
                self.stat_mean.copy_(mean)
                self.stat_scale.copy_(torch.where(std > 1e-6, 1.0 / std.clamp_min(1e-6), torch.ones_like(std)))

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """The fixed part of the encoder (no trainable weights), cached once during training."""
        parts = []
        if self.use_projection:
            parts.append((features - self.in_mean) * self.in_scale)
        if self.top_k:
            parts.append((logit_statistics(features, self.top_k) - self.stat_mean) * self.stat_scale)
        return torch.cat(parts, dim=-1)

    def head(self, encoded: torch.Tensor) -> torch.Tensor:
        if self.project is not None:
            width = self.feature_dim
            x = torch.cat([self.project(encoded[:, :width]), encoded[:, width:]], dim=-1)
        else:
            x = encoded
        h = self.dropout(F.relu(self.fc1(x)))
        h = h + self.dropout(F.relu(self.fc2(h)))
        return self.out(h)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.encode(features))

    def parameter_bytes(self) -> int:
        """float32 bytes of every weight and constant the exported graph carries."""
        return 4 * (sum(p.numel() for p in self.parameters()) + sum(b.numel() for b in self.buffers()))

    @torch.no_grad()
    def predict(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Class indices (ties to the lower index, like np.argmax)."""
        self.eval()
        x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        logits = torch.cat([self(x[i : i + 256]) for i in range(0, len(x), 256)]) if len(x) else torch.zeros(0, self.num_classes)
        return logits.numpy().argmax(axis=-1)


def estimated_bytes(cfg: PredictorConfig, feature_dim: int, num_classes: int) -> int:
    """float32 size of the weights and constants of a PolicyNet (before building it)."""
    stats = cfg.top_k + len(STAT_EXTRAS) if cfg.feature_kind == "last_logits" and cfg.top_k else 0
    projected = cfg.feature_kind == "final_hidden" or cfg.rank > 0
    encoded = (cfg.rank if cfg.feature_kind == "last_logits" and cfg.rank else feature_dim if projected else 0) + stats
    count = (2 * feature_dim if projected else 0) + 2 * stats
    count += feature_dim * cfg.rank if cfg.feature_kind == "last_logits" else 0
    count += encoded * cfg.width + cfg.width + cfg.width * cfg.width + cfg.width + cfg.width * num_classes + num_classes
    return 4 * count


def train_predictor(cfg: PredictorConfig, data: PolicyData) -> tuple[PolicyNet, list[float]]:
    """Cross-entropy on the labels of `data` (AdamW, minibatches, fixed seed). Returns the
    network (eval mode) and the mean training loss of every epoch."""
    if len(data) == 0:
        raise InvalidArgumentError("no training rows")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    net = PolicyNet(cfg, data.features.shape[1], len(data.candidates))
    net.fit_normalization(data.features)
    with torch.no_grad():
        x = torch.as_tensor(data.features, dtype=torch.float32)
        encoded = torch.cat([net.encode(x[i : i + 256]) for i in range(0, len(x), 256)])
    y = torch.as_tensor(data.labels, dtype=torch.long)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses = []
    net.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(y), generator=generator)
        total = 0.0
        for lo in range(0, len(order), cfg.batch_size):
            rows = order[lo : lo + cfg.batch_size]
            loss = F.cross_entropy(net.head(encoded[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        losses.append(total / len(y))
    net.eval()
    return net, losses


# ---- metrics -----------------------------------------------------------------------------------


def decision_metrics(predicted: np.ndarray, data: PolicyData, default_index: int | None, best_fixed_index: int | None) -> dict:
    """Held-out figures of a set of decisions (indices into data.candidates).

    accuracy / within_one: exact label, or at most one candidate away; confusion[true][pred];
    tau / tokens_per_s: means over prompts at the decided sizes, next to those of the default size
    (the drafter's trained size), the best fixed size (chosen on the training rows) and the oracle."""
    labels = data.labels
    count = len(labels)
    classes = len(data.candidates)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    rows = np.arange(count)

    def at(values: np.ndarray, indices: np.ndarray) -> float:
        return float(values[rows, indices].mean()) if count else 0.0

    out = {
        "prompts": int(count),
        "accuracy": float((predicted == labels).mean()) if count else 0.0,
        "within_one": float((np.abs(predicted - labels) <= 1).mean()) if count else 0.0,
        "confusion": confusion.tolist(),
        "label_counts": np.bincount(labels, minlength=classes).tolist(),
        "decision_counts": np.bincount(predicted, minlength=classes).tolist(),
        # oracle: each prompt at its own best size for that metric.
        "tau": {"policy": at(data.tau, predicted), "oracle": at(data.tau, data.tau.argmax(1))},
        "tokens_per_s": {"policy": at(data.tokens_per_s, predicted), "oracle": at(data.tokens_per_s, data.tokens_per_s.argmax(1))},
    }
    for name, index in (("default", default_index), ("best_fixed", best_fixed_index)):
        if index is not None:
            fixed = np.full(count, index)
            out["tau"][name] = at(data.tau, fixed)
            out["tokens_per_s"][name] = at(data.tokens_per_s, fixed)
            out[f"{name}_accuracy"] = float((labels == index).mean()) if count else 0.0
    return out


def objective(predicted: np.ndarray, data: PolicyData) -> float:
    """What model selection maximizes: the mean, over prompts, of the label rule's metric at the
    decided sizes relative to the prompt's best (1.0 = the oracle), so prompts with large τ do
    not dominate."""
    values = data.values()
    best = values.max(axis=1)
    chosen = values[np.arange(len(predicted)), predicted]
    return float(np.mean(np.where(best > 0, chosen / np.where(best > 0, best, 1.0), 1.0)))


def split_by_prompt(data: PolicyData, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train / held-out row indices. Each prompt is one row; the split is made per dataset (a
    fixed-seed shuffle of each) so every dataset is represented on both sides."""
    if not 0 < holdout_fraction < 1:
        raise InvalidArgumentError(f"holdout fraction must be in (0, 1), got {holdout_fraction!r}")
    rng = np.random.default_rng(seed)
    train, held = [], []
    for name in sorted(set(data.datasets)):
        rows = np.array([i for i, d in enumerate(data.datasets) if d == name])
        rows = rows[np.argsort([data.ids[i] for i in rows], kind="stable")]  # independent of file order
        rng.shuffle(rows)
        cut = int(round(len(rows) * holdout_fraction))
        held.extend(rows[:cut])
        train.extend(rows[cut:])
    if not train or not held:
        raise InvalidArgumentError(f"{len(data)} prompts are too few to hold out {holdout_fraction:.0%} of them")
    return np.sort(np.array(train)), np.sort(np.array(held))


def cross_validate(cfg: PredictorConfig, data: PolicyData, folds: int, seed: int) -> dict:
    """Mean objective and accuracy over `folds` folds of `data` (a fixed-seed split by prompt)."""
    order = np.random.default_rng(seed).permutation(len(data))
    parts = np.array_split(order, folds)
    scores, accuracies = [], []
    for k in range(folds):
        valid = np.sort(parts[k])
        train = np.sort(np.concatenate([parts[j] for j in range(folds) if j != k]))
        if not len(valid) or not len(train):
            continue
        net, _ = train_predictor(cfg, data.subset(train))
        predicted = net.predict(data.features[valid])
        held = data.subset(valid)
        scores.append(objective(predicted, held))
        accuracies.append(float((predicted == held.labels).mean()))
    return {"objective": float(np.mean(scores)), "accuracy": float(np.mean(accuracies)), "folds": len(scores)}


@dataclass(frozen=True)
class SelectionResult:
    chosen: PredictorConfig
    table: list[dict]  # one row per configuration tried


def select_config(configs: Sequence[PredictorConfig], data_by_kind: dict[str, PolicyData], folds: int, seed: int,
                  max_bytes: int, progress=None) -> SelectionResult:
    """Cross-validate every configuration that fits in `max_bytes` on the training rows and keep
    the best objective (ties: higher accuracy, then the smaller model)."""
    table = []
    for cfg in configs:
        data = data_by_kind[cfg.feature_kind]
        size = estimated_bytes(cfg, data.features.shape[1], len(data.candidates))
        row = {"config": cfg.label, "bytes": size}
        if size > max_bytes:
            row["skipped"] = f"{size / 1e6:.1f} MB exceeds {max_bytes / 1e6:.1f} MB"
        else:
            started = time.perf_counter()
            row.update(cross_validate(cfg, data, folds, seed))
            row["seconds"] = round(time.perf_counter() - started, 1)
        table.append({**row, "_cfg": cfg})
        if progress is not None:
            progress(row)
    tried = [r for r in table if "objective" in r]
    if not tried:
        raise InvalidArgumentError(f"no predictor configuration fits in {max_bytes / 1e6:.1f} MB")
    best = max(tried, key=lambda r: (round(r["objective"], 6), round(r["accuracy"], 6), -r["bytes"]))
    return SelectionResult(best["_cfg"], [{k: v for k, v in r.items() if k != "_cfg"} for r in table])
