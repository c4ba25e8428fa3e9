"""What the HTTP gateway costs: the same prompts through the OpenAI API (the official `openai`
client, streamed) and straight to the verifier over gRPC (BlockPilotClient), against one running
stack (`blockpilot up`).

After one warm-up request each way, every prompt goes both ways one request at a time, the order
alternating per prompt (so drift of a loaded machine hits both alike): greedy, the default path
(policy block size, prompt lookup on). Measured per request as the client sees it: TTFT (request
sent -> first text) and decode tokens/s (the tokens after the first message over the time from the
first to the last message). The two texts must be identical. JSON (--out) with per-prompt rows,
medians, HTTP/gRPC ratios (medians of per-prompt ratios), the TTFT difference and the machine.

    .venv/bin/blockpilot up
    .venv/bin/python benchmarks/gateway_overhead.py PROMPTS_DIR --prompts 8 --out runs/gateway_overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import openai

from blockpilot.benchmarking import load_prompts, machine_info, timed_generation
from blockpilot.client import BlockPilotClient


def via_grpc(client: BlockPilotClient, messages: list[dict], max_new_tokens: int) -> dict:
    run = timed_generation(client, messages, max_new_tokens)
    return {"text": run["final"].text, "tokens": len(run["token_ids"]), "ttft_s": run["ttft_s"],
            "decode_tokens_per_s": run["decode_tokens_per_s"]}


def via_http(client: openai.OpenAI, model: str, messages: list[dict], max_new_tokens: int) -> dict:
    sent = time.perf_counter()
    first = last = None
    texts: list[str] = []
    usage = None
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_new_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            if first is None:
                first = last
            texts.append(chunk.choices[0].delta.content)
    if usage is None or first is None:
        raise RuntimeError("an HTTP stream ended without text or without usage")
    # One chunk per verifier message: the first carries the prefill's one token.
    count = usage.completion_tokens
    return {"text": "".join(texts), "tokens": count, "ttft_s": first - sent,
            "decode_tokens_per_s": (count - 1) / (last - first) if last > first else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompts", type=Path, help="a JSONL prompt file or a folder of them (round-robin)")
    parser.add_argument("--prompts", dest="count", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--server", default="127.0.0.1:50051", help="the verifier (gRPC)")
    parser.add_argument("--gateway", default="http://127.0.0.1:8000/v1", help="the gateway's OpenAI base URL")
    parser.add_argument("--model", default="blockpilot", help="the gateway's model id")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    prompts = load_prompts(args.prompts, args.count)
    http = openai.OpenAI(base_url=args.gateway, api_key="unused-on-a-plain-stack", max_retries=0, timeout=600)
    rows = []
    with BlockPilotClient(args.server, timeout=600) as grpc_client:
        warm = [{"role": "user", "content": "Hello."}]
        via_grpc(grpc_client, warm, 8)
        via_http(http, args.model, warm, 8)
        for i, prompt in enumerate(prompts):
            messages = [{"role": "user", "content": prompt["text"]}]
            order = ("grpc", "http") if i % 2 == 0 else ("http", "grpc")
            row = {"id": prompt["id"]}
            for way in order:
                row[way] = via_grpc(grpc_client, messages, args.max_new_tokens) if way == "grpc" else \
                    via_http(http, args.model, messages, args.max_new_tokens)
            row["identical"] = row["grpc"]["text"] == row["http"]["text"]
            for way in ("grpc", "http"):
                row[way].pop("text")
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

    def median(way: str, key: str) -> float:
        return statistics.median(r[way][key] for r in rows if r[way][key] is not None)

    decode_ratios = [r["http"]["decode_tokens_per_s"] / r["grpc"]["decode_tokens_per_s"] for r in rows
                     if r["http"]["decode_tokens_per_s"] and r["grpc"]["decode_tokens_per_s"]]
    summary = {
        "prompts": len(rows), "max_new_tokens": args.max_new_tokens, "identical": all(r["identical"] for r in rows),
        "grpc": {"ttft_s": median("grpc", "ttft_s"), "decode_tokens_per_s": median("grpc", "decode_tokens_per_s")},
        "http": {"ttft_s": median("http", "ttft_s"), "decode_tokens_per_s": median("http", "decode_tokens_per_s")},
        "decode_tokens_per_s_ratio_http_over_grpc": statistics.median(decode_ratios) if decode_ratios else None,
        "ttft_added_ms": 1000 * statistics.median(r["http"]["ttft_s"] - r["grpc"]["ttft_s"] for r in rows),
        "goal": "decode ratio >= 0.97, TTFT added <= 5 ms",
    }
    report = {"benchmark": "gateway_overhead", "command": " ".join(sys.argv), "summary": summary, "rows": rows,
              "machine": machine_info()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
