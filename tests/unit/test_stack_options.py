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


def test_the_verifier_exports_the_layers_the_started_drafter_reads(tiny_llama_dir, tmp_path):
    from blockpilot.models.drafter import DFlashDrafter
    from blockpilot.models.target import TargetModel

    env = verifier_env(StackOptions(target=str(tiny_llama_dir), drafter="random"))
    target = TargetModel.from_pretrained(tiny_llama_dir)
    random_layers = DFlashDrafter.random(target.config).target_layer_ids  # what the drafter service builds
    assert env["BLOCKPILOT_VERIFIER_ONNX_LAYERS"] == ",".join(map(str, random_layers))
    DFlashDrafter.random(target.config, target_layer_ids=(0, 2), num_hidden_layers=2).save_pretrained(tmp_path / "d")
    assert verifier_env(StackOptions(target=str(tiny_llama_dir), drafter=str(tmp_path / "d")))["BLOCKPILOT_VERIFIER_ONNX_LAYERS"] == "0,2"
    # The shipped drafter ('') and no drafter: the verifier's own rule, nothing passed.
    assert "BLOCKPILOT_VERIFIER_ONNX_LAYERS" not in verifier_env(StackOptions(target=str(tiny_llama_dir), drafter="none"))


def test_up_dtype_and_device_reach_the_verifier_and_the_drafter(monkeypatch):
    from blockpilot.config import DrafterServiceConfig

    for name in ("VERIFIER", "DRAFTER"):
        for key in ("DTYPE", "DEVICE"):
            monkeypatch.delenv(f"BLOCKPILOT_{name}_{key}", raising=False)
    opts = StackOptions(backend="torch", dtype="bfloat16", device="cuda:1", drafter="none")
    verifier = load_config(VerifierServiceConfig, [], env=verifier_env(opts))
    drafter = load_config(DrafterServiceConfig, [], env={k: v for k, v in _service_env("drafter", opts, "memory").items()
                                                         if k.startswith("BLOCKPILOT_DRAFTER_")})
    assert (verifier.dtype, verifier.device) == (drafter.dtype, drafter.device) == ("bfloat16", "cuda:1")
    assert "BLOCKPILOT_POLICY_DTYPE" not in _service_env("policy", opts, "memory")
    # Without the flags each service's environment decides.
    monkeypatch.setenv("BLOCKPILOT_DRAFTER_DTYPE", "float16")
    assert _service_env("drafter", StackOptions(), "memory")["BLOCKPILOT_DRAFTER_DTYPE"] == "float16"


def test_up_refuses_a_bad_placement_before_anything_starts(monkeypatch, tmp_path):
    import pytest

    from blockpilot.errors import InvalidArgumentError
    from blockpilot.serving import stack

    with pytest.raises(InvalidArgumentError, match=r"up --device must be 'cpu', 'cuda' or 'cuda:N' .*got 'gpu'"):
        StackOptions(device="gpu")
    monkeypatch.setenv("BLOCKPILOT_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("BLOCKPILOT_VERIFIER_BACKEND", raising=False)
    monkeypatch.setattr(stack, "_spawn", lambda *a, **k: pytest.fail("a service started"))
    with pytest.raises(InvalidArgumentError, match="device 'cuda' sets the torch backend; the onnxruntime backend"):
        stack.up(StackOptions(device="cuda"), log=lambda *_: None)
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("BLOCKPILOT_VERIFIER_BACKEND", "tensorrt")  # the environment's backend counts too
    with pytest.raises(InvalidArgumentError, match="the tensorrt backend runs on the device its runtime picks"):
        stack.check_verifier_placement(StackOptions(device="cuda:0"))
    stack.check_verifier_placement(StackOptions(backend="torch", device="cuda:0", dtype="bfloat16"))
