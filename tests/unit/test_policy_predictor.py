"""The block-size predictor: training lowers the loss, the encoder, metrics, split and selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blockpilot.errors import InvalidArgumentError
from blockpilot.policy.labels import PolicyData
from blockpilot.policy.predictor import (
    PolicyNet, PredictorConfig, decision_metrics, estimated_bytes, logit_statistics, objective, select_config,
    split_by_prompt, train_predictor,
)


def synthetic_data(rows=120, dim=40, classes=4, seed=0, datasets=("a", "b")) -> PolicyData:
    """Labels that depend on the features (a random linear rule), τ highest at the label."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, dim)).astype(np.float32) * 3 + 1
    labels = (x @ rng.standard_normal((dim, classes))).argmax(1)
    tau = rng.uniform(1.0, 2.0, (rows, classes))
    tau[np.arange(rows), labels] += 1.0
    return PolicyData([f"{datasets[i % len(datasets)]}/{i}" for i in range(rows)], [datasets[i % len(datasets)] for i in range(rows)],
                      x, labels.astype(np.int64), tau, tau * 10, np.full(rows, 8.0), tuple(range(5, 5 + classes)), "max_tau")


@pytest.mark.parametrize("kind", ["final_hidden", "last_logits"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(kind):
    data = synthetic_data()
    cfg = PredictorConfig(kind, width=32, rank=8, top_k=4, dropout=0.0, epochs=1)
    net = PolicyNet(cfg, data.features.shape[1], len(data.candidates))
    net.fit_normalization(data.features)
    x, y = torch.from_numpy(data.features), torch.from_numpy(data.labels)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_training_learns_a_learnable_rule_and_is_deterministic():
    data = synthetic_data(rows=300)
    cfg = PredictorConfig("final_hidden", width=64, epochs=60, seed=3)
    train, held = data.subset(range(240)), data.subset(range(240, 300))
    net, losses = train_predictor(cfg, train)
    assert losses[-1] < losses[0]
    accuracy = float((net.predict(held.features) == held.labels).mean())
    assert accuracy > 0.5  # 4 classes: chance is ~0.25
    again, _ = train_predictor(cfg, train)
    assert np.array_equal(again.predict(held.features), net.predict(held.features))


def test_logit_encoder_parts_and_size_estimate():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    stats = logit_statistics(logits, 2)
    logp = torch.log_softmax(logits, -1)
    assert torch.allclose(stats[:, :2], logp.sort(-1, descending=True).values[:, :2])
    assert stats[1, 2].item() == pytest.approx(np.log(4))  # entropy of a uniform distribution
    assert torch.allclose(stats[:, 3], torch.logsumexp(logits, -1))
    for cfg in (PredictorConfig("last_logits", width=16, rank=8, top_k=3), PredictorConfig("last_logits", width=16, rank=0, top_k=3),
                PredictorConfig("last_logits", width=16, rank=8, top_k=0), PredictorConfig("final_hidden", width=16)):
        net = PolicyNet(cfg, 50, 5)
        assert net.parameter_bytes() == estimated_bytes(cfg, 50, 5), cfg.label
        assert net(torch.randn(3, 50)).shape == (3, 5)
    # The shipped default for the default model's vocabulary fits the 10 MB budget.
    assert estimated_bytes(PredictorConfig("last_logits", width=256, rank=32, top_k=32), 49152, 7) < 10_000_000
    with pytest.raises(InvalidArgumentError, match="rank > 0 or top_k > 0"):
        PredictorConfig("last_logits", rank=0, top_k=0)
    with pytest.raises(InvalidArgumentError, match="-1"):
        PredictorConfig("final_hidden", width=-1)
    with pytest.raises(InvalidArgumentError, match="'logprobs'"):
        PredictorConfig("logprobs")


def test_decision_metrics_confusion_and_neighbours():
    data = synthetic_data(rows=6, classes=3)
    data.labels[:] = [0, 0, 1, 1, 2, 2]
    predicted = np.array([0, 1, 1, 2, 0, 2])
    metrics = decision_metrics(predicted, data, default_index=1, best_fixed_index=2)
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    assert metrics["within_one"] == pytest.approx(5 / 6)  # only 2 -> 0 is two sizes away
    assert metrics["confusion"] == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    assert metrics["label_counts"] == [2, 2, 2] and metrics["decision_counts"] == [2, 2, 2]
    assert metrics["default_accuracy"] == pytest.approx(2 / 6)
    rows = np.arange(6)
    assert metrics["tau"]["policy"] == pytest.approx(data.tau[rows, predicted].mean())
    assert metrics["tau"]["oracle"] >= max(metrics["tau"]["policy"], metrics["tau"]["default"], metrics["tau"]["best_fixed"])
    assert objective(data.values().argmax(1), data) == pytest.approx(1.0)
    assert objective(predicted, data) < 1.0


def test_split_is_by_prompt_per_dataset_and_reproducible():
    data = synthetic_data(rows=50, datasets=("a", "b", "c"))
    train, held = split_by_prompt(data, 0.2, seed=1)
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(50))
    assert {data.datasets[i] for i in held} == {"a", "b", "c"}
    again, _ = split_by_prompt(data.subset(np.arange(50)[::-1]), 0.2, seed=1)
    # The split depends on the ids, not on the file order.
    assert sorted(data.ids[i] for i in train) == sorted(data.subset(np.arange(50)[::-1]).ids[i] for i in again)
    with pytest.raises(InvalidArgumentError, match="1.5"):
        split_by_prompt(data, 1.5, seed=0)


def test_selection_skips_configurations_over_the_size_budget():
    data = synthetic_data(rows=80)
    small = PredictorConfig("final_hidden", width=8, epochs=5)
    large = PredictorConfig("final_hidden", width=512, epochs=5)
    result = select_config([small, large], {"final_hidden": data}, folds=2, seed=0,
                           max_bytes=estimated_bytes(small, 40, 4) + 1)
    assert result.chosen == small
    assert "skipped" in result.table[1] and result.table[0]["folds"] == 2
    with pytest.raises(InvalidArgumentError, match="fits"):
        select_config([large], {"final_hidden": data}, folds=2, seed=0, max_bytes=100)
