"""`blockpilot up` hands each service its settings through BLOCKPILOT_<SERVICE>_* variables."""

from __future__ import annotations

from blockpilot.config import VerifierServiceConfig, load_config
from blockpilot.serving.stack import StackOptions, _service_env


def verifier_env(opts: StackOptions) -> dict[str, str]:
    return {k: v for k, v in _service_env("verifier", opts, "memory").items() if k.startswith("BLOCKPILOT_VERIFIER_")}


def test_up_backend_flag_reaches_the_verifier_and_only_it(monkeypatch):
    monkeypatch.delenv("BLOCKPILOT_VERIFIER_BACKEND", raising=False)
    assert load_config(VerifierServiceConfig, [], env=verifier_env(StackOptions())).backend == "onnxruntime"  # the default
    assert load_config(VerifierServiceConfig, [], env=verifier_env(StackOptions(backend="torch"))).backend == "torch"
    assert "BLOCKPILOT_DRAFTER_BACKEND" not in _service_env("drafter", StackOptions(backend="torch"), "memory")


def test_without_the_flag_the_environment_still_decides(monkeypatch):
    monkeypatch.setenv("BLOCKPILOT_VERIFIER_BACKEND", "torch")
    assert verifier_env(StackOptions())["BLOCKPILOT_VERIFIER_BACKEND"] == "torch"
    assert verifier_env(StackOptions(backend="onnxruntime"))["BLOCKPILOT_VERIFIER_BACKEND"] == "onnxruntime"
