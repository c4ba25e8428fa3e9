"""Pipeline speed: decode tokens/s through the three services on loopback (verifier -> drafter,
policy, Redis) vs the in-process engine, same prompts, same run; per-step gRPC overhead.

    .venv/bin/python benchmarks/pipeline.py ../shared/datasets --prompts 20 --out runs/pipeline.json

Setup: default target and its default drafter (the shipped one when the checkout has it; pass
--drafter random to exercise the path without one), greedy, 128 new tokens, the drafter's trained
block size (or --block-size), torch threads 1 in every process. The stack is started with
`blockpilot up` machinery on free ports in a temporary run dir and stopped at the end. Prompts
alternate in-process / pipeline so load on the machine hits both alike. Outputs are checked to be
identical. Goal (issue 4): pipeline >= 0.95 x in-process decode tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("datasets", type=Path, help="a prompt JSONL file or a folder of *.jsonl files")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--target", default="default")
    parser.add_argument("--drafter", default="", help="'' = the engine's default drafter, 'random', 'none' or a path")
    parser.add_argument("--block-size", type=int, default=None, help="default: the drafter's trained size")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    from blockpilot.benchmarking import load_prompts
    from blockpilot.client import BlockPilotClient
    from blockpilot.decoding.speculative import GenerationResult, SamplingParams, SpeculativeDecoder
    from blockpilot.serving import stack
    from blockpilot.serving.models import load_served_drafter, load_served_target

    prompts = load_prompts(args.datasets, args.prompts)
    target = load_served_target(args.target)
    drafter, drafter_name = load_served_drafter(target, args.drafter)
    block_size = args.block_size or (drafter.block_size if drafter is not None else 1)
    decoder = SpeculativeDecoder(target.model, drafter if block_size > 1 else None)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, stop_token_ids=target.stop_token_ids)

    run_dir = tempfile.mkdtemp(prefix="bp-bench-run-")
    os.environ["BLOCKPILOT_RUN_DIR"] = run_dir
    opts = stack.StackOptions(target=args.target, drafter=args.drafter, redis_url=args.redis_url,
                              verifier_port=free_port(), drafter_port=free_port(), policy_port=free_port(),
                              verifier_metrics_port=free_port(), drafter_metrics_port=free_port(),
                              policy_metrics_port=free_port(), threads=1)
    setup = {"target": str(target.target_dir), "drafter": drafter_name, "block_size": block_size,
             "max_new_tokens": args.max_new_tokens, "prompts": len(prompts), "datasets": str(args.datasets),
             "torch_threads": 1, "torch": torch.__version__, "python": platform.python_version(),
             "machine": platform.machine(), "cpus": os.cpu_count()}
    print(json.dumps({"setup": setup}), file=sys.stderr)
    stack.up(opts, log=lambda line: print(line, file=sys.stderr))
    rows = []
    try:
        with BlockPilotClient(f"127.0.0.1:{opts.verifier_port}", timeout=600) as client:
            # Warm-up (first-call allocations, connections) on both paths.
            warm = target.tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
            decoder.generate(warm, SamplingParams(max_new_tokens=8), block_size)
            client.generate(token_ids=warm, max_new_tokens=8, block_size=block_size)
            for prompt in prompts:
                ids = target.tokenizer.encode_chat([{"role": "user", "content": prompt["text"]}])
                local = GenerationResult(prompt_token_ids=ids)
                for _ in decoder.stream(ids, params, block_size, local):
                    pass
                sent = time.perf_counter()
                first_at = last_at = None
                final = None
                for event in client.stream(token_ids=ids, max_new_tokens=args.max_new_tokens, block_size=block_size):
                    now = time.perf_counter()
                    if event.final is not None:
                        final = event.final
                    else:
                        first_at = first_at or now
                        last_at = now
                steps = len(final.acceptance_lengths)
                decode_tokens = sum(final.acceptance_lengths)
                rows.append({
                    "id": prompt["id"], "dataset": prompt["dataset"], "prompt_tokens": len(ids),
                    "identical": list(final.token_ids) == local.token_ids,
                    "tokens": len(local.token_ids), "steps": steps, "tau": final.tau,
                    "in_process": {"ttft_s": local.ttft_s, "decode_s": local.decode_s,
                                   "decode_tokens_per_s": local.decode_tokens_per_s},
                    "pipeline": {"ttft_s": final.timings.ttft_s, "decode_s": final.timings.decode_s,
                                 "decode_tokens_per_s": final.timings.decode_tokens_per_s,
                                 "client_ttft_s": (first_at - sent) if first_at else None,
                                 "client_decode_tokens_per_s": decode_tokens / (last_at - first_at) if first_at and last_at > first_at else None,
                                 "fallback_reason": final.fallback_reason},
                    "grpc_overhead_ms_per_step": 1000 * (final.timings.decode_s - local.decode_s) / steps if steps else None,
                })
                print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        stack.down(log=lambda line: print(line, file=sys.stderr))

    def total_rate(key):
        tokens = sum(sum_steps for sum_steps in (r["tokens"] - 1 for r in rows))
        seconds = sum(r[key]["decode_s"] for r in rows)
        return tokens / seconds if seconds else 0.0

    overheads = [r["grpc_overhead_ms_per_step"] for r in rows if r["grpc_overhead_ms_per_step"] is not None]
    summary = {
        "in_process_decode_tokens_per_s": round(total_rate("in_process"), 2),
        "pipeline_decode_tokens_per_s": round(total_rate("pipeline"), 2),
        "pipeline_over_in_process": round(total_rate("pipeline") / total_rate("in_process"), 4) if total_rate("in_process") else None,
        "grpc_overhead_ms_per_step_median": round(statistics.median(overheads), 3) if overheads else None,
        "grpc_overhead_ms_per_step_mean": round(statistics.fmean(overheads), 3) if overheads else None,
        "all_outputs_identical": all(r["identical"] for r in rows),
        "goal": "pipeline_over_in_process >= 0.95",
    }
    report = {"setup": setup, "summary": summary, "prompts": rows}
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
