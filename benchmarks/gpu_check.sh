#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU: the verifier backends on the default model (issue #6),
# then the public pair Qwen/Qwen3-4B + z-lab/Qwen3-4B-DFlash-b16 end to end (issue #17).
#
#   bash benchmarks/gpu_check.sh RESULTS_DIR        (or set OUT=RESULTS_DIR)
#
# Stages (each with its own timeout and log file RESULTS_DIR/<stage>.log; a failed stage is reported
# and the next ones still run when they can):
#   env                 python, torch + CUDA, GPU, tensorrt, onnxruntime providers. Without a CUDA
#                       GPU (or torch, onnx, this project) every stage that needs one is SKIPPED with
#                       that reason, and the public pair's preconditions (weights in the cache, the
#                       datasets) are still checked and named: what a CPU-only machine shows,
#                       within seconds, exit status 3. Without TensorRT (>= 10) only
#                       the TensorRT stages are skipped.
#   -- the default model (SmolLM2-135M-Instruct) --
#   prepare             the default model, de-quantized once into $BLOCKPILOT_CACHE
#   engine              ONNX export + TensorRT engine (fp16), both cached
#   benchmark           benchmarks/backends.py, torch vs onnxruntime (vs tensorrt) on the same prompts,
#                       which is also the lossless check (speculative == block size 1 per backend)
#   tests               the TensorRT tests of tests/unit/test_backends.py on the tiny Llama and Qwen3
#   -- the public pair, from the Hugging Face cache only (HF_HUB_OFFLINE=1: no hub is reached) --
#   public-weights      both repositories resolve from the cache; else every public stage is
#                       SKIPPED as "weights absent", with the fix (`hf download ...` where the hub is
#                       reachable, then copy the cache)
#   public-b1, -b16     `blockpilot generate` by repository id, torch backend, bfloat16 on cuda, one
#                       prompt at block size 1 and at 16 (prompt lookup off: DFlash drafts alone)
#   public-lossless     the two outputs are token-identical; τ and decode speed-up of that prompt
#   public-eval         `blockpilot drafter eval` over the evaluation sets, bfloat16 on cuda: per
#                       dataset the autoregressive baseline, τ and decode speed-up at block size 16,
#                       lossless per prompt
#   public-papers       those figures next to the papers' (public_summary.json); fails when an
#                       output differed from block size 1
#   public-trt-engine   TensorRT engine of the pair in bf16 (from a bfloat16 export: no fp32 detour
#                       for a 4B model), cached: a first build may not fit the budget (see its skip)
#   public-trt          benchmarks/backends.py, TensorRT vs torch (bfloat16 on cuda) on the pair
# The pair's prompts render with the chat template without thinking (TEMPLATE_KWARGS), as z-lab's
# Qwen3 drafters were trained.
#
# Time: every stage's timeout is cut to what is left of GPU_CHECK_BUDGET_S (default 450 s), and a
# stage that does not fit is SKIPPED with the time left, so the check ends in under 8 minutes.
#
# Exit status: 0 every stage ran and passed; 1 a stage failed or timed out; 2 usage; 3 the
# environment is incomplete (no stage that needs the GPU ran); 4 nothing failed but some stage was
# skipped.
# Results: summary.txt (the log, then every stage: ok / FAILED / TIMED OUT / SKIPPED and why),
# env.json, backends.json, public_b1.json, public_b16.json, public_eval.json, public_summary.json.
#
# Settings (environment): PYTHON (default .venv/bin/python), GPU_CHECK_BUDGET_S, PUBLIC_TARGET,
# PUBLIC_DRAFTER (default the pair above), PUBLIC_PROMPTS (per dataset, default 2),
# PUBLIC_MAX_NEW_TOKENS (default 128), DATASETS (folder of evaluation *.jsonl; default the first of
# shared/datasets and ../shared/datasets that exists), HF_HOME / HF_HUB_CACHE (the cache to read).
#
# Installs nothing. Assumes the repository with a venv made by `make install TORCH_EXTRA=` plus a
# CUDA build of torch and the gpu extra (onnxruntime-gpu in place of onnxruntime, tensorrt), or the
# GPU image (compose/Dockerfile, target runtime-gpu).
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
BUDGET="${GPU_CHECK_BUDGET_S:-450}"
# Kept free at the end of the budget: `timeout --kill-after` and the summary.
MARGIN=20
PUBLIC_TARGET="${PUBLIC_TARGET:-Qwen/Qwen3-4B}"
PUBLIC_DRAFTER="${PUBLIC_DRAFTER:-z-lab/Qwen3-4B-DFlash-b16}"
PUBLIC_PROMPTS="${PUBLIC_PROMPTS:-2}"
PUBLIC_MAX_NEW_TOKENS="${PUBLIC_MAX_NEW_TOKENS:-128}"
PUBLIC_BLOCK=16
PUBLIC_DATASETS=(gsm8k math500 humaneval mbpp mt_bench)
PUBLIC_PROMPT='Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?
Please reason step by step, and put your final answer within \boxed{}.'
# z-lab's Qwen3 drafters were trained on replies without thinking.
TEMPLATE_KWARGS='{"enable_thinking": false}'
FAILED=0
SKIPPED=0
START=$(date +%s)
STAGES=()
declare -A STATUS=()

log() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$SUMMARY" >&2; }
left() { echo $((START + BUDGET - MARGIN - $(date +%s))); }

record() {  # record NAME STATUS: the stage's line in the final table
  STAGES+=("$1")
  STATUS[$1]="$2"
}

skip() {  # skip NAME REASON
  log "stage $1: SKIPPED: $2"
  record "$1" "SKIPPED: $2"
  SKIPPED=1
}

# run_stage NAME TIMEOUT_S COMMAND...: runs with a timeout, output to RESULTS/NAME.log (with
# STAGE_OUT=FILE set, stdout goes to FILE and stderr to the log). A command that exits with
# SKIP_STATUS (set for the stage) says it cannot run on this machine: SKIPPED, with the log's last
# line as the reason, not FAILED.
run_stage() {
  local name="$1" limit="$2"
  shift 2
  local started rc
  started=$(date +%s)
  log "stage $name: start (timeout ${limit}s): $*"
  if [[ -n "${STAGE_OUT:-}" ]]; then
    if timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$STAGE_OUT" 2>"$RESULTS/$name.log"; then rc=0; else rc=$?; fi
  else
    if timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$RESULTS/$name.log" 2>&1; then rc=0; else rc=$?; fi
  fi
  if [[ $rc -eq 0 ]]; then
    log "stage $name: ok in $(($(date +%s) - started))s"
    record "$name" "ok in $(($(date +%s) - started))s"
  elif [[ -n "${SKIP_STATUS:-}" && $rc -eq $SKIP_STATUS ]]; then
    skip "$name" "$(tail -n 1 "$RESULTS/$name.log")"
  else
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
      log "stage $name: TIMED OUT after ${limit}s (log: $RESULTS/$name.log)"
      record "$name" "TIMED OUT after ${limit}s"
    else
      log "stage $name: FAILED with status $rc in $(($(date +%s) - started))s (log: $RESULTS/$name.log)"
      record "$name" "FAILED with status $rc"
    fi
    tail -n 20 "$RESULTS/$name.log" | sed 's/^/    | /' | tee -a "$SUMMARY" >&2
    FAILED=1
  fi
  return $rc
}

# budgeted NAME WANT_S MIN_S COMMAND...: run_stage with the timeout cut to the budget left, or
# SKIPPED when less than MIN_S is left.
budgeted() {
  local name="$1" want="$2" min="$3" remaining
  shift 3
  remaining=$(left)
  if [[ $remaining -lt $min ]]; then
    skip "$name" "${remaining}s left of the ${BUDGET}s budget, it needs at least ${min}s (rerun: the caches make the earlier stages faster)"
    return 1
  fi
  run_stage "$name" $((want < remaining ? want : remaining)) "$@"
}

