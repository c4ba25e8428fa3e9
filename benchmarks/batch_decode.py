"""Aggregate throughput of the ragged batch (BatchDecoder) against one request at a time, in one run.

The same prompts (the first N of each evaluation file) are decoded to the end (a) one after another
through SpeculativeDecoder.generate and (b) through BatchDecoder with up to C sessions at once (a
new prompt is admitted as soon as a row frees), for each concurrency C asked for; both through the
verifier backend asked for (default: the default one, ONNX Runtime with the fused graph, which
batches sessions like the torch engine), with the default model and the shipped drafter.
Two decode modes:

    autoregressive   block size 1, prompt lookup off
    default          the shipped policy's block size per request, prompt lookup on

Reported per mode and concurrency: aggregate tokens/s (all generated tokens over the wall time,
prefills included), the ratio to one-at-a-time, τ, and how many outputs equal the one-at-a-time
output (at T = 0 a difference can only come from a near-tie of the top two logits, since the
batched GEMMs may round differently from a batch of one; each one is listed with its first
differing position and that step's top-2 logit gap).

    .venv/bin/python benchmarks/batch_decode.py ../shared/datasets --prompts-per-dataset 3 --concurrency 4 16 --out runs/batch_decode.json
    .venv/bin/python benchmarks/batch_decode.py ../shared/datasets --backend torch --load-aware ...   # the torch engine, capped drafts
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from blockpilot.backends import BACKENDS, DEFAULT_VERIFIER_BACKEND
from blockpilot.backends.loader import BackendOptions
from blockpilot.benchmarking import machine_info, read_jsonl_prompts
from blockpilot.decoding.batch import BatchDecoder
from blockpilot.decoding.lookup import LOOKUP_OFF, LookupConfig
from blockpilot.decoding.speculative import SamplingParams
from blockpilot.policy.in_process import InProcessPolicy
from blockpilot.runtime import load_engine, set_threads

MODES = ("autoregressive", "default")


def top2_gap(engine, prompt_ids: list[int], output: list[int], position: int) -> float:
    """The target's top-1 minus top-2 logit where the output's token `position` was chosen."""
    cache = engine.decoder.target.new_cache(len(prompt_ids) + len(output) + 1)
    tokens = torch.tensor([prompt_ids + output[:position]])
    with torch.inference_mode():
        logits = engine.decoder.target(tokens, cache, num_logits=1).logits[0, -1]
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("datasets", type=Path, help="folder of evaluation *.jsonl files ({id, dataset, turns})")
    parser.add_argument("--prompts-per-dataset", type=int, default=3, help="first N prompts of each file")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 16], help="sessions in the batch at once")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--threads", type=int, default=None, help="threads (default: torch's choice)")
    parser.add_argument("--backend", choices=BACKENDS, default=DEFAULT_VERIFIER_BACKEND, help="verifier backend")
    parser.add_argument("--precision", default="auto", help="onnxruntime precision (auto, fp32, int4)")
    parser.add_argument("--load-aware", action="store_true", help="cap each session's drafts by their cost in the batch (as the verifier can)")
    parser.add_argument("--out", type=Path, required=True, help="JSON report")
    args = parser.parse_args(argv)

    set_threads(args.threads)
    engine = load_engine(None, None, backend=BackendOptions(name=args.backend, precision=args.precision, threads=args.threads))
    policy = InProcessPolicy()
    files = sorted(args.datasets.glob("*.jsonl"))
    prompts = [p for f in files for p in read_jsonl_prompts(f, args.prompts_per_dataset)]
    encoded = [engine.tokenizer.encode_chat([{"role": "user", "content": p["text"]}]) for p in prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, stop_token_ids=engine.tokenizer.stop_token_ids)
    lookup_on = LookupConfig()
    widest = max(engine.decoder.max_block_size if engine.decoder.drafter else 1, lookup_on.max_tokens + 1)
    widest = min(widest, 16)
    capacity = max(len(ids) for ids in encoded) + args.max_new_tokens + 1 + widest
    setup = {"machine": machine_info(), "backend": engine.backend, "precision": engine.precision, "load_aware": args.load_aware,
             "drafter": engine.drafter_name,
             "policy": ",".join(policy.spec.policy_versions), "max_new_tokens": args.max_new_tokens,
             "prompts": len(prompts), "datasets": [f.stem for f in files], "concurrency": args.concurrency,
             "threads": torch.get_num_threads()}
    print(json.dumps(setup), file=sys.stderr)
    report = {"setup": setup, "modes": {}}
    for mode in args.modes:
        lookup = LOOKUP_OFF if mode == "autoregressive" else lookup_on

        def block_size():
            return 1 if mode == "autoregressive" else policy.hook(engine.default_block_size, widest)

        began = time.perf_counter()
        alone = [engine.decoder.generate(ids, params, block_size(), lookup=lookup)
                 for ids in tqdm(encoded, desc=f"{mode} one at a time", unit="prompt", file=sys.stderr)]
        alone_s = time.perf_counter() - began
        alone_tokens = sum(len(r.token_ids) for r in alone)
        entry = {"one_at_a_time": {"seconds": alone_s, "tokens": alone_tokens, "tokens_per_s": alone_tokens / alone_s,
                                   "mean_tau": sum(r.tau for r in alone) / len(alone),
                                   "block_sizes": [r.block_size for r in alone]}}
        for concurrency in args.concurrency:
            batch = BatchDecoder(engine.decoder, max_sessions=concurrency, capacity=capacity, max_block_size=widest,
                                 load_aware=args.load_aware)
            began = time.perf_counter()
            results = batch.run([(ids, params, block_size()) for ids in encoded], lookup=lookup)
            seconds = time.perf_counter() - began
            tokens = sum(len(r.token_ids) for r in results)
            differ = []
            for index, (a, b) in enumerate(zip(alone, results)):
                if a.token_ids != b.token_ids:
                    position = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y),
                                    min(len(a.token_ids), len(b.token_ids)))
                    differ.append({"prompt": prompts[index]["id"], "position": position,
                                   "top2_gap": top2_gap(engine, encoded[index], a.token_ids, position)})
            entry[f"batch_{concurrency}"] = {
                "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
                "ratio_to_one_at_a_time": (tokens / seconds) / (alone_tokens / alone_s),
                "mean_tau": sum(r.tau for r in results) / len(results),
                "identical": len(results) - len(differ), "differing": differ,
            }
            print(f"{mode} C={concurrency}: {tokens / seconds:.1f} tok/s vs {alone_tokens / alone_s:.1f} one at a time "
                  f"({(tokens / seconds) / (alone_tokens / alone_s):.2f}x), identical {len(results) - len(differ)}/{len(results)}",
                  file=sys.stderr)
        report["modes"][mode] = entry
    policy.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({m: {k: round(v["tokens_per_s"], 1) for k, v in e.items()} for m, e in report["modes"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
