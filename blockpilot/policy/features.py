"""The policy's input: one feature vector per request, computed right after prefill.

Both kinds come from the PrefillInfo the decoding loop hands its block-size hook (see
blockpilot/decoding/speculative.py), so training sweeps, the verifier and the CLI compute them with
the very same tensors:
- last_logits  [vocab_size]: the target's logits of the last prompt token (the paper's feature);
- final_hidden [hidden_size]: that token's final hidden state after the final norm (the lm_head
  input). The logits are lm_head(final_hidden), a linear image of it.

Also here: a fingerprint of a loaded model, recorded by sweeps and policies so a policy can be
matched to the target/drafter pair its labels are valid for.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from blockpilot.decoding.speculative import PrefillInfo
from blockpilot.errors import BlockPilotError, FailedPreconditionError, InvalidArgumentError
from blockpilot.models.config import TargetConfig
from blockpilot.policy.metadata import FEATURE_KINDS


def check_kind(kind: str) -> str:
    if kind not in FEATURE_KINDS:
        raise InvalidArgumentError(f"feature kind must be one of {FEATURE_KINDS}, got {kind!r}")
    return kind


def feature_dim(config: TargetConfig, kind: str) -> int:
    """Length of the feature vector of `kind` for a target with this config."""
    return config.vocab_size if check_kind(kind) == "last_logits" else config.hidden_size


def feature_vector(info: PrefillInfo, kind: str) -> np.ndarray:
    """The feature of `kind` as a float32 vector [D] (a copy, safe to keep after the request)."""
    check_kind(kind)
    tensor = info.last_logits if kind == "last_logits" else info.final_hidden
    if tensor is None:
        raise FailedPreconditionError(f"the prefill did not produce the '{kind}' feature")
    array = tensor.detach().to(device="cpu", dtype=torch.float32).reshape(-1).numpy()
    return np.array(array, dtype=np.float32, copy=True)


def feature_vectors(info: PrefillInfo, kinds=FEATURE_KINDS) -> dict[str, np.ndarray]:
    """Every kind in `kinds` from one PrefillInfo (sweeps record all of them)."""
    return {kind: feature_vector(info, kind) for kind in kinds}


def policy_features(needs, info: PrefillInfo) -> tuple[dict[str, np.ndarray], list[str]]:
    """The features a policy asks for (`needs`: items with .kind and .dim, e.g. the FeatureSpecs of
    DescribePolicy), computed from the prefill, and what could not be given: a kind the prefill
    lacks, a length other than the policy's (a policy trained for another target), NaN/Inf values.
    Those are left out; the policy engine answers FAILED_PRECONDITION if the deciding policy needed
    one, and callers fall back to the default size ("policy_feature_mismatch")."""
    computed: dict[str, np.ndarray | BlockPilotError] = {}
    vectors: dict[str, np.ndarray] = {}
    problems: list[str] = []
    for need in needs:
        if need.kind not in computed:
            try:
                computed[need.kind] = feature_vector(info, need.kind)
            except BlockPilotError as err:
                computed[need.kind] = err
        vector = computed[need.kind]
        if isinstance(vector, BlockPilotError):
            problems.append(str(vector))
        elif vector.shape != (need.dim,):
            problems.append(f"{need.kind} has {vector.size} values here, the policy expects {need.dim}")
        elif not np.isfinite(vector).all():
            problems.append(f"{need.kind} has NaN or infinite values")
        else:
            vectors[need.kind] = vector
    return vectors, problems


def model_fingerprint(name: str, module: torch.nn.Module) -> str:
    """'<name>@<12 hex digits>': a digest of the module's parameter names, shapes and values.

    Equal weights give an equal fingerprint whatever file they were loaded from (a GGUF and its
    safetensors conversion, a drafter directory copied elsewhere); tied weights count once."""
    digest = hashlib.sha256()
    seen: set[int] = set()
    for key, tensor in sorted(module.state_dict().items()):
        if tensor.data_ptr() in seen and tensor.numel():
            continue
        seen.add(tensor.data_ptr())
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return f"{name}@{digest.hexdigest()[:12]}"
