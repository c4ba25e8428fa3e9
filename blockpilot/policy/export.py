"""Publishing a trained predictor into a policy repository (layout: blockpilot/policy/metadata.py).

A version folder appears complete or not at all: model.onnx and metadata.json are written into a
hidden staging folder beside the versions and renamed into place, so a serving process that scans
or hot-reloads the repository never reads a half-written version. Published versions are never
overwritten.

Before publishing, ONNX Runtime must reproduce the PyTorch network's decisions on the given
features (real ones from the sweep) and on random ones; only rows whose top two PyTorch logits are
within float tolerance (a near tie, where either answer is right) may differ.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from blockpilot.errors import FailedPreconditionError, InvalidArgumentError
from blockpilot.policy.metadata import INPUT_NAME, MODEL_FILE, OUTPUT_NAME, PolicyMetadata
from blockpilot.policy.predictor import PolicyNet

log = logging.getLogger(__name__)

OPSET = 18
DEFAULT_MAX_BYTES = 10 * 1000 * 1000
# Rows whose top-2 PyTorch logits are closer than this (relative to the top logit, at least 1) may
# be decided either way by another runtime: a 49,152-term float32 sum in another order moves the
# logits by ~1e-4.
TIE_TOLERANCE = 1e-3
# Beyond this (same scale) the two runtimes do not compute the same function.
AGREEMENT_TOLERANCE = 1e-2


def existing_versions(repository: Path, name: str) -> list[int]:
    folder = Path(repository) / name
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and int(p.name) >= 1)


def next_version(repository: Path, name: str) -> int:
    versions = existing_versions(repository, name)
    return versions[-1] + 1 if versions else 1


def export_onnx(net: PolicyNet, path: Path) -> None:
    """model.onnx: input "features" [N, D] float32 -> output "logits" [N, C], N dynamic."""
    net = net.eval()
    example = torch.zeros(2, net.feature_dim)
    batch = torch.export.Dim("batch", min=1)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # "torchvision is not installed" and similar notes, not ours
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's own deprecation chatter
            program = torch.onnx.export(net, (example,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes=({0: batch},), opset_version=OPSET, external_data=False, verbose=False)
    finally:
        exporter_log.setLevel(level)
    program.save(str(path), external_data=False)


def check_decisions(net: PolicyNet, path: Path, features: np.ndarray, seed: int = 0) -> dict:
    """Compare ONNX Runtime with PyTorch on `features` and on as many random rows drawn around
    their mean and spread. Raises FailedPreconditionError on a decision that differs outside a
    near tie. Returns counts and the largest logit difference."""
    import onnxruntime as ort

    features = np.asarray(features, dtype=np.float32)
    rng = np.random.default_rng(seed)
    if len(features):
        mean, std = features.mean(0), features.std(0) + 1e-3
        random_rows = (mean + std * rng.standard_normal((max(16, len(features)), features.shape[1]))).astype(np.float32)
    else:
        random_rows = rng.standard_normal((16, net.feature_dim)).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    report = {}
    for name, rows in (("real", features), ("random", random_rows)):
        if not len(rows):
            continue
        with torch.no_grad():
            expected = torch.cat([net(torch.from_numpy(rows[i : i + 256])) for i in range(0, len(rows), 256)]).numpy()
        got = np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: rows[i : i + 256]})[0] for i in range(0, len(rows), 256)])
        top2 = np.sort(expected, axis=1)[:, -2:] if expected.shape[1] > 1 else np.zeros((len(rows), 2))
        near_tie = (top2[:, 1] - top2[:, 0]) < TIE_TOLERANCE * np.maximum(1.0, np.abs(top2[:, 1]))
        differ = expected.argmax(1) != got.argmax(1)
        bad = int((differ & ~near_tie).sum())
        largest = float(np.abs(expected - got).max())
        report[name] = {"rows": int(len(rows)), "differing_decisions": int(differ.sum()), "near_ties": int(near_tie.sum()),
                        "max_abs_logit_diff": largest}
        if largest > AGREEMENT_TOLERANCE * max(1.0, float(np.abs(expected).max())):
            raise FailedPreconditionError(f"ONNX Runtime logits differ from PyTorch by up to {largest:.3g} on {name} rows")
        if bad:
            raise FailedPreconditionError(f"ONNX Runtime decides {bad} of {len(rows)} {name} rows differently from PyTorch")
    return report


def publish(net: PolicyNet, metadata: PolicyMetadata, repository: Path, check_features: np.ndarray,
            max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """Write <repository>/<name>/<version>/{model.onnx, metadata.json}; returns the version folder."""
    if metadata.feature_dim != net.feature_dim or len(metadata.candidates) != net.num_classes:
        raise InvalidArgumentError(f"metadata says {metadata.feature_dim} features / {len(metadata.candidates)} classes; "
                                   f"the network has {net.feature_dim} / {net.num_classes}")
    folder = Path(repository) / metadata.name
    final = folder / str(metadata.version)
    if final.exists():
        raise FailedPreconditionError(f"policy version '{final}' already exists; published versions are never overwritten")
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{metadata.version}-", dir=folder))
    try:
        model_path = staging / MODEL_FILE
        export_onnx(net, model_path)
        size = model_path.stat().st_size
        if size > max_bytes:
            raise InvalidArgumentError(f"model.onnx is {size / 1e6:.2f} MB, over the limit of {max_bytes / 1e6:.2f} MB "
                                       f"(lower the width or the rank)")
        check = check_decisions(net, model_path, check_features)
        metrics = {**metadata.metrics, "onnx_bytes": size, "onnx_check": check}
        replace(metadata, metrics=metrics).save(staging)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the serving process may run as another user
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("published %s (%d bytes)", final, size)
    return final
