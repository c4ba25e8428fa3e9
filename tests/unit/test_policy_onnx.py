"""ONNX export and OnnxPolicy: ONNX Runtime decides as PyTorch does; the version folder contract."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from blockpilot.decoding.speculative import SamplingParams, SpeculativeDecoder
from blockpilot.errors import FailedPreconditionError, InvalidArgumentError, ModelFormatError, NotFoundError
from blockpilot.models.target import TargetModel
from blockpilot.policy.export import existing_versions, next_version, publish
from blockpilot.policy.features import feature_vector
from blockpilot.policy.metadata import INPUT_NAME, METADATA_FILE, MODEL_FILE, OUTPUT_NAME, PolicyMetadata
from blockpilot.policy.onnx_policy import OnnxPolicy
from blockpilot.policy.predictor import PolicyNet, PredictorConfig

CANDIDATES = (3, 4, 5, 6, 7)


@pytest.fixture(scope="module")
def real_features(tiny_llama_dir):
    """Both feature kinds of 24 prompts, from the tiny target's prefill hook."""
    target = TargetModel.from_pretrained(tiny_llama_dir)
    decoder = SpeculativeDecoder(target)
    rows = {"last_logits": [], "final_hidden": []}
    for i in range(24):
        seen = {}

        def hook(info):
            seen["info"] = info
            return 1

        decoder.generate([1] + [5 + (i * 7 + j) % 90 for j in range(3 + i % 5)], SamplingParams(max_new_tokens=1), hook)
        for kind in rows:
            rows[kind].append(feature_vector(seen["info"], kind))
    return {kind: np.stack(v) for kind, v in rows.items()}


def trained_net(kind: str, features: np.ndarray, seed: int = 0) -> PolicyNet:
    """A network with non-trivial weights (a few steps on random labels), so decisions vary."""
    torch.manual_seed(seed)
    cfg = PredictorConfig(kind, width=16, rank=4, top_k=5, dropout=0.0)
    net = PolicyNet(cfg, features.shape[1], len(CANDIDATES))
    net.fit_normalization(features)
    labels = torch.randint(len(CANDIDATES), (len(features),))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(features)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def metadata_for(net: PolicyNet, kind: str, version: int, **extra) -> PolicyMetadata:
    return PolicyMetadata(name="bp", version=version, candidates=CANDIDATES, feature_kind=kind, feature_dim=net.feature_dim,
                          normalization=net.cfg.normalization(), target="tiny@abc", drafter="d@def", data_digest="0" * 64,
                          created="2026-01-01T00:00:00+00:00", metrics={"holdout": {"accuracy": 0.5}, "train_datasets": ["x"]}, **extra)


@pytest.mark.parametrize("kind", ["last_logits", "final_hidden"])
def test_onnx_runtime_decides_as_pytorch(kind, real_features, tmp_path):
    features = real_features[kind]
    net = trained_net(kind, features)
    version_dir = publish(net, metadata_for(net, kind, 1), tmp_path, features)
    policy = OnnxPolicy.load(version_dir)
    rng = np.random.default_rng(0)
    random_rows = (features.mean(0) + features.std(0) * rng.standard_normal((64, features.shape[1]))).astype(np.float32)
    rows = np.concatenate([features, random_rows])
    with torch.no_grad():
        expected = net(torch.from_numpy(rows))
    decided = [policy.decide(row) for row in rows]
    assert decided == [CANDIDATES[i] for i in expected.argmax(1).tolist()]
    assert len(set(decided)) > 1  # a constant policy would make the comparison empty
    probabilities = policy.probabilities(rows[0])
    assert probabilities.shape == (len(CANDIDATES),) and probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(probabilities, torch.softmax(expected[0], -1).numpy(), atol=1e-4)
    assert policy.decide(rows[:1]) == decided[0]  # [1, D] is accepted as well as [D]
    assert policy.providers[-1] == "CPUExecutionProvider"