# finish [3]: the table of stages, the result line, the exit status (3: the environment is incomplete).
finish() {
  log "done in $(($(date +%s) - START))s; results in $RESULTS"
  {
    echo
    echo "== stages"
    for name in "${STAGES[@]}"; do printf '%-18s %s\n' "$name" "${STATUS[$name]}"; done
  } | tee -a "$SUMMARY" >&2
  local code=0
  if [[ "${1:-}" == 3 ]]; then
    log "RESULT: environment incomplete: no stage that needs the GPU ran (see above)"
    code=3
  elif [[ $FAILED -ne 0 ]]; then
    log "RESULT: some stage failed (see above)"
    code=1
  elif [[ $SKIPPED -ne 0 ]]; then
    log "RESULT: no stage failed, some were skipped (see above)"
    code=4
  else
    log "RESULT: all stages passed"
  fi
  exit "$code"
}

ALL_LATER=(prepare engine benchmark tests public-weights public-b1 public-b16 public-lossless public-eval
           public-papers public-trt-engine public-trt)

# ---- env ---------------------------------------------------------------------------------------
if [[ ! -x "$PY" ]]; then
  log "missing: $PY (make the venv with 'make install TORCH_EXTRA=', or set PYTHON)"
  record env "FAILED: no interpreter $PY"
  for name in "${ALL_LATER[@]}"; do skip "$name" "environment incomplete: no Python interpreter $PY"; done
  finish 3
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
# TensorRT is optional: without it only the TensorRT stages are skipped, with this reason.
try:
    import tensorrt
    if int(tensorrt.__version__.split(".")[0]) < 10:
        report["tensorrt_missing"] = f"TensorRT >= 10 (found {tensorrt.__version__})"
    else:
        report["tensorrt"] = tensorrt.__version__
except ImportError as err:
    report["tensorrt_missing"] = f"no TensorRT: the 'tensorrt' package of the gpu extra ({err})"
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
ENV_SKIP=""
if [[ $ENV_OK -ne 0 ]]; then
  ENV_SKIP="$(sed -n 's/^MISSING: //p' "$RESULTS/env.log" | tail -n 1)"
  ENV_SKIP="environment incomplete: ${ENV_SKIP:-the env stage did not finish (see env.log)}"
  log "$ENV_SKIP: the stages that need a GPU are skipped; the public pair's preconditions are still checked"
else
  grep -E '"(python|torch|torch_cuda|gpu|tensorrt|tensorrt_missing|onnxruntime|onnxruntime_note|nvidia_smi)"' "$RESULTS/env.json" | tee -a "$SUMMARY" >&2 || true
fi
NO_TRT=""
if [[ -f "$RESULTS/env.json" ]] && ! grep -q '"tensorrt":' "$RESULTS/env.json"; then
  NO_TRT="$(sed -n 's/.*"tensorrt_missing": "\(.*\)",*$/\1/p' "$RESULTS/env.json")"
  NO_TRT="${NO_TRT:-no TensorRT (see env.json)}"
fi

# why_not REASON...: why a stage that needs the GPU cannot run ('' = it can): the environment's
# reason first, then the given ones, joined.
why_not() {
  local reasons=() reason
  for reason in "$ENV_SKIP" "$@"; do
    if [[ -n "$reason" ]]; then reasons+=("$reason"); fi
  done
  local joined=""
  for reason in "${reasons[@]}"; do joined="${joined:+$joined; }$reason"; done
  echo "$joined"
}

# ---- the default model: prepare --------------------------------------------------------------
if [[ -n "$ENV_SKIP" ]]; then
  for name in prepare engine benchmark tests; do skip "$name" "$(why_not)"; done
