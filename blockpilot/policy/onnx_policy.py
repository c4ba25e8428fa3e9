"""A published policy version loaded with ONNX Runtime: the in-process API of the CLI, the verifier
and the policy service (which builds its repository / hot-reload layer on top of it).

    policy = OnnxPolicy.load(version_dir)          # <repository>/<name>/<version>/
    policy.metadata                                # PolicyMetadata (candidates, feature_kind, ...)
    policy.decide(features)  -> int                # a block size from policy.metadata.candidates
    policy.probabilities(features) -> np.ndarray   # [len(candidates)] softmax of the logits

`features` is the raw feature vector of metadata.feature_kind (features.feature_vector), float32
[feature_dim] or [1, feature_dim]. The decision is candidates[argmax(logits)], ties to the smaller
size (the contract in metadata.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from blockpilot.errors import InvalidArgumentError, ModelFormatError, NotFoundError
from blockpilot.policy.metadata import INPUT_NAME, MODEL_FILE, OUTPUT_NAME, PolicyMetadata

log = logging.getLogger(__name__)


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build has it (onnxruntime-gpu) and a GPU answers; CPU always.
    ONNX Runtime itself falls back to the next provider when one fails to initialise."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = []
    if "CUDAExecutionProvider" in available and _gpu_present():
        providers.append("CUDAExecutionProvider")
    providers.append("CPUExecutionProvider")
    return providers


def _gpu_present() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # no torch or a broken CUDA install: CPU it is
        return False


class OnnxPolicy:
    def __init__(self, metadata: PolicyMetadata, session, version_dir: Path) -> None:
        self.metadata = metadata
        self.version_dir = version_dir
        self._session = session
        # InferenceSession.run may be called from several threads at once (ONNX Runtime allows it).
        self._candidates = np.asarray(metadata.candidates, dtype=np.int64)

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    @classmethod
    def load(cls, version_dir: str | Path, *, providers: list[str] | None = None, threads: int = 1) -> "OnnxPolicy":
        """Load <repository>/<name>/<version>/. threads: ONNX Runtime intra-op threads (the
        predictor is tiny; one thread leaves the cores to the target)."""
        import onnxruntime as ort

        version_dir = Path(version_dir)
        model = version_dir / MODEL_FILE
        if not model.is_file():
            raise NotFoundError(f"no {MODEL_FILE} in '{version_dir}'")
        metadata = PolicyMetadata.load(version_dir)
        if threads < 1:
            raise InvalidArgumentError(f"threads must be >= 1, got {threads}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(str(model), options, providers=providers or default_providers())
        except Exception as err:  # onnxruntime raises its own exception types for a bad file
            raise ModelFormatError(f"'{model}' is not a loadable ONNX model: {err}") from None
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if [i.name for i in inputs] != [INPUT_NAME] or OUTPUT_NAME not in [o.name for o in outputs]:
            raise ModelFormatError(f"'{model}' must take one input '{INPUT_NAME}' and return '{OUTPUT_NAME}'; it takes "
                                   f"{[i.name for i in inputs]} and returns {[o.name for o in outputs]}")
        shape = inputs[0].shape
        if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != metadata.feature_dim):
            raise ModelFormatError(f"'{model}' input shape {shape} does not match feature_dim {metadata.feature_dim}")
        out_shape = next(o.shape for o in outputs if o.name == OUTPUT_NAME)
        if len(out_shape) != 2 or (isinstance(out_shape[1], int) and out_shape[1] != len(metadata.candidates)):
            raise ModelFormatError(f"'{model}' output shape {out_shape} does not match {len(metadata.candidates)} candidates")
        return cls(metadata, session, version_dir)

    def _rows(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[0] != 1 or x.shape[1] != self.metadata.feature_dim:
            raise InvalidArgumentError(f"policy {self.metadata.policy_version} takes one '{self.metadata.feature_kind}' vector "
                                       f"of {self.metadata.feature_dim} values, got shape {list(np.shape(features))}")
        if not np.isfinite(x).all():
            raise InvalidArgumentError("the feature vector holds NaN or infinite values")
        return np.ascontiguousarray(x)

    def logits(self, features: np.ndarray) -> np.ndarray:
        """[len(candidates)] raw scores."""
        return self._session.run([OUTPUT_NAME], {INPUT_NAME: self._rows(features)})[0][0]

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        logits = self.logits(features).astype(np.float64)
        weights = np.exp(logits - logits.max())
        return (weights / weights.sum()).astype(np.float32)

    def decide(self, features: np.ndarray) -> int:
        return int(self._candidates[int(np.argmax(self.logits(features)))])
