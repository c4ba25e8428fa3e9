#!/usr/bin/env bash
# GPU check of the verifier backends (issue #6), for a machine with an NVIDIA GPU.
#
#   bash benchmarks/gpu_check.sh RESULTS_DIR        (or set OUT=RESULTS_DIR)
#
# Stages (each with its own timeout and log file; a failed stage is reported and the next ones
# still run when they can; the exit status is non-zero when any stage failed):
#   1. environment: python, torch + CUDA, GPU, tensorrt, onnxruntime providers (exit 3 if missing)
#   2. prepare:     the default model (de-quantized once into $BLOCKPILOT_CACHE)
#   3. engine:      ONNX export of the default model + TensorRT engine (fp16), both cached
#   4. benchmark:   benchmarks/backends.py, torch vs onnxruntime vs tensorrt on the same prompts,
#                   which is also the lossless check (speculative == block size 1 per backend)
#   5. tests:       the TensorRT tests of tests/unit/test_backends.py on the tiny Llama and Qwen3
#                   (fp32 engine vs torch <= 1e-4,
#                   lossless speculative decoding on fp32 and fp16 engines)
# Expected wall time: about 4-6 minutes; the stage timeouts add up to 460 s (under 8 minutes).
#
# Installs nothing. Assumes the repository with a venv made by `make install TORCH_EXTRA=` plus a
# CUDA build of torch and the gpu extra (onnxruntime-gpu, tensorrt); PYTHON overrides the
# interpreter (default .venv/bin/python).
set -euo pipefail

cd "$(dirname "$0")/.."
RESULTS="${1:-${OUT:-}}"
if [[ -z "$RESULTS" ]]; then
  echo "usage: bash benchmarks/gpu_check.sh RESULTS_DIR (or set OUT)" >&2
  exit 2
fi
mkdir -p "$RESULTS"
RESULTS="$(cd "$RESULTS" && pwd)"
PY="${PYTHON:-.venv/bin/python}"
SUMMARY="$RESULTS/summary.txt"
: >"$SUMMARY"
FAILED=0
START=$(date +%s)

log() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$SUMMARY" >&2; }

# run_stage NAME TIMEOUT_S COMMAND...: runs with a timeout, output to RESULTS/NAME.log.
run_stage() {
  local name="$1" limit="$2"
  shift 2
  local started rc
  started=$(date +%s)
  log "stage $name: start (timeout ${limit}s): $*"
  if timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$RESULTS/$name.log" 2>&1; then
    rc=0
  else
    rc=$?
  fi
  if [[ $rc -eq 0 ]]; then
    log "stage $name: ok in $(($(date +%s) - started))s"
  else
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
      log "stage $name: TIMED OUT after ${limit}s (log: $RESULTS/$name.log)"
    else
      log "stage $name: FAILED with status $rc in $(($(date +%s) - started))s (log: $RESULTS/$name.log)"
    fi
    tail -n 20 "$RESULTS/$name.log" | sed 's/^/    | /' | tee -a "$SUMMARY" >&2
    FAILED=1
  fi
  return $rc
}

# ---- 1. environment ----------------------------------------------------------------------------
if [[ ! -x "$PY" ]]; then
  log "missing: $PY (make the venv with 'make install TORCH_EXTRA=', or set PYTHON)"
  exit 3
