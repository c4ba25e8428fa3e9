"""Training a policy on a tiny sweep and evaluating it on a sweep of other datasets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from blockpilot.decoding.drafting import LocalDrafter
from blockpilot.errors import FailedPreconditionError
from blockpilot.models.target import TargetModel
from blockpilot.policy.evaluate import evaluate_policy, write_report
from blockpilot.policy.features import model_fingerprint
from blockpilot.policy.metadata import PolicyMetadata
from blockpilot.policy.onnx_policy import OnnxPolicy
from blockpilot.policy.predictor import PredictorConfig
from blockpilot.policy.sweep import SweepConfig, SweepModels, load_sweep, run_sweep
from blockpilot.policy.trainer import TrainPolicyConfig, train_policy
from test_policy_sweep import FIXED_COST, TinyTokenizer, prompts_for, train_tiny_drafter

CANDIDATES = (2, 3, 4, 5, 6)


@pytest.fixture(scope="module")
def workspace(tiny_llama_dir, tmp_path_factory):
    """A training sweep (datasets alpha, beta), an evaluation sweep (gamma, delta) and a policy."""
    root = tmp_path_factory.mktemp("policy")
    target = TargetModel.from_pretrained(tiny_llama_dir)
    # The drafter (not the policy) may see every prompt: it only has to accept drafts on them.
    drafter = train_tiny_drafter(target, prompts_for(["alpha", "beta"], per_name=8) + prompts_for(["gamma", "delta"], per_name=5),
                                 block_size=4)
    models = SweepModels(target, LocalDrafter(drafter, target), TinyTokenizer(), model_fingerprint("tiny", target),
                         model_fingerprint("tiny-drafter", drafter))
    cfg = SweepConfig(candidates=CANDIDATES, max_new_tokens=20, batch_size=4)
    run_sweep(models, prompts_for(["alpha", "beta"], per_name=8), root / "train", cfg, cost_model=FIXED_COST, progress=False)
    run_sweep(models, prompts_for(["gamma", "delta"], per_name=5), root / "eval", cfg, cost_model=FIXED_COST, progress=False)
    base = PredictorConfig("final_hidden", epochs=20, top_k=4)
    summary = train_policy(root / "train", root / "repo", TrainPolicyConfig(
        name="tiny", feature_kinds=("last_logits", "final_hidden"), widths=(8, 16), ranks=(4,), holdout_fraction=0.25,
        folds=2, base=base), progress=False)
    return root, summary


def test_training_publishes_a_version_with_its_metrics(workspace):
    root, summary = workspace
    version_dir = root / "repo" / "tiny" / "1"
    assert summary["version_dir"] == str(version_dir) and summary["policy_version"] == "tiny/1"
    meta = PolicyMetadata.load(version_dir)
    sweep = load_sweep(root / "train")
    assert meta.candidates == CANDIDATES and meta.label_rule == "max_tau"
    assert meta.target == sweep.manifest["target"] and meta.drafter == sweep.manifest["drafter"]
    assert meta.data_digest == sweep.digest() and len(meta.data_digest) == 64
    assert meta.feature_kind in ("last_logits", "final_hidden") and meta.normalization
    holdout = meta.metrics["holdout"]
    assert holdout["prompts"] == 4 and meta.metrics["sweep"]["train_prompts"] == 12  # 25% of each dataset held out
    assert np.array(holdout["confusion"]).sum() == 4 and 0 <= holdout["accuracy"] <= holdout["within_one"] <= 1
    # Model selection tried both kinds at both widths (one rank) on the training rows.
    assert [row["config"] for row in meta.metrics["selection"]] == [
        "last_logits/w8/r4/k4", "last_logits/w16/r4/k4", "final_hidden/w8", "final_hidden/w16"]
    assert all(row["folds"] == 2 for row in meta.metrics["selection"])
    assert summary["chosen"] in [row["config"] for row in meta.metrics["selection"]]
    assert meta.metrics["train_datasets"] == ["alpha", "beta"]
    assert meta.metrics["onnx_check"]["real"]["rows"] == 16


def test_eval_compares_fixed_sizes_policy_and_oracle_on_the_same_prompts(workspace, tmp_path):
    root, _ = workspace
    policy = OnnxPolicy.load(root / "repo" / "tiny" / "1")
    report = evaluate_policy(policy, load_sweep(root / "eval"))
    files = write_report(report, tmp_path / "out")
    assert set(report["datasets"]) == {"gamma", "delta"} and report["overall"]["prompts"] == 10
    methods = report["overall"]["methods"]
    assert list(methods) == ["autoregressive", "B=2", "B=3", "B=4", "B=5", "B=6", "policy", "oracle"]
    assert methods["autoregressive"]["tau"] == 1.0 and methods["autoregressive"]["speedup"] == 1.0
    fixed = [methods[f"B={b}"]["tau"] for b in CANDIDATES]
    assert methods["oracle"]["tau"] >= max(fixed) - 1e-9
    assert min(fixed) - 1e-9 <= methods["policy"]["tau"] <= methods["oracle"]["tau"] + 1e-9
    assert max(fixed) > 1.2  # the drafter accepts: the table compares real differences
    # The policy's decisions are the ONNX policy's on the recorded features.
    sweep = load_sweep(root / "eval")
    features = sweep.features(policy.metadata.feature_kind)
    by_id = {p["id"]: p for p in sweep.prompts}
    for row in report["prompts"]:
        assert row["policy"] == policy.decide(np.asarray(features[by_id[row["id"]]["feature_row"]]))
    assert sum(report["overall"]["chosen_counts"].values()) == 10
    # Files: JSON, markdown tables, two PNGs.
    assert json.loads(files["json"].read_text())["policy"] == "tiny/1"
    markdown = files["markdown"].read_text()
    assert "| dataset | n | autoregressive | B=2 |" in markdown and "| ALL | 10 |" in markdown
    assert "tok/s" in markdown and "accuracy vs oracle" in markdown
    for key in ("tau_png", "sizes_png"):
        assert files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and files[key].stat().st_size > 5000


def test_eval_refuses_the_training_data_and_other_models(workspace):
    root, _ = workspace
    policy = OnnxPolicy.load(root / "repo" / "tiny" / "1")
    with pytest.raises(FailedPreconditionError, match="trained on"):
        evaluate_policy(policy, load_sweep(root / "train"))
    sweep = load_sweep(root / "eval")
    sweep.manifest["drafter"] = "another@000000000000"
    with pytest.raises(FailedPreconditionError, match="drafter"):
        evaluate_policy(policy, sweep)
    assert evaluate_policy(policy, sweep, allow_model_mismatch=True)["overall"]["prompts"] == 10
