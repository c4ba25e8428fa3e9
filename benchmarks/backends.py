"""Verifier backends on the same prompts in one run: decode tokens/s of torch, onnxruntime (and
tensorrt where a GPU and TensorRT are present), autoregressive (block size 1) and speculative (the
drafter's block size), greedy, plus the cost of one verify step per backend. Every output is checked
against the torch engine's block-size-1 output of the same prompt (the lossless check): the report
says how many are token-identical, and the exit status is 1 when any speculative output differs from
its own backend's block-size-1 output (the invariant).

    .venv/bin/python benchmarks/backends.py --prompts 4 --max-new-tokens 64 --drafter random --out runs/backends.json
    .venv/bin/python benchmarks/backends.py --backends torch onnxruntime tensorrt ...   # on a GPU machine
    .venv/bin/python benchmarks/backends.py --backends torch tensorrt --dtype bfloat16 --device cuda ...

Runs are interleaved (for each prompt, every backend and mode in turn) so that a slow phase of a
shared machine does not land on one backend. Prefill (TTFT) is reported separately and excluded
from decode tokens/s. Prompts: --datasets (the project's JSONL files), else a built-in set.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from blockpilot.backends.base import TORCH, backend_name
from blockpilot.backends.loader import BackendOptions, default_export_layers, load_backend
from blockpilot.benchmarking import load_prompts
from blockpilot.decoding.drafting import LocalDrafter
from blockpilot.decoding.speculative import SamplingParams, SpeculativeDecoder
from blockpilot.models.drafter import DFlashDrafter
from blockpilot.models.placement import DEFAULT_DEVICE, DEFAULT_DTYPE, DTYPE_NAMES, Placement
from blockpilot.models.store import resolve_drafter, resolve_target
from blockpilot.models.target import TargetModel
from blockpilot.models.tokenizer import ChatTokenizer
from blockpilot.runtime import SHIPPED_DRAFTER_NAME, shipped_drafter_dir, untrained_mask_token

BUILTIN_PROMPTS = [
    "Explain in three sentences why the sky is blue.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Give me three tips for staying focused while studying.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "List the planets of the solar system in order from the sun.",
    "How do I make a cup of green tea?",
]


def load_drafter(name: str | None, target: TargetModel, tokenizer: ChatTokenizer, block_size: int):
    """(DFlashDrafter, label): the shipped drafter by default when the checkout has one, else 'random';
    in the target's dtype on its device."""
    if name is None:
        shipped = shipped_drafter_dir()
        name = str(shipped) if shipped is not None else "random"
    if name == "random":
        drafter = DFlashDrafter.random(target.config, block_size=block_size, mask_token_id=untrained_mask_token(tokenizer))
        return drafter.to(device=target.device, dtype=target.dtype), "random"
    path = resolve_drafter(name)
    label = SHIPPED_DRAFTER_NAME if path == shipped_drafter_dir() else name
    return DFlashDrafter.from_pretrained(path, dtype=target.dtype, device=target.device), label


def drafter_beside(backend, target: TargetModel, drafter: DFlashDrafter) -> LocalDrafter:
    """The drafter on the backend's device: a GPU backend gets its own GPU copy of the torch target
    (embedding, output projection) and of the drafter, so drafting does not run on the CPU."""
    if backend.device == target.device:
        return LocalDrafter(drafter, target)
    target_copy = copy.deepcopy(target).to(backend.device)
    target_copy.prepare_for_inference()
    return LocalDrafter(copy.deepcopy(drafter).to(backend.device), target_copy)


