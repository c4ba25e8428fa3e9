"""Drafter-data generation speed: response tokens/s of the generators on one set of training prompts.

Methods (each answers the same greedy jobs; figures are useful response tokens, padding and idle
rows excluded, per wall second):
  hf-bN          plain `transformers` generate(), left-padded batches of N, fp32
  padded-bN      this engine, fixed left-padded batches of N (the generator before the refilling batch)
  refill-bN      this engine, the refilling batch of N rows (`blockpilot drafter data`), fp32
  refill-bN-bf16 the same with bfloat16 weights and cache (slow without native BF16 instructions)

Methods run interleaved, `--rounds` times each; the JSON records every run and the machine.

    .venv/bin/python benchmarks/datagen_speed.py --prompts ../shared/datasets/train --jobs 48 \\
        --max-new-tokens 128 --threads 1 --out reports/drafter/datagen_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from blockpilot.benchmarking import machine_info
from blockpilot.models.store import resolve_target
from blockpilot.models.target import TargetModel
from blockpilot.models.tokenizer import ChatTokenizer
from blockpilot.training.data import DataConfig, Job, RefillingBatch, collect_prompts, generate_batch, native_bf16


def useful(response: list[int], stop_ids: set[int]) -> int:
    for index, token in enumerate(response):
        if token in stop_ids:
            return index + 1
    return len(response)


def run_hf(model, jobs, batch_size, max_new, stop_ids, pad_id) -> int:
    total = 0
    for lo in range(0, len(jobs), batch_size):
        batch = [list(j.prompt_ids) for j in jobs[lo : lo + batch_size]]
        width = max(map(len, batch))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             eos_token_id=sorted(stop_ids), pad_token_id=pad_id)
        total += sum(useful(row[width:].tolist(), stop_ids) for row in out)
    return total


def run_padded(target, jobs, batch_size, max_new, stop_ids) -> int:
    total = 0
    for lo in range(0, len(jobs), batch_size):
        results = generate_batch(target, [list(j.prompt_ids) for j in jobs[lo : lo + batch_size]], max_new, stop_ids, 0.0, torch.Generator())
        total += sum(len(r) for r, _ in results)
    return total


def run_refill(target, jobs, batch_size, max_new, stop_ids, refill_min) -> int:
    batch = RefillingBatch(target, sorted(stop_ids), max_new, batch_size, refill_min)
    return batch.run(jobs, lambda *_: None).generated_tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=Path, required=True, help="training prompt files or folder")
    parser.add_argument("--jobs", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=["hf-b16", "hf-b32", "padded-b32", "refill-b16", "refill-b32", "refill-b64", "refill-b32-bf16"])
    parser.add_argument("--refill-min", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target_dir = resolve_target(None)
    tokenizer = ChatTokenizer(target_dir)
    stop_ids = set(tokenizer.stop_token_ids)
    prompts = collect_prompts([args.prompts], DataConfig(seed=12345))  # another shuffle than the data's
    jobs = []
    for prompt in prompts:
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt["text"]}])
        if len(ids) <= 384:
            jobs.append(Job(prompt["id"], prompt["dataset"], "greedy", tuple(ids)))
        if len(jobs) == args.jobs:
            break
    models = {"fp32": TargetModel.from_pretrained(target_dir)}
    if any(m.endswith("bf16") for m in args.methods):
        models["bf16"] = TargetModel.from_pretrained(target_dir, dtype=torch.bfloat16)
    hf = None
    if any(m.startswith("hf-") for m in args.methods):
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(target_dir, torch_dtype=torch.float32).eval()
    runs = []
    for round_index in range(args.rounds):
        for method in args.methods:
            kind, size, *rest = method.split("-")
            batch_size = int(size[1:])
            started = time.perf_counter()
            with torch.inference_mode():
                if kind == "hf":
                    tokens = run_hf(hf, jobs, batch_size, args.max_new_tokens, stop_ids, tokenizer.stop_token_ids[0])
                elif kind == "padded":
                    tokens = run_padded(models["fp32"], jobs, batch_size, args.max_new_tokens, stop_ids)
                else:
                    tokens = run_refill(models[rest[0] if rest else "fp32"], jobs, batch_size, args.max_new_tokens, stop_ids, args.refill_min)
            seconds = time.perf_counter() - started
            runs.append({"round": round_index, "method": method, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds})
            print(f"{method:>16}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s", file=sys.stderr, flush=True)
    summary = {m: statistics.median(r["tokens_per_s"] for r in runs if r["method"] == m) for m in args.methods}
    best_hf = max((v for m, v in summary.items() if m.startswith("hf-")), default=None)
    report = {"machine": machine_info(), "native_bf16": native_bf16(), "threads": args.threads, "jobs": len(jobs),
              "max_new_tokens": args.max_new_tokens, "refill_min": args.refill_min, "runs": runs,
              "median_tokens_per_s": summary,
              "x_best_transformers": {m: v / best_hf for m, v in summary.items()} if best_hf else None}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