else
  budgeted prepare 60 20 "$PY" -m blockpilot.cli prepare || true

  # The drafter: the shipped one when this checkout has it, else an untrained ('random') one, whose
  # layers are DFlash's one-layer default, the same layers the engine stage exports for.
  DRAFTER=random
  if [[ -f models/SmolLM2-135M-Instruct-DFlash/config.json ]]; then
    DRAFTER=models/SmolLM2-135M-Instruct-DFlash
  fi
  log "drafter: $DRAFTER"

  # ---- the default model: ONNX export + TensorRT engine ----------------------------------------
  # The same engine spec as the benchmark's backend (so it finds this engine in the cache): fp16,
  # blocks up to 16, caches up to 2048 tokens (the prompts + 64 new tokens need far less).
  ENGINE_ARGS=(--precision fp16 --max-block-size 16 --max-context 2048)
  if [[ "$DRAFTER" != random ]]; then ENGINE_ARGS+=(--drafter "$DRAFTER"); fi
  if [[ -n "$NO_TRT" ]]; then
    skip engine "$NO_TRT"
  else
    budgeted engine 200 60 "$PY" -m blockpilot.cli -v export trt "${ENGINE_ARGS[@]}" || true
  fi

  # ---- the default model: lossless check + backend benchmark ------------------------------------
  BACKENDS=(torch onnxruntime tensorrt)
  if [[ -n "$NO_TRT" ]]; then
    BACKENDS=(torch onnxruntime)
    log "benchmark without tensorrt: $NO_TRT"
  fi
  budgeted benchmark 100 40 "$PY" benchmarks/backends.py --backends "${BACKENDS[@]}" --drafter "$DRAFTER" \
    --prompts 4 --max-new-tokens 64 --threads 4 --trt-precision fp16 --trt-max-context 2048 \
    --out "$RESULTS/backends.json" || true
  if [[ -f "$RESULTS/backends.json" ]]; then
    grep -E "decode tok/s|/ar|/speculative|verify step|lossless|FAILED" "$RESULTS/benchmark.log" | tee -a "$SUMMARY" >&2 || true
  fi

  # ---- TensorRT tests on tiny models --------------------------------------------------------------
  if [[ -n "$NO_TRT" ]]; then
    skip tests "$NO_TRT"
  else
    budgeted tests 75 30 "$PY" -m pytest tests/unit/test_backends.py -q -rs -k "tensorrt and not variant" -p no:cacheprovider || true
    if [[ -f "$RESULTS/tests.log" ]]; then tail -n 3 "$RESULTS/tests.log" | tee -a "$SUMMARY" >&2 || true; fi
  fi
fi

# ---- the public pair --------------------------------------------------------------------------------
# Its preconditions (the weights in the cache, the datasets) need no GPU, so they are checked on any
# machine: a CPU-only one learns what a GPU machine would still lack.
export HF_HUB_OFFLINE=1
log "public pair: $PUBLIC_TARGET + $PUBLIC_DRAFTER (Hugging Face cache, offline)"
TARGET_DIR=""
DRAFTER_DIR=""
WEIGHTS_SKIP=""
# Absent weights are a precondition of this machine, not a failure of the code: exit 4 = SKIPPED.
if SKIP_STATUS=4 budgeted public-weights 60 10 "$PY" - "$PUBLIC_TARGET" "$PUBLIC_DRAFTER" "$RESULTS/public_models.txt" <<'EOF'; then
import sys

from blockpilot.models.store import resolve_drafter, resolve_target

target, drafter, out = sys.argv[1:]
folders, absent = [], []
for resolve, name in ((lambda n: resolve_target(n, progress=False), target), (resolve_drafter, drafter)):
    try:
        folders.append(resolve(name))
    except Exception as err:  # the store's one-line errors name the repository and how to get it
        absent.append(str(err))
if absent:
    print("weights absent: " + "; ".join(absent), file=sys.stderr)
    sys.exit(4)
with open(out, "w") as handle:
    handle.write("\n".join(map(str, folders)) + "\n")
