"""Verifier backends: the torch engine, ONNX Runtime and TensorRT (issue #6).

The names live here, free of heavy imports, so configuration code can validate a backend name
without loading torch: blockpilot.backends.base defines the interface, loader.py picks one.
"""

TORCH = "torch"
ONNXRUNTIME = "onnxruntime"
TENSORRT = "tensorrt"
BACKENDS = (TORCH, ONNXRUNTIME, TENSORRT)
CPU_BACKENDS = (TORCH, ONNXRUNTIME)  # what offline tools (prepare, eval, sweeps) run on

# What the user-facing entry points (`blockpilot generate`, the verifier service's config) run
# when no backend is named: the same graph through ONNX Runtime decodes about twice as fast as the
# torch engine on CPU (benchmarks/engine.py: the engine pays a Python call per op, ORT runs the
# graph in C++), and its output is token-identical (tests/integration/test_backends_*.py). Its cost
# is a one-time export per target into $BLOCKPILOT_CACHE/onnx (`blockpilot prepare` makes it for
# the default model). In-process library calls (load_engine, BackendOptions()) keep the torch
# engine: no export step, and what the drafter service and the offline tools want.
DEFAULT_VERIFIER_BACKEND = ONNXRUNTIME

# Precision of the onnxruntime backend on the CPU (the fused graph, blockpilot.backends.fused_graph):
# fp32, or int4: a GGUF model's own 4-bit codes (Q4_1 layers, Q8_0 output projection) through
# MatMulNBits with 8-bit activations. "auto": the target's own format, i.e. int4 for a target
# converted from a GGUF file whose layers are Q4_1 / Q8_0 (the default model), else fp32.
FP32 = "fp32"
INT4 = "int4"
AUTO = "auto"
PRECISIONS = (FP32, INT4)
PRECISION_CHOICES = (AUTO, FP32, INT4)
DEFAULT_PRECISION = AUTO
