"""The BlockPilot block-size policy: features, sweeps, training, ONNX export, evaluation,
the policy repository and A/B experiments (issue #5)."""