print("\n".join(map(str, folders)))
EOF
  TARGET_DIR="$(sed -n 1p "$RESULTS/public_models.txt")"
  DRAFTER_DIR="$(sed -n 2p "$RESULTS/public_models.txt")"
  log "public pair in the cache: $TARGET_DIR, $DRAFTER_DIR"
else
  # The later stages name the reason; public-weights says it in full.
  case "${STATUS[public-weights]}" in
    "SKIPPED: weights absent"*) WEIGHTS_SKIP="weights absent (see public-weights)" ;;
    *) WEIGHTS_SKIP="public-weights ${STATUS[public-weights]}" ;;
  esac
fi

# One prompt through `blockpilot generate` by repository id, block size 1 then 16.
GEN_ARGS=(--target "$PUBLIC_TARGET" --drafter "$PUBLIC_DRAFTER" --backend torch --dtype bfloat16 --device cuda
          --chat-template-kwargs "$TEMPLATE_KWARGS" --prompt-lookup off --max-new-tokens "$PUBLIC_MAX_NEW_TOKENS" --json)
GEN_SKIP="$(why_not "$WEIGHTS_SKIP")"
for block in 1 "$PUBLIC_BLOCK"; do
  if [[ -n "$GEN_SKIP" ]]; then
    skip "public-b$block" "$GEN_SKIP"
  else
    STAGE_OUT="$RESULTS/public_b$block.json" budgeted "public-b$block" 150 60 \
      "$PY" -m blockpilot.cli generate "${GEN_ARGS[@]}" --block-size "$block" "$PUBLIC_PROMPT" || true
  fi
done
if [[ -s "$RESULTS/public_b1.json" && -s "$RESULTS/public_b$PUBLIC_BLOCK.json" ]]; then
  budgeted public-lossless 30 5 "$PY" - "$RESULTS/public_b1.json" "$RESULTS/public_b$PUBLIC_BLOCK.json" <<'EOF' || true
import json, sys

ar, spec = (json.loads(open(path).read().strip().splitlines()[-1]) for path in sys.argv[1:])
same = ar["token_ids"] == spec["token_ids"]
speedup = spec["decode_tokens_per_s"] / ar["decode_tokens_per_s"] if ar["decode_tokens_per_s"] else float("nan")
print(f"one prompt, {ar['dtype']} on {ar['device']}: block size 1 {ar['decode_tokens_per_s']:.1f} tok/s, block size "
      f"{spec['block_size']} {spec['decode_tokens_per_s']:.1f} tok/s (decode speed-up {speedup:.2f}x), tau {spec['tau']:.2f}, "
      f"{len(spec['token_ids'])} tokens, lossless: {'identical' if same else 'DIFFERENT'}")
if not same:
    first = next((i for i, (a, b) in enumerate(zip(ar["token_ids"], spec["token_ids"])) if a != b),
                 min(len(ar["token_ids"]), len(spec["token_ids"])))
    print(f"LOSSLESS FAILED: the outputs differ from token {first} on", file=sys.stderr)
    sys.exit(1)
EOF
  grep -h "^one prompt" "$RESULTS/public-lossless.log" 2>/dev/null | tee -a "$SUMMARY" >&2 || true
else
  skip public-lossless "${GEN_SKIP:-no output of public-b1 and public-b$PUBLIC_BLOCK to compare}"
fi

# Per dataset through `blockpilot drafter eval` (one process: the model loads once), given the local
# folders the cache resolved (its --drafter takes a checkpoint directory).
DATASETS_DIR="${DATASETS:-}"
if [[ -z "$DATASETS_DIR" ]]; then
  for candidate in shared/datasets ../shared/datasets; do
    if [[ -f "$candidate/gsm8k.jsonl" ]]; then DATASETS_DIR="$candidate"; break; fi
  done
fi
DATASETS_SKIP=""
for dataset in "${PUBLIC_DATASETS[@]}"; do
  if [[ -z "$DATASETS_DIR" || ! -f "$DATASETS_DIR/$dataset.jsonl" ]]; then
    DATASETS_SKIP="no evaluation set $dataset.jsonl (set DATASETS to the folder of ${PUBLIC_DATASETS[*]})"
    break
  fi
