"""The contract between policy training (which writes it) and policy serving (which reads it).

A policy repository is a folder laid out like Triton's model repository:

    <repository>/<name>/<version>/model.onnx      the predictor
    <repository>/<name>/<version>/metadata.json   PolicyMetadata below

`version` is a positive integer folder name; the highest complete version (both files present) is
the one served. The ONNX graph takes the raw feature the verifier computes (`feature_kind`) as
float32 input "features" [N, feature_dim] and returns float32 output "logits" [N, len(candidates)];
any normalization happens inside the graph (`normalization` documents which). The decision is
candidates[argmax(logits)] (ties go to the lower index, i.e. the smaller block size).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from blockpilot.errors import InvalidArgumentError

# Names of policies and experiments: one folder / key component, no separators or spaces. (Here,
# not in repository.py, so that the service configs read them without numpy.)
POLICY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# The name the project's own trained policy for the default target ships under (policies/<name>/<version>/);
# the policy service's default_policy.
SHIPPED_POLICY_NAME = "blockpilot"

METADATA_FILE = "metadata.json"
MODEL_FILE = "model.onnx"
INPUT_NAME = "features"
OUTPUT_NAME = "logits"

# feature kinds, computed by the verifier right after prefill for the last prompt token:
#   last_logits:  the target's logits, float32 [vocab_size] (the paper's feature);
#   final_hidden: the target's final hidden state after the final norm (the lm_head input),
#                 float32 [hidden_size].
FEATURE_KINDS = ("last_logits", "final_hidden")
# label rules: max_tau = the block size with the highest τ per prompt (the paper's rule, ties to the
# smaller size); max_tokens_per_s = the highest decode tokens/s on the sweep's hardware.
LABEL_RULES = ("max_tau", "max_tokens_per_s")


@dataclass(frozen=True)
class PolicyMetadata:
    """name / version: where the policy lives in the repository (version = folder name).
    candidates: block sizes, one per output column, ascending.
    feature_kind / feature_dim: what the verifier must send (see FEATURE_KINDS).
    normalization: what the graph does to the raw feature first (documentation only).
    label_rule: how training labels were chosen (see LABEL_RULES).
    target / drafter: the models the sweep ran with (features and labels are only valid for them).
    data_digest: sha256 of the sweep file the policy was trained on.
    metrics: held-out figures from training (accuracy, confusion, ...), free-form."""

    name: str
    version: int
    candidates: tuple[int, ...]
    feature_kind: str
    feature_dim: int
    normalization: str = "none"
    label_rule: str = "max_tau"
    target: str = ""
    drafter: str = ""
    data_digest: str = ""
    created: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise InvalidArgumentError(f"policy name must be a non-empty folder name, got {self.name!r}")
        if not isinstance(self.version, int) or self.version < 1:
            raise InvalidArgumentError(f"policy version must be a positive integer, got {self.version!r}")
        candidates = tuple(self.candidates)
        if not candidates or any(not isinstance(c, int) or c < 1 for c in candidates) or list(candidates) != sorted(set(candidates)):
            raise InvalidArgumentError(f"candidates must be distinct positive block sizes in ascending order, got {list(self.candidates)!r}")
        object.__setattr__(self, "candidates", candidates)
        if self.feature_kind not in FEATURE_KINDS:
            raise InvalidArgumentError(f"feature_kind must be one of {FEATURE_KINDS}, got {self.feature_kind!r}")
        if self.feature_dim < 1:
            raise InvalidArgumentError(f"feature_dim must be >= 1, got {self.feature_dim!r}")
        if self.label_rule not in LABEL_RULES:
            raise InvalidArgumentError(f"label_rule must be one of {LABEL_RULES}, got {self.label_rule!r}")

    @property
    def policy_version(self) -> str:
        """The version string reported to clients and metrics: '<name>/<version>'."""
        return f"{self.name}/{self.version}"

    def to_json(self) -> str:
        data = asdict(self)
        data["candidates"] = list(self.candidates)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save(self, version_dir: Path) -> Path:
        path = Path(version_dir) / METADATA_FILE
        path.write_text(self.to_json())
        return path

    @classmethod
    def load(cls, version_dir: Path) -> "PolicyMetadata":
        path = Path(version_dir) / METADATA_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise InvalidArgumentError(f"no {METADATA_FILE} in {version_dir}") from None
        except json.JSONDecodeError as err:
            raise InvalidArgumentError(f"{path} is not valid JSON: {err}") from None
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidArgumentError(f"{path}: unknown fields {unknown}")
        try:
            return cls(**data)
        except TypeError as err:
            raise InvalidArgumentError(f"{path}: {err}") from None
