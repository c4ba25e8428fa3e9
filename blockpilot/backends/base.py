"""What the decoding loop and the verifier need from "the target", whatever runs it.

The speculative loop (blockpilot/decoding/speculative.py) and the verifier service only ever call
the handful of members below on their target. The torch engine (TargetModel) has them already; the
ONNX Runtime and TensorRT backends implement them around an exported graph, with a KV cache object
that has the same API as KVCache (reserve / truncate / length / capacity / keys / values), so the
loop, its rollback (setting the length) and the verifier's session caches run unchanged on every
backend.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

from blockpilot.backends import BACKENDS, ONNXRUNTIME, TENSORRT, TORCH  # noqa: F401 - re-exported
from blockpilot.errors import FailedPreconditionError, InvalidArgumentError
from blockpilot.models.config import TargetConfig
from blockpilot.models.kv_cache import KVCache
from blockpilot.models.target import ForwardOutput, TargetModel



class BackendUnavailableError(FailedPreconditionError):
    """A backend cannot start on this machine (no GPU, a package missing). Maps to
    FAILED_PRECONDITION: the request is fine, this process is not set up to run it."""


@runtime_checkable
class VerifierBackend(Protocol):
    """A target the loop can verify with.

    config: the target's architecture (vocabulary and context size are read from it).
    device / dtype: where and in what precision its tensors (cache, logits) live.
    norm: the final RMSNorm (the loop applies it to `final_state` for the policy feature).
    embed(tokens): token embeddings (the drafter embeds its block with the target's table).
    new_cache(capacity): an empty KV cache this backend can read and append to.
    __call__(tokens, cache, positions, num_logits=, hidden_layer_ids=, key_valid=) -> ForwardOutput:
        TargetModel.forward's contract (see there): appends the tokens' K/V at cache.length.
    """

    config: TargetConfig

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def norm(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def embed(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def new_cache(self, capacity: int, batch_size: int = 1) -> KVCache: ...

    def __call__(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor | None = None,
        *,
        num_logits: int | None = None,
        hidden_layer_ids: Sequence[int] = (),
        key_valid: torch.Tensor | None = None,
    ) -> ForwardOutput: ...


class TorchTargetParts:
    """What a graph backend keeps of the torch TargetModel it was built from (`torch_target`): the
    final norm, the embedding and the output projection, which the loop, the drafter and the
    policy feature use outside the graph, on the torch target's device."""

    torch_target: TargetModel

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.torch_target.norm(hidden.to(self.torch_target.device))

    @property
    def lm_head(self):
        return self.torch_target.lm_head

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.torch_target.embed(tokens.to(self.torch_target.device))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The torch target's output projection (for callers outside the verify pass; the pass's
        own logits come from the graph, at its precision)."""
        return self.torch_target.logits(hidden.to(self.torch_target.device))


def backend_name(target: object) -> str:
    """'torch' for the engine itself, else the backend's `backend` attribute."""
    return getattr(target, "backend", TORCH)


def checked_weights_digest(target: object) -> str | None:
    """The weights digest a graph backend's export was checked against when it loaded (equal to
    onnx_export.weights_digest of its target); None for the torch engine, which computes none."""
    export = getattr(target, "export", None)
    return export.metadata.weights_digest if export is not None else None


def backend_precision(target: object) -> str:
    """The numeric precision a backend runs at ('fp32', 'int4', TensorRT's 'fp16'/'bf16'); the
    torch engine's is its weights' dtype."""
    precision = getattr(target, "precision", None)
    if precision:
        return precision
    dtype = getattr(target, "dtype", torch.float32)
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise InvalidArgumentError(f"unknown verifier backend {name!r} (choose one of {', '.join(BACKENDS)})")
    return name


def check_layers_match(export_layers: Sequence[int], drafter_layers: Sequence[int], where: str) -> None:
    """An exported graph returns the hidden states of the layers it was exported with; a drafter that
    reads other layers would be fed the wrong features (its drafts would be poor, never wrong, but
    silently slow), so the pairing is refused up front."""
    if tuple(export_layers) != tuple(drafter_layers):
        raise FailedPreconditionError(
            f"the ONNX export at '{where}' returns the hidden states of target layers {list(export_layers)}, "
            f"but the drafter reads layers {list(drafter_layers)}: export again with "
            f"`blockpilot export onnx --hidden-layers {' '.join(str(i) for i in drafter_layers)}` "
            f"(or --drafter PATH), or let the backend export on demand"
        )
