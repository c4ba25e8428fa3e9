"""Verifier backends: the torch engine, ONNX Runtime and TensorRT (issue #6)."""
