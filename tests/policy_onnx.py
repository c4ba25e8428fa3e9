"""Tiny ONNX policies for the serving tests, built directly with onnx.helper after the contract in
blockpilot/policy/metadata.py: input "features" [N, D] float32, output "logits" [N, C].

logits = features @ W + b. With `choice` the bias makes that candidate win whatever the feature
(W = 0), so a test knows the decision in advance; without it W scores the first C features (the
decision follows the input)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from blockpilot.policy.metadata import INPUT_NAME, METADATA_FILE, MODEL_FILE, OUTPUT_NAME, PolicyMetadata


def policy_model(feature_dim: int, candidates, choice: int | None = None, hidden: int = 0, seed: int = 0) -> onnx.ModelProto:
    """A graph of the contract's shape. hidden > 0 adds a ReLU layer of that width (benchmark-sized
    models); else one affine map."""
    count = len(candidates)
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    source = INPUT_NAME
    if hidden:
        w1 = (rng.standard_normal((feature_dim, hidden)) / np.sqrt(feature_dim)).astype(np.float32)
        inits.append(numpy_helper.from_array(w1, "w1"))
        nodes += [helper.make_node("MatMul", [source, "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"])]
        source, width = "r1", hidden
    else:
        width = feature_dim
    weight = np.zeros((width, count), dtype=np.float32)
    bias = np.zeros(count, dtype=np.float32)
    if choice is not None:
        bias[list(candidates).index(choice)] = 10.0
    elif hidden:
        weight[:] = (rng.standard_normal((width, count)) / np.sqrt(width)).astype(np.float32)
    else:
        for i in range(min(count, width)):
            weight[i, i] = 1.0
    inits += [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
    nodes += [helper.make_node("MatMul", [source, "w"], ["scores"]), helper.make_node("Add", ["scores", "b"], [OUTPUT_NAME])]
    graph = helper.make_graph(nodes, "policy", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", feature_dim])],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["N", count])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # what this onnxruntime reads
    onnx.checker.check_model(model)
    return model


def write_policy(root: Path, name: str, version: int, *, candidates=(2, 3, 4, 5), feature_kind: str = "last_logits",
                 feature_dim: int = 97, choice: int | None = None, hidden: int = 0, metadata_dim: int | None = None,
                 staged: bool = True) -> Path:
    """Publish <root>/<name>/<version>/ (written in a temporary folder, then renamed: atomic, as
    the repository's doc asks). metadata_dim != feature_dim makes a version whose graph and
    metadata disagree (broken)."""
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / str(version)
    work = folder / f".tmp-{version}" if staged else target
    work.mkdir(parents=True, exist_ok=False)
    onnx.save(policy_model(feature_dim, candidates, choice, hidden), str(work / MODEL_FILE))
    PolicyMetadata(name=name, version=version, candidates=tuple(candidates), feature_kind=feature_kind,
                   feature_dim=metadata_dim or feature_dim).save(work)
    if staged:
        work.rename(target)
    return target


def write_garbage_version(root: Path, name: str, version: int, feature_dim: int = 97) -> Path:
    """A version whose model.onnx is not ONNX at all (metadata fine)."""
    target = Path(root) / name / str(version)
    target.mkdir(parents=True)
    (target / MODEL_FILE).write_bytes(b"not an onnx model")
    PolicyMetadata(name=name, version=version, candidates=(2, 3), feature_kind="last_logits",
                   feature_dim=feature_dim).save(target)
    assert (target / METADATA_FILE).is_file()
    return target
