"""Engine speed: autoregressive decode tokens/s of our engine vs transformers' generate(), and the
verify-cost curve (forward time for k new tokens relative to k = 1).

    .venv/bin/python benchmarks/engine.py --datasets ../shared/datasets --prompts 10 --out runs/engine.json

"engine" is the first of --backends: by default the default verifier backend (onnxruntime, the
engine's exported graph), then the torch engine itself, both timed in the same run.

Both decoders run the same model (default: SmolLM2-135M-Instruct, fp32) on the same prompts in the
same process, 128 new tokens each, greedy, no early stop (so both produce exactly the same number
of tokens). Prefill is timed separately and excluded from decode tokens/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from blockpilot.backends import DEFAULT_VERIFIER_BACKEND
from blockpilot.benchmarking import load_prompts
from blockpilot.decoding.speculative import SamplingParams, SpeculativeDecoder
from blockpilot.models.store import is_default_target, resolve_target
from blockpilot.models.target import TargetModel
from blockpilot.models.tokenizer import ChatTokenizer


def engine_decode(decoder: SpeculativeDecoder, prompt_ids: list[int], new_tokens: int) -> dict:
    result = decoder.generate(prompt_ids, SamplingParams(max_new_tokens=new_tokens), 1)
    return {"ttft_s": result.ttft_s, "decode_s": result.decode_s, "tokens": len(result.token_ids),
            "decode_tokens_per_s": result.decode_tokens_per_s, "token_ids": result.token_ids}


def hf_decode(model, prompt_ids: list[int], new_tokens: int) -> dict:
    inputs = torch.tensor([prompt_ids])
    mask = torch.ones_like(inputs)
    with torch.inference_mode():
        started = time.perf_counter()
        model(inputs, attention_mask=mask, logits_to_keep=1)
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        out = model.generate(inputs, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        total_s = time.perf_counter() - started
    produced = out.shape[1] - len(prompt_ids)
    decode_s = max(total_s - prefill_s, 1e-9)
    return {"ttft_s": prefill_s, "decode_s": decode_s, "tokens": produced,
            "decode_tokens_per_s": (produced - 1) / decode_s, "token_ids": out[0, len(prompt_ids):].tolist()}


def verify_cost_curve(target, context_len: int, sizes: list[int], repeats: int) -> dict[int, float]:
    """Median forward time (s) for k new tokens on top of a `context_len`-token cache."""
    cache = target.new_cache(context_len + max(sizes) + 1)
    generator = torch.Generator().manual_seed(0)
    vocab = target.config.vocab_size
    with torch.inference_mode():
        target(torch.randint(vocab, (1, context_len), generator=generator), cache, num_logits=0)
        times: dict[int, float] = {}
        for k in sizes:
            samples = []
            for _ in range(repeats + 1):
                cache.truncate(context_len)
                tokens = torch.randint(vocab, (1, k), generator=generator)
                started = time.perf_counter()
                target(tokens, cache)  # logits for all k positions, as a verify step needs
                samples.append(time.perf_counter() - started)
            times[k] = statistics.median(samples[1:])
    return times


def profile_decode_step(target: TargetModel, context_len: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    cache = target.new_cache(context_len + 2)
    with torch.inference_mode():
        target(torch.randint(target.config.vocab_size, (1, context_len)), cache, num_logits=0)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                cache.truncate(context_len)
                target(torch.tensor([[42]]), cache)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    return [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 5 / 1000, "share": e.self_cpu_time_total / total,
             "calls_per_step": e.count / 5} for e in rows[:8]]


def profile_ort_decode_step(backend, context_len: int, out_dir: Path) -> list[dict]:
    """ONNX Runtime's own per-node profile of 5 one-token steps, kernel time summed by operator type."""
    from blockpilot.backends.onnxruntime_backend import OnnxRuntimeTarget

    profiled = OnnxRuntimeTarget(backend.export, backend.torch_target, provider=backend.provider,
                                 threads=backend.session.get_session_options().intra_op_num_threads,
                                 verify_weights=False, profile_prefix=str(out_dir / "ort-profile"))
    cache = profiled.new_cache(context_len + 2)
    with torch.inference_mode():
        profiled(torch.randint(profiled.config.vocab_size, (1, context_len)), cache, num_logits=0)
        for _ in range(5):
            cache.truncate(context_len)
            profiled(torch.tensor([[42]]), cache)
    events = json.loads(Path(profiled.session.end_profiling()).read_text())
    # The last 5 runs are the decode steps; node events carry their operator type.
    runs = [e for e in events if e.get("name") == "model_run"]
    first_step_ts = runs[-5]["ts"]
    by_op: dict[str, float] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= first_step_ts:
            op = event.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + event["dur"]
    # Shares of the summed kernel time: a profiled run is 2x slower than a plain one (ORT writes an
    # event per node), but the big kernels' own times are not inflated much.
    total_us = sum(by_op.values())
    rows = sorted(by_op.items(), key=lambda kv: kv[1], reverse=True)
    return [{"op": op, "ms_per_step": us / 5 / 1000, "share": us / total_us} for op, us in rows[:8]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", type=Path, required=True, help="folder with the evaluation *.jsonl files")
    parser.add_argument("--prompts", type=int, default=10, help="prompts in all, taken round-robin over the datasets")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--target", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7, help="repeats per k for the verify-cost curve")
    parser.add_argument("--backends", nargs="+", default=[DEFAULT_VERIFIER_BACKEND, "torch"], choices=["torch", "onnxruntime"],
                        help="engine backends to time beside transformers (the first is 'engine' in the report; "
                             "default: the default verifier backend, then the torch engine)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    model_dir = resolve_target(args.target)
    tokenizer = ChatTokenizer(model_dir)
    target = TargetModel.from_pretrained(model_dir)
    decoders = {}
    for name in args.backends:
        if name == "torch":
            decoders[name] = SpeculativeDecoder(target)
        else:
            from blockpilot.backends.loader import BackendOptions, default_export_layers, load_backend

            # The export the speculative path uses too (the shipped drafter's layers): one export, cached.
            backend = load_backend(target, BackendOptions(name=name, threads=args.threads), drafter_layers=None,
                                   default_layers=default_export_layers(target, is_default_target(args.target)),
                                   source=str(model_dir))
            decoders[name] = SpeculativeDecoder(backend)
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    prompts = load_prompts(args.datasets, args.prompts)
    print(f"setup: {model_dir.name}, {len(prompts)} prompts, {args.new_tokens} new tokens, greedy, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}",
          file=sys.stderr)

    # Warm-up: first calls pay for allocator and kernel selection.
    warm = tokenizer.encode_chat([{"role": "user", "content": "Hello"}])
    for each in decoders.values():
        engine_decode(each, warm, 8)
    hf_decode(hf, warm, 8)

    per_prompt = []
    for prompt in tqdm(prompts, desc="prompts", file=sys.stderr):
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt["text"]}])
        # Decoders interleave per prompt, so machine load drifts hit them alike.
        runs = {name: engine_decode(each, ids, args.new_tokens) for name, each in decoders.items()}
        ours, theirs = runs[args.backends[0]], hf_decode(hf, ids, args.new_tokens)
        per_prompt.append({"id": prompt["id"], "prompt_tokens": len(ids),
                           "engine": {k: v for k, v in ours.items() if k != "token_ids"},
                           "transformers": {k: v for k, v in theirs.items() if k != "token_ids"},
                           **{f"engine_{name}": {k: v for k, v in run.items() if k != "token_ids"} for name, run in runs.items()},
                           "same_tokens": ours["token_ids"] == theirs["token_ids"],
                           "same_tokens_across_backends": all(run["token_ids"] == ours["token_ids"] for run in runs.values())})

    def rate(key: str) -> float:
        tokens = sum(p[key]["tokens"] - 1 for p in per_prompt)
        return tokens / sum(p[key]["decode_s"] for p in per_prompt)

    profile_dir = Path(tempfile.mkdtemp(prefix="blockpilot-ort-profile-"))
    curves = {name: verify_cost_curve(each.target, 128, [1, 2, 4, 8, 16, 32], args.repeats) for name, each in decoders.items()}
    curve = curves[args.backends[0]]
    report = {
        "setup": {"target": model_dir.name, "prompts": len(prompts), "new_tokens": args.new_tokens,
                  "threads": torch.get_num_threads(), "torch": torch.__version__},
        "engine_decode_tokens_per_s": rate("engine"),
        "transformers_decode_tokens_per_s": rate("transformers"),
        "speedup_vs_transformers": rate("engine") / rate("transformers"),
        "engine_ttft_s_mean": statistics.mean(p["engine"]["ttft_s"] for p in per_prompt),
        "transformers_prefill_s_mean": statistics.mean(p["transformers"]["ttft_s"] for p in per_prompt),
        "identical_outputs": sum(p["same_tokens"] for p in per_prompt),
        "backends": {name: {"decode_tokens_per_s": rate(f"engine_{name}"),
                            "speedup_vs_transformers": rate(f"engine_{name}") / rate("transformers")} for name in decoders},
        "identical_outputs_across_backends": sum(p["same_tokens_across_backends"] for p in per_prompt),
        "verify_cost_ms": {k: v * 1000 for k, v in curve.items()},
        "verify_cost_relative": {k: v / curve[1] for k, v in curve.items()},
        "verify_cost_ms_by_backend": {name: {k: v * 1000 for k, v in c.items()} for name, c in curves.items()},
        "verify_cost_relative_by_backend": {name: {k: v / c[1] for k, v in c.items()} for name, c in curves.items()},
        "decode_step_profile": profile_decode_step(target, 128),
        "decode_step_profile_onnxruntime": (profile_ort_decode_step(decoders["onnxruntime"].target, 128, profile_dir)
                                            if "onnxruntime" in decoders else None),
        "weights_mb": sum(p.numel() * p.element_size() for p in target.parameters()) / 2**20,
        "per_prompt": per_prompt,
    }
    print(f"engine        {report['engine_decode_tokens_per_s']:6.1f} decode tokens/s")
    for name, figures in report["backends"].items():
        print(f"  {name:12s}{figures['decode_tokens_per_s']:6.1f} decode tokens/s  ({figures['speedup_vs_transformers']:.2f} x transformers)")
    print(f"transformers  {report['transformers_decode_tokens_per_s']:6.1f} decode tokens/s")
    print(f"speed-up      {report['speedup_vs_transformers']:6.2f} x   (identical outputs: {report['identical_outputs']}/{len(per_prompt)})")
    for name, c in curves.items():
        print(f"verify cost {name:12s}" + "  ".join(f"k={k}: {v / c[1]:.2f}x ({v * 1000:.1f} ms)" for k, v in c.items()))
    print("decode step torch        " + "; ".join(f"{r['op']} {r['self_ms_per_step']:.1f} ms ({r['share']:.0%})" for r in report["decode_step_profile"][:4]))
    if report["decode_step_profile_onnxruntime"]:
        print("decode step onnxruntime  " + "; ".join(f"{r['op']} {r['ms_per_step']:.1f} ms ({r['share']:.0%})"
                                                     for r in report["decode_step_profile_onnxruntime"][:4]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