done
EVAL_SKIP="$(why_not "$WEIGHTS_SKIP" "$DATASETS_SKIP")"
if [[ -n "$EVAL_SKIP" ]]; then
  skip public-eval "$EVAL_SKIP"
else
  budgeted public-eval 240 90 "$PY" -m blockpilot.cli drafter eval --target "$TARGET_DIR" --drafter "$DRAFTER_DIR" \
    --datasets-dir "$DATASETS_DIR" --datasets "${PUBLIC_DATASETS[@]}" --prompts-per-dataset "$PUBLIC_PROMPTS" \
    --max-new-tokens "$PUBLIC_MAX_NEW_TOKENS" --radius 0 --block-size "$PUBLIC_BLOCK" --no-temperature --no-lookup \
    --backend torch --dtype bfloat16 --device cuda --chat-template-kwargs "$TEMPLATE_KWARGS" \
    --out "$RESULTS/public_eval.json" || true
fi
if [[ -s "$RESULTS/public_eval.json" ]]; then
  budgeted public-papers 30 5 "$PY" - "$RESULTS/public_eval.json" "$RESULTS/public_summary.json" "$PUBLIC_TARGET" \
    "$PUBLIC_DRAFTER" "$PUBLIC_MAX_NEW_TOKENS" <<'EOF' || true
import json, sys

report_path, out_path, target, drafter, max_new_tokens = sys.argv[1:]
# Speed-up / τ per dataset at temperature 0, block size 16, from the project's research notes
# (shared/research/papers.md): DFlash Table 1 (H200, Transformers backend, thinking off, up to 2048
# new tokens); alpaca from the DFlash README of 2026-01-05 (B200). BlockPilot gives averages only
# (H100, DFlash(16): Qwen3-4B 3.99x / 6.31, Qwen3-8B 4.42x / 6.13).
PAPERS = {
    ("Qwen/Qwen3-4B", "z-lab/Qwen3-4B-DFlash-b16"): {
        "gsm8k": (5.15, 6.53), "math500": (6.09, 7.84), "humaneval": (5.21, 6.64), "mbpp": (4.78, 6.09),
        "mt_bench": (2.85, 4.35), "alpaca": (2.23, 3.10)},
    ("Qwen/Qwen3-8B", "z-lab/Qwen3-8B-DFlash-b16"): {
        "gsm8k": (5.15, 6.54), "math500": (6.08, 7.87), "humaneval": (5.14, 6.50), "mbpp": (4.65, 5.95),
        "mt_bench": (2.75, 4.24), "alpaca": (2.27, 3.16)},
}
# τ this far under the paper's points at a setup problem (chat template, dtype, the drafter's layers)
# rather than at the short run; speed-ups depend on the engine and are only reported.
LOW_TAU = 0.75
report = json.load(open(report_path))
papers = PAPERS.get((target, drafter), {})
rows, lossless_ok = {}, True
print(f"{'dataset':10} {'n':>3} {'tau':>6} {'paper':>6} {'ratio':>6} {'speed-up':>9} {'paper':>7} {'lossless':>9}")
for name, block in report["datasets"].items():
    run = block["decodes"]["dflash"]
    paper_speedup, paper_tau = papers.get(name, (None, None))
    row = {"prompts": block["prompts"], "block_size": run["block_size"], "tau": run["tau"], "speedup": run["speedup"],
           "ar_decode_tokens_per_s": block["ar_decode_tokens_per_s"], "decode_tokens_per_s": run["decode_tokens_per_s"],
           "lossless_prompts": run["lossless_prompts"], "paper_tau": paper_tau, "paper_speedup": paper_speedup,
           "tau_ratio": run["tau"] / paper_tau if paper_tau else None}
    row["low_tau"] = row["tau_ratio"] is not None and row["tau_ratio"] < LOW_TAU
    lossless_ok &= run["lossless_prompts"] == block["prompts"]
    rows[name] = row
    paper = lambda value, fmt: format(value, fmt) if value is not None else "-"
    print(f"{name:10} {block['prompts']:>3} {run['tau']:>6.2f} {paper(paper_tau, '6.2f'):>6} "
          f"{paper(row['tau_ratio'], '6.2f'):>6} {run['speedup']:>8.2f}x {paper(paper_speedup, '6.2f'):>6}x "
          f"{run['lossless_prompts']:>4}/{block['prompts']}" + ("  LOW tau" if row["low_tau"] else ""))
