"""Engine speed: autoregressive decode tokens/s of our engine's backends and precisions vs
transformers' generate() (and llama.cpp, when given), the verify-cost curve per backend (forward
time for k new tokens relative to k = 1), the drafter's pass against a target step, and how close
each backend's greedy output and logits are to the fp32 engine's.

    .venv/bin/python benchmarks/engine.py --datasets ../shared/datasets --prompts 10 --out runs/engine.json \
        [--llama-cpp /path/to/venv-with-llama-cpp/bin/python]

--backends names what runs, each `backend[:variant]`: `onnxruntime:int4` and `onnxruntime:fp32` (the
fused CPU graph at each precision), `onnxruntime:portable` (the standard-op fp32 graph that ONNX
Runtime ran on the CPU before the fused one), `torch`. "engine" in the report is the first.

Every decoder runs the same model (default: SmolLM2-135M-Instruct) on the same prompts, interleaved
per prompt, 128 new tokens each, greedy, no early stop (so all produce the same number of tokens).
Prefill is timed separately and excluded from decode tokens/s. llama.cpp (llama-cpp-python, built
from source in its own virtual environment; benchmarks/llama_cpp_decode.py) runs the GGUF file
itself through a subprocess per prompt, fed the same prompt token ids.
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

from blockpilot.backends import DEFAULT_PRECISION
from blockpilot.benchmarking import load_prompts, machine_info
from blockpilot.decoding.speculative import SamplingParams, SpeculativeDecoder
from blockpilot.models.store import is_default_target, resolve_target
from blockpilot.models.target import TargetModel
from blockpilot.models.tokenizer import ChatTokenizer


def engine_decode(decoder: SpeculativeDecoder, prompt_ids: list[int], new_tokens: int) -> dict:
    result = decoder.generate(prompt_ids, SamplingParams(max_new_tokens=new_tokens), 1)
    return {"ttft_s": result.ttft_s, "decode_s": result.decode_s, "tokens": len(result.token_ids),
            "decode_tokens_per_s": result.decode_tokens_per_s, "token_ids": result.token_ids}


def llama_cpp_decode(python: str, gguf: Path, prompt_ids: list[int], new_tokens: int, threads: int) -> dict:
    import subprocess

    request = json.dumps({"model": str(gguf), "prompt_ids": prompt_ids, "new_tokens": new_tokens, "threads": threads})
    done = subprocess.run([python, str(Path(__file__).with_name("llama_cpp_decode.py"))], input=request, text=True,
                          capture_output=True, check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp decode failed: {done.stderr.strip()[-500:]}")
    out = json.loads(done.stdout)
    out["ttft_s"] = out.pop("prefill_s")
    out["decode_tokens_per_s"] = (out["tokens"] - 1) / max(out["decode_s"], 1e-9)
    return out


def matching_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def drafter_pass_ms(engine_target, context_len: int, num_draft: int, repeats: int, precision=None) -> float | None:
    """Median time of the shipped drafter's pass (num_draft drafts, 2 new context tokens) on a
    context of `context_len` tokens at `precision` (None: fp32), or None without a shipped drafter."""
    from blockpilot.decoding.drafting import DraftRequest, LocalDrafter
    from blockpilot.models.drafter import DFlashDrafter
    from blockpilot.runtime import shipped_drafter_dir

    path = shipped_drafter_dir()
    if path is None:
        return None
    drafter = LocalDrafter(DFlashDrafter.from_pretrained(path), engine_target, precision=precision)
    width = len(drafter.target_layer_ids) * engine_target.config.hidden_size
    session = drafter.open_session(context_len + 64)
    generator = torch.Generator().manual_seed(0)
    session.propose(DraftRequest(anchor=1, start=context_len, num_draft=num_draft,
                                 context=torch.randn(context_len, width, generator=generator), context_start=0))
    samples = []
    for step in range(repeats + 1):
        start = context_len + 2 * (step + 1)
        began = time.perf_counter()
        session.propose(DraftRequest(anchor=1, start=start, num_draft=num_draft,
                                     context=torch.randn(2, width, generator=generator), context_start=start - 2))
        samples.append(time.perf_counter() - began)
    return statistics.median(samples[1:]) * 1000


def row_invariance(target, prompt_ids: list[int], tokens: list[int]) -> float:
    """Largest logit difference between `tokens` verified as one block and one at a time (after
    the same prefill): 0.0 = the backend gives a token the same numbers in any pass."""
    with torch.inference_mode():
        cache = target.new_cache(len(prompt_ids) + len(tokens) + 1)
        target(torch.tensor([prompt_ids]), cache, num_logits=1)
        block = target(torch.tensor([tokens]), cache).logits[0]
        cache.truncate(len(prompt_ids))
        singles = torch.cat([target(torch.tensor([[t]]), cache).logits[0] for t in tokens])
    return float((block - singles).abs().max())


def prefill_logits(target, prompt_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return target(torch.tensor([prompt_ids]), target.new_cache(len(prompt_ids) + 1), num_logits=1).logits[0, -1]


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


def load_decoders(names: list[str], target: TargetModel, model_dir: Path, target_name: str | None,
                  threads: int | None) -> dict[str, SpeculativeDecoder]:
    from blockpilot.backends.loader import BackendOptions, default_export_layers, load_backend
    from blockpilot.backends.onnx_export import PORTABLE, cached_export
    from blockpilot.backends.onnxruntime_backend import OnnxRuntimeTarget

    # The exports the speculative path uses too (the shipped drafter's layers): cached.
    layers = default_export_layers(target, is_default_target(target_name))
    decoders = {}
    for name in names:
        backend, _, variant = name.partition(":")
        if backend == "torch":
            decoders[name] = SpeculativeDecoder(target)
        elif variant == "portable":
            export = cached_export(target, layers, source=str(model_dir), graph=PORTABLE)
            decoders[name] = SpeculativeDecoder(OnnxRuntimeTarget(export, target, provider="cpu", threads=threads))
        else:
            options = BackendOptions(name=backend, precision=variant or DEFAULT_PRECISION, threads=threads)
            decoders[name] = SpeculativeDecoder(load_backend(target, options, drafter_layers=None, default_layers=layers,
                                                             source=str(model_dir)))
    return decoders


BACKEND_CHOICES = ("onnxruntime:int4", "onnxruntime:fp32", "onnxruntime:portable", "torch")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", type=Path, required=True, help="folder with the evaluation *.jsonl files")
    parser.add_argument("--prompts", type=int, default=10, help="prompts in all, taken round-robin over the datasets")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--target", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7, help="repeats per k for the verify-cost curve")
    parser.add_argument("--backends", nargs="+", default=list(BACKEND_CHOICES), choices=BACKEND_CHOICES,
                        help="engine backends to time beside transformers (the first is 'engine' in the report; "
                             "default: all, int4 first)")
    parser.add_argument("--llama-cpp", default=None, metavar="PYTHON",
                        help="a Python interpreter with llama-cpp-python installed: time llama.cpp on the GGUF too")
    parser.add_argument("--gguf", type=Path, default=None, help="GGUF file for llama.cpp (default: the default model's)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    model_dir = resolve_target(args.target)
    tokenizer = ChatTokenizer(model_dir)
    target = TargetModel.from_pretrained(model_dir)
    decoders = load_decoders(args.backends, target, model_dir, args.target, args.threads)
    threads = args.threads or torch.get_num_threads()
    gguf = None
    if args.llama_cpp:
        from blockpilot.models.store import default_gguf_path

        gguf = args.gguf or default_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    prompts = load_prompts(args.datasets, args.prompts)
    print(f"setup: {model_dir.name}, {len(prompts)} prompts, {args.new_tokens} new tokens, greedy, "
          f"torch {torch.__version__}, {threads} threads, {platform.processor() or platform.machine()}",
          file=sys.stderr)

    # Warm-up: first calls pay for allocator and kernel selection.
    warm = tokenizer.encode_chat([{"role": "user", "content": "Hello"}])
    for each in decoders.values():
        engine_decode(each, warm, 8)
    hf_decode(hf, warm, 8)

    reference = "onnxruntime:fp32" if "onnxruntime:fp32" in decoders else args.backends[0]
    per_prompt = []
    for prompt in tqdm(prompts, desc="prompts", file=sys.stderr):
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt["text"]}])
        # Decoders interleave per prompt, so machine load drifts hit them alike.
        runs = {name: engine_decode(each, ids, args.new_tokens) for name, each in decoders.items()}
        runs["transformers"] = hf_decode(hf, ids, args.new_tokens)
        if gguf is not None:
            runs["llama.cpp"] = llama_cpp_decode(args.llama_cpp, gguf, ids, args.new_tokens, threads)
        ours = runs[args.backends[0]]
        logits = {name: prefill_logits(each.target, ids) for name, each in decoders.items()}
        ref_logits = logits[reference]
        per_prompt.append({
            "id": prompt["id"], "prompt_tokens": len(ids),
            "engine": {k: v for k, v in ours.items() if k != "token_ids"},
            **{name: {k: v for k, v in run.items() if k not in ("token_ids", "llama_cpp")} for name, run in runs.items()},
            "same_tokens": ours["token_ids"] == runs["transformers"]["token_ids"],
            # greedy agreement with the fp32 engine: identical outputs, and how many tokens agree before the first difference
            "matching_prefix_vs_fp32": {name: matching_prefix(run["token_ids"], runs[reference]["token_ids"]) for name, run in runs.items()},
            "prefill_logit_max_diff_vs_fp32": {name: float((l - ref_logits).abs().max()) for name, l in logits.items()},
            "prefill_top1_agrees_with_fp32": {name: int(l.argmax()) == int(ref_logits.argmax()) for name, l in logits.items()},
        })

    def rate(key: str) -> float:
        tokens = sum(p[key]["tokens"] - 1 for p in per_prompt)
        return tokens / sum(p[key]["decode_s"] for p in per_prompt)

    names = list(decoders) + ["transformers"] + (["llama.cpp"] if gguf is not None else [])
    # Row invariance on the first prompt and its first 8 output tokens: every backend as it runs, and
    # the fused graphs without the padding of lone tokens (what the padding buys).
    from blockpilot.backends.onnxruntime_fused import FusedOnnxRuntimeTarget

    first_ids = tokenizer.encode_chat([{"role": "user", "content": prompts[0]["text"]}])
    follow = engine_decode(decoders[args.backends[0]], first_ids, 8)["token_ids"]
    invariance = {name: row_invariance(each.target, first_ids, follow) for name, each in decoders.items()}
    for name, each in decoders.items():
        if isinstance(each.target, FusedOnnxRuntimeTarget):
            unpadded = FusedOnnxRuntimeTarget(each.target.export, target, threads=args.threads, verify_weights=False,
                                              pad_single_tokens=False)
            invariance[f"{name} (lone tokens unpadded)"] = row_invariance(unpadded, first_ids, follow)
    profile_dir = Path(tempfile.mkdtemp(prefix="blockpilot-ort-profile-"))
    curves = {name: verify_cost_curve(each.target, 128, [1, 2, 4, 8, 16, 32], args.repeats) for name, each in decoders.items()}
    curve = curves[args.backends[0]]
    step_ms = {name: c[1] * 1000 for name, c in curves.items()}
    from blockpilot.decoding.drafting import draft_precision

    draft_ms_fp32 = drafter_pass_ms(target, 128, 7, args.repeats)
    draft_ms = drafter_pass_ms(target, 128, 7, args.repeats, precision=draft_precision(target.device))  # what the engine runs
    portable = next((each.target for name, each in decoders.items() if name == "onnxruntime:portable"), None)
    report = {
        "machine": machine_info(),
        "setup": {"target": model_dir.name, "prompts": len(prompts), "new_tokens": args.new_tokens,
                  "threads": threads, "torch": torch.__version__, "backends": args.backends,
                  "llama_cpp": runs.get("llama.cpp", {}).get("llama_cpp") if gguf is not None else None,
                  "fp32_reference": reference},
        "engine_decode_tokens_per_s": rate("engine"),
        "transformers_decode_tokens_per_s": rate("transformers"),
        "speedup_vs_transformers": rate("engine") / rate("transformers"),
        "engine_ttft_s_mean": statistics.mean(p["engine"]["ttft_s"] for p in per_prompt),
        "transformers_prefill_s_mean": statistics.mean(p["transformers"]["ttft_s"] for p in per_prompt),
        "identical_outputs": sum(p["same_tokens"] for p in per_prompt),
        "decoders": {name: {
            "decode_tokens_per_s": rate(name),
            "speedup_vs_transformers": rate(name) / rate("transformers"),
            "outputs_identical_to_fp32": sum(p["matching_prefix_vs_fp32"][name] == args.new_tokens for p in per_prompt),
            "mean_matching_prefix_vs_fp32": statistics.mean(p["matching_prefix_vs_fp32"][name] for p in per_prompt),
            "prefill_logit_max_diff_vs_fp32": (max(p["prefill_logit_max_diff_vs_fp32"][name] for p in per_prompt)
                                               if name in decoders else None),
            "prefill_top1_agreement_vs_fp32": (sum(p["prefill_top1_agrees_with_fp32"][name] for p in per_prompt)
                                               if name in decoders else None),
        } for name in names},
        "verify_cost_ms": {k: v * 1000 for k, v in curve.items()},
        "verify_cost_relative": {k: v / curve[1] for k, v in curve.items()},
        "verify_cost_ms_by_backend": {name: {k: v * 1000 for k, v in c.items()} for name, c in curves.items()},
        "verify_cost_relative_by_backend": {name: {k: v / c[1] for k, v in c.items()} for name, c in curves.items()},
        "row_invariance_max_logit_diff": invariance,
        "drafter_pass_ms": draft_ms,
        "drafter_precision": draft_precision(target.device),
        "drafter_pass_ms_fp32": draft_ms_fp32,
        "drafter_pass_vs_one_token_step": {name: draft_ms / ms for name, ms in step_ms.items()} if draft_ms else None,
        "decode_step_profile": profile_decode_step(target, 128),
        "decode_step_profile_onnxruntime_portable": (profile_ort_decode_step(portable, 128, profile_dir)
                                                     if portable is not None else None),
        "weights_mb": sum(p.numel() * p.element_size() for p in target.parameters()) / 2**20,
        "per_prompt": per_prompt,
    }
    for name, figures in report["decoders"].items():
        print(f"{name:22s}{figures['decode_tokens_per_s']:7.1f} decode tokens/s  ({figures['speedup_vs_transformers']:.2f} x transformers)"
              f"  identical to fp32 {figures['outputs_identical_to_fp32']}/{len(per_prompt)}, matching prefix "
              f"{figures['mean_matching_prefix_vs_fp32']:.0f} tokens")
    for name, c in curves.items():
        print(f"verify cost {name:22s}" + "  ".join(f"k={k}: {v / c[1]:.2f}x ({v * 1000:.1f} ms)" for k, v in c.items()))
    print("row invariance (max logit diff, 8-token block vs single tokens): "
          + ", ".join(f"{k} {v:.3g}" for k, v in invariance.items()))
    if draft_ms:
        print(f"drafter pass (7 drafts, {report['drafter_dtype']}) {draft_ms:.1f} ms (fp32 {draft_ms_fp32:.1f} ms) = " + ", ".join(f"{v:.2f} x a {k} step" for k, v in report["drafter_pass_vs_one_token_step"].items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
