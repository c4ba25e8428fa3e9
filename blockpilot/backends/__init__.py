"""Verifier backends: the torch engine, ONNX Runtime and TensorRT (issue #6).

The names live here, free of heavy imports, so configuration code can validate a backend name
without loading torch: blockpilot.backends.base defines the interface, loader.py picks one.
"""

TORCH = "torch"
ONNXRUNTIME = "onnxruntime"
TENSORRT = "tensorrt"
BACKENDS = (TORCH, ONNXRUNTIME, TENSORRT)