overall = report["overall"]["decodes"]["dflash"]
print(f"{'ALL':10} {report['overall']['prompts']:>3} {overall['tau']:>6.2f} {'-':>6} {'-':>6} {overall['speedup']:>8.2f}x "
      f"{'-':>6}x {overall['lossless_prompts']:>4}/{report['overall']['prompts']}")
notes = [f"{max_new_tokens} new tokens per prompt (the papers: up to 2048), few prompts: tau is noisy and shorter replies "
         "accept less; speed-ups are this engine's (the papers' Transformers backend on H200/B200)"]
summary = {"target": target, "drafter": drafter, "backend": report.get("backend"), "dtype": report.get("dtype"),
           "device": report.get("device"), "chat_template_kwargs": report.get("chat_template_kwargs"),
           "max_new_tokens": int(max_new_tokens),
           "datasets": rows, "overall": {"prompts": report["overall"]["prompts"], "tau": overall["tau"],
                                         "speedup": overall["speedup"], "lossless_prompts": overall["lossless_prompts"]}, "papers_source": "shared/research/papers.md: DFlash Table 1 (H200), alpaca: DFlash README (B200)",
           "notes": notes, "lossless": lossless_ok}
with open(out_path, "w") as handle:
    json.dump(summary, handle, indent=2)
for note in notes:
    print(f"note: {note}")
if not lossless_ok:
    print("LOSSLESS FAILED: some output at block size 16 differs from block size 1 (public_eval.json, prompts)", file=sys.stderr)
    sys.exit(1)
EOF
  grep -vh "^LOSSLESS" "$RESULTS/public-papers.log" 2>/dev/null | tee -a "$SUMMARY" >&2 || true
else
  skip public-papers "${EVAL_SKIP:-public-eval wrote no report}"
fi

# TensorRT vs torch on the pair.
TRT_ENGINE_ARGS=(--target "$TARGET_DIR" --drafter "$DRAFTER_DIR" --precision bf16 --dtype bfloat16
                 --max-block-size "$PUBLIC_BLOCK" --max-context 2048)
TRT_SKIP="$(why_not "$WEIGHTS_SKIP" "$NO_TRT")"
if [[ -n "$TRT_SKIP" ]]; then
  skip public-trt-engine "$TRT_SKIP"
  skip public-trt "$TRT_SKIP"
elif ! budgeted public-trt-engine 240 60 "$PY" -m blockpilot.cli -v export trt "${TRT_ENGINE_ARGS[@]}"; then
  skip public-trt "no TensorRT engine of the pair; build it once outside this check (it is cached and found next time): $PY -m blockpilot.cli -v export trt ${TRT_ENGINE_ARGS[*]}"
else
  budgeted public-trt 180 60 "$PY" benchmarks/backends.py --backends torch tensorrt --target "$TARGET_DIR" \
    --drafter "$DRAFTER_DIR" --dtype bfloat16 --device cuda --prompts 2 --max-new-tokens "$PUBLIC_MAX_NEW_TOKENS" \
    --trt-precision bf16 --trt-max-context 2048 --out "$RESULTS/public_backends.json" || true
  grep -E "decode tok/s|/ar|/speculative|lossless|FAILED" "$RESULTS/public-trt.log" 2>/dev/null | tee -a "$SUMMARY" >&2 || true
fi

if [[ -n "$ENV_SKIP" ]]; then finish 3; fi
finish