@torch.inference_mode()
def step_cost_ms(backend, vocab: int, context: int, sizes: list[int], repeats: int) -> dict[int, float]:
    """Median time of one forward of k new tokens on a `context`-token cache (k = 1: an
    autoregressive step; k = block size: a verify step)."""
    generator = torch.Generator().manual_seed(0)
    cache = backend.new_cache(context + max(sizes) + 1)
    # The torch target takes its tokens on its own device (the graph backends copy them themselves).
    backend(torch.randint(vocab, (1, context), generator=generator).to(backend.device), cache, num_logits=1)
    out = {}
    for k in sizes:
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            tokens = torch.randint(vocab, (1, k), generator=generator).to(backend.device)
            cache.truncate(context)
            started = time.perf_counter()
            result = backend(tokens, cache)
            if result.logits.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        out[k] = statistics.median(times[1:]) * 1000
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", type=Path, default=None, help="a prompt JSONL file or a folder of them (default: built-in prompts)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--target", default=None)
    parser.add_argument("--drafter", default=None, help="DFlash checkpoint directory or Hugging Face repository id, or 'random' "
                                                         "(default: the shipped drafter, else random)")
    parser.add_argument("--block-size", type=int, default=None, help="speculative block size (default: the drafter's)")
    parser.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"], choices=("torch", "onnxruntime", "tensorrt"))
    parser.add_argument("--onnx", type=Path, default=None, help="export folder (default: the on-demand export in the cache)")
    parser.add_argument("--ort-provider", default="auto", choices=("auto", "cpu", "cuda", "tensorrt"))
    parser.add_argument("--trt-precision", default="fp16", choices=("fp16", "bf16", "fp32"))
    parser.add_argument("--trt-max-context", type=int, default=None, help="the engine's largest cache length (default: the model's context)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default=DEFAULT_DTYPE,
                        help=f"precision of the target's and the drafter's weights and KV caches (default {DEFAULT_DTYPE}); "
                             f"onnxruntime / tensorrt run an export of this dtype")
    parser.add_argument("--device", default=DEFAULT_DEVICE,
                        help=f"'cpu', 'cuda' or 'cuda:N': where the torch backend runs, with the drafter beside it (default "
                             f"{DEFAULT_DEVICE}); onnxruntime / tensorrt run on their runtime's device, the drafter copied there")
    parser.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime CPU threads")
    parser.add_argument("--step-repeats", type=int, default=15, help="repeats of the verify-step timing")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    placement = Placement(args.dtype, args.device)
    device = placement.torch_device()  # before any load: a missing GPU is said at once
    target_dir = resolve_target(args.target)
    tokenizer = ChatTokenizer(target_dir)
    target = TargetModel.from_pretrained(target_dir, dtype=placement.torch_dtype, device=device)
    drafter_model, drafter_label = load_drafter(args.drafter, target, tokenizer, args.block_size or 8)
    block_size = args.block_size or drafter_model.config.block_size
    layers = drafter_model.config.target_layer_ids
    is_default = args.target is None or args.target.lower() in ("default", "smollm2-135m-instruct")
    if args.onnx is None and tuple(layers) != tuple(default_export_layers(target, is_default)):
        print(f"note: the drafter reads layers {list(layers)}; the export is made for them", file=sys.stderr)

    # A backend that fails (to load or mid-run) is dropped from the rest of the run, and the failure
    # is printed, kept in the report and turns the exit status to 1: the other backends' figures
    # still come out of a one-shot run on a borrowed GPU.
    failures: dict[str, str] = {}
    backends = {}
    for name in args.backends:
        options = BackendOptions(name=name, onnx=args.onnx if name != TORCH else None, threads=args.threads,
                                 ort_provider=args.ort_provider, trt_precision=args.trt_precision,
                                 trt_max_block_size=max(block_size, 16), trt_max_context=args.trt_max_context)
        started = time.perf_counter()
        try:
            backend = load_backend(target, options, drafter_layers=layers, source=str(target_dir))
            backends[name] = {"backend": backend, "drafter": drafter_beside(backend, target, drafter_model),
                              "load_s": time.perf_counter() - started, "device": str(backend.device)}
        except Exception as err:  # noqa: BLE001 - reported below
            failures[name] = f"load: {type(err).__name__}: {err}"
            print(f"FAILED backend {name}: {failures[name]}", file=sys.stderr)
    plain = None
    if "onnxruntime" in backends:
        # The same export without IO binding (plain session.run with numpy views), for the step timing.
        from blockpilot.backends.onnxruntime_backend import OnnxRuntimeTarget

        ort = backends["onnxruntime"]["backend"]
        plain = OnnxRuntimeTarget(ort.export, target, provider=ort.provider, threads=args.threads, io_binding=False,
                                  verify_weights=False)
    source = args.datasets
    if source is not None:
        prompts = [p["text"] for p in load_prompts(source, args.prompts)]
    else:
        prompts = BUILTIN_PROMPTS[: args.prompts]
    ids = [tokenizer.encode_chat([{"role": "user", "content": text}]) for text in prompts]
    print(f"setup: {target_dir.name}, drafter {drafter_label} (layers {list(layers)}), block size {block_size}, "
          f"{len(prompts)} prompts, {args.max_new_tokens} new tokens, greedy, {placement.describe()}, backends {args.backends}, "
          f"{args.threads} thread(s), torch {torch.__version__}, {platform.processor() or platform.machine()}", file=sys.stderr)

    modes = {"ar": 1, "speculative": block_size}
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    warm = SamplingParams(max_new_tokens=8)

    def fail(name: str, stage: str, err: Exception) -> None:
        failures[name] = f"{stage}: {type(err).__name__}: {err}"
        print(f"FAILED backend {name}: {failures[name]}", file=sys.stderr)
        backends.pop(name, None)

    for name, entry in list(backends.items()):  # first calls pay for allocation and kernel selection
        try:
            for size in modes.values():
                SpeculativeDecoder(entry["backend"], entry["drafter"] if size > 1 else None).generate(ids[0], warm, size)
        except Exception as err:  # noqa: BLE001 - reported
            fail(name, "warm-up", err)

    runs = []
    for index, prompt_ids in enumerate(ids):
        reference = None
        for name, entry in list(backends.items()):
            for mode, size in modes.items():
                decoder = SpeculativeDecoder(entry["backend"], entry["drafter"] if size > 1 else None)
                try:
                    result = decoder.generate(prompt_ids, params, size)
                except Exception as err:  # noqa: BLE001 - reported
                    fail(name, f"prompt {index} {mode}", err)
                    break
                if reference is None:
                    reference = result.token_ids  # the first backend's block size 1 (torch when listed first)
                runs.append({"prompt": index, "prompt_tokens": len(prompt_ids), "backend": name, "mode": mode,
                             "block_size": size, "tokens": len(result.token_ids), "decode_tokens": sum(result.acceptance_lengths),
                             "decode_s": result.decode_s, "ttft_s": result.ttft_s, "tau": result.tau,
                             "decode_tokens_per_s": result.decode_tokens_per_s, "token_ids": result.token_ids,
                             "same_as_reference": result.token_ids == reference})
        print(f"prompt {index + 1}/{len(ids)} done", file=sys.stderr)

    summary = {}
    lossless = True
    for name in backends:
        own_ar = {r["prompt"]: r["token_ids"] for r in runs if r["backend"] == name and r["mode"] == "ar"}
        for mode in modes:
            rows = [r for r in runs if r["backend"] == name and r["mode"] == mode]
            same_own = sum(r["token_ids"] == own_ar[r["prompt"]] for r in rows)
            lossless &= same_own == len(rows)
            summary[f"{name}/{mode}"] = {
                "decode_tokens_per_s": sum(r["decode_tokens"] for r in rows) / sum(r["decode_s"] for r in rows),
                "ttft_ms_mean": 1000 * statistics.mean(r["ttft_s"] for r in rows),
                "tau": statistics.mean(r["tau"] for r in rows),
                "identical_to_reference": f"{sum(r['same_as_reference'] for r in rows)}/{len(rows)}",
                "identical_to_own_block_size_1": f"{same_own}/{len(rows)}",
            }
    context = max(len(i) for i in ids) + args.max_new_tokens // 2
    steps = {}
    for name, backend in [(n, e["backend"]) for n, e in backends.items()] + ([("onnxruntime (no IO binding)", plain)] if plain else []):
        try:
            steps[name] = step_cost_ms(backend, target.config.vocab_size, context, [1, block_size], args.step_repeats)
        except Exception as err:  # noqa: BLE001 - reported
            failures[name] = f"step timing: {type(err).__name__}: {err}"
            print(f"FAILED step timing of {name}: {failures[name]}", file=sys.stderr)

    report = {
        "setup": {"target": target_dir.name, "drafter": drafter_label, "target_layer_ids": list(layers), "block_size": block_size,
                  "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "threads": args.threads,
                  "dtype": placement.dtype, "device": placement.device,
                  "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                  "backends": {name: {"device": e["device"], "load_s": round(e["load_s"], 2),
                                      "kind": backend_name(e["backend"])} for name, e in backends.items()},
                  "reference": f"{args.backends[0]}/ar"},
        "summary": summary,
        "step_ms": {name: {str(k): round(v, 3) for k, v in times.items()} for name, times in steps.items()},
        "step_context_tokens": context,
        "lossless": lossless,
        "failures": failures,
        "runs": [{k: v for k, v in r.items() if k != "token_ids"} for r in runs],
    }
    print(f"{'backend/mode':28s} {'decode tok/s':>12s} {'tau':>6s} {'TTFT ms':>8s} {'= ref':>6s} {'= own AR':>8s}")
    for key, row in summary.items():
        print(f"{key:28s} {row['decode_tokens_per_s']:12.1f} {row['tau']:6.2f} {row['ttft_ms_mean']:8.1f} "
              f"{row['identical_to_reference']:>6s} {row['identical_to_own_block_size_1']:>8s}")
    print(f"verify step on a {context}-token cache (median ms): " + "; ".join(
        f"{name}: k=1 {times[1]:.1f}, k={block_size} {times[block_size]:.1f}" for name, times in steps.items()))
    print(f"lossless (speculative == block size 1 on every backend): {lossless}")
    for name, reason in failures.items():
        print(f"FAILED {name}: {reason}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if lossless and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