fi
ENV_OK=0
run_stage env 25 "$PY" - "$RESULTS/env.json" <<'EOF' || ENV_OK=$?
import json, subprocess, sys
report, missing = {}, []
report["python"] = sys.version.split()[0]
try:
    import torch
    report["torch"] = torch.__version__
    report["torch_cuda"] = torch.version.cuda
    report["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        report["gpu"] = f"{props.name} (sm {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    else:
        missing.append("a CUDA GPU visible to torch (is this a CPU build of torch? install a CUDA build)")
except ImportError as err:
    missing.append(f"torch ({err})")
try:
    import tensorrt
    report["tensorrt"] = tensorrt.__version__
    if int(tensorrt.__version__.split(".")[0]) < 10:
        missing.append(f"TensorRT >= 10 (found {tensorrt.__version__})")
except ImportError as err:
    missing.append(f"the 'tensorrt' package of the gpu extra ({err})")
try:
    import onnxruntime
    report["onnxruntime"] = onnxruntime.__version__
    report["onnxruntime_providers"] = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in report["onnxruntime_providers"]:
        report["onnxruntime_note"] = ("no CUDAExecutionProvider: the onnxruntime backend runs on CPU "
                                      "(install onnxruntime-gpu in place of onnxruntime)")
except ImportError as err:
    missing.append(f"onnxruntime ({err})")
for module, why in (("onnx", "the ONNX export"), ("onnxscript", "torch.onnx.export (dynamo exporter)"),
                    ("blockpilot", "this project (make install TORCH_EXTRA=)")):
    try:
        __import__(module)
    except ImportError as err:
        missing.append(f"{module}, needed by {why} ({err})")
try:
    report["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                          capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.TimeoutExpired) as err:
    report["nvidia_smi"] = f"unavailable: {err}"
report["missing"] = missing
with open(sys.argv[1], "w") as handle:
    json.dump(report, handle, indent=2)
print(json.dumps(report, indent=2))
if missing:
    print("MISSING: " + "; ".join(missing), file=sys.stderr)
    sys.exit(3)
EOF
if [[ $ENV_OK -ne 0 ]]; then
  log "environment incomplete (see above): nothing else can run"
  exit 3
fi

grep -E '"(python|torch|torch_cuda|gpu|tensorrt|onnxruntime|onnxruntime_note|nvidia_smi)"' "$RESULTS/env.json" | tee -a "$SUMMARY" >&2 || true

# ---- 2. the default model ----------------------------------------------------------------------
run_stage prepare 60 "$PY" -m blockpilot.cli prepare || true

# The drafter: the shipped one when this checkout has it, else an untrained ('random') one, whose
# layers are DFlash's one-layer default, the same layers the engine stage exports for.
DRAFTER=random
if [[ -f models/SmolLM2-135M-Instruct-DFlash/config.json ]]; then
  DRAFTER=models/SmolLM2-135M-Instruct-DFlash
fi
log "drafter: $DRAFTER"

# ---- 3. ONNX export + TensorRT engine ----------------------------------------------------------
# The same engine spec as the benchmark's backend (so it finds this engine in the cache): fp16,
# blocks up to 16, caches up to 2048 tokens (the prompts + 64 new tokens need far less).
ENGINE_ARGS=(--precision fp16 --max-block-size 16 --max-context 2048)
if [[ "$DRAFTER" != random ]]; then ENGINE_ARGS+=(--drafter "$DRAFTER"); fi
run_stage engine 200 "$PY" -m blockpilot.cli -v export trt "${ENGINE_ARGS[@]}" || true

# ---- 4. lossless check + backend benchmark ------------------------------------------------------
run_stage benchmark 100 "$PY" benchmarks/backends.py --backends torch onnxruntime tensorrt --drafter "$DRAFTER" \
  --prompts 4 --max-new-tokens 64 --threads 4 --trt-precision fp16 --trt-max-context 2048 \
  --out "$RESULTS/backends.json" || true
if [[ -f "$RESULTS/backends.json" ]]; then
  grep -E "decode tok/s|/ar|/speculative|verify step|lossless|FAILED" "$RESULTS/benchmark.log" | tee -a "$SUMMARY" >&2 || true
fi

# ---- 5. TensorRT tests on tiny models ------------------------------------------------------------
run_stage tests 75 "$PY" -m pytest tests/unit/test_backends.py -q -rs -k "tensorrt and not variant" -p no:cacheprovider || true
tail -n 3 "$RESULTS/tests.log" | tee -a "$SUMMARY" >&2 || true

log "done in $(($(date +%s) - START))s; results in $RESULTS (summary.txt, env.json, backends.json, *.log)"
if [[ $FAILED -ne 0 ]]; then
  log "RESULT: some stage failed (see above)"
  exit 1
fi
log "RESULT: all stages passed"