def test_the_onnx_graph_follows_the_metadata_contract(real_features, tmp_path):
    features = real_features["last_logits"]
    net = trained_net("last_logits", features)
    version_dir = publish(net, metadata_for(net, "last_logits", 1), tmp_path, features)
    model = onnx.load(str(version_dir / MODEL_FILE))
    onnx.checker.check_model(model)
    (graph_input,) = model.graph.input
    assert graph_input.name == INPUT_NAME and graph_input.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = graph_input.type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value") and dims[1].dim_value == features.shape[1]  # batch is dynamic
    assert [o.name for o in model.graph.output] == [OUTPUT_NAME]
    # The batch dimension really is dynamic: several rows at once.
    import onnxruntime as ort

    session = ort.InferenceSession(str(version_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    assert session.run([OUTPUT_NAME], {INPUT_NAME: features[:7]})[0].shape == (7, len(CANDIDATES))


def test_metadata_round_trip_and_publication(real_features, tmp_path):
    features = real_features["final_hidden"]
    net = trained_net("final_hidden", features)
    meta = metadata_for(net, "final_hidden", next_version(tmp_path, "bp"))
    version_dir = publish(net, meta, tmp_path, features)
    loaded = PolicyMetadata.load(version_dir)
    onnx_check = loaded.metrics.pop("onnx_check")
    assert loaded.metrics.pop("onnx_bytes") == (version_dir / MODEL_FILE).stat().st_size
    assert loaded == meta  # every field survives, metrics included
    assert onnx_check["real"]["rows"] == len(features)
    assert sorted(p.name for p in version_dir.iterdir()) == [METADATA_FILE, MODEL_FILE]
    assert existing_versions(tmp_path, "bp") == [1] and next_version(tmp_path, "bp") == 2
    assert [p.name for p in (tmp_path / "bp").iterdir()] == ["1"]  # no staging folder left behind
    with pytest.raises(FailedPreconditionError, match="never overwritten"):
        publish(net, meta, tmp_path, features)
    second = publish(net, metadata_for(net, "final_hidden", 2), tmp_path, features)
    assert second.name == "2" and OnnxPolicy.load(second).metadata.policy_version == "bp/2"


def test_publish_refuses_an_oversized_model_and_leaves_nothing(real_features, tmp_path):
    features = real_features["last_logits"]
    net = trained_net("last_logits", features)
    with pytest.raises(InvalidArgumentError, match="over the limit"):
        publish(net, metadata_for(net, "last_logits", 1), tmp_path, features, max_bytes=1000)
    assert list((tmp_path / "bp").iterdir()) == []
    with pytest.raises(InvalidArgumentError, match="5 features"):
        publish(net, replace(metadata_for(net, "last_logits", 1), feature_dim=5), tmp_path, features)


def test_onnx_policy_rejects_bad_input_and_bad_folders(real_features, tmp_path):
    features = real_features["final_hidden"]
    net = trained_net("final_hidden", features)
    version_dir = publish(net, metadata_for(net, "final_hidden", 1), tmp_path, features)
    policy = OnnxPolicy.load(version_dir)
    with pytest.raises(InvalidArgumentError, match=r"shape \[5\]"):
        policy.decide(np.zeros(5, dtype=np.float32))
    with pytest.raises(InvalidArgumentError, match=r"shape \[2, 64\]"):
        policy.decide(features[:2])
    with pytest.raises(InvalidArgumentError, match="NaN"):
        policy.decide(np.full(64, np.nan, dtype=np.float32))
    with pytest.raises(NotFoundError, match="model.onnx"):
        OnnxPolicy.load(tmp_path / "bp" / "9")
    # Metadata that disagrees with the graph is refused at load, not at the first request.
    data = json.loads((version_dir / METADATA_FILE).read_text())
    data["candidates"] = [2, 3]
    (version_dir / METADATA_FILE).write_text(json.dumps(data))
    with pytest.raises(ModelFormatError, match="2 candidates"):
        OnnxPolicy.load(version_dir)
    (version_dir / MODEL_FILE).write_bytes(b"not a model")
    with pytest.raises(ModelFormatError, match="not a loadable ONNX model"):
        OnnxPolicy.load(version_dir)
