"""Soak a running verifier: N concurrent greedy streams for M minutes, every output checked.

First each prompt's reference is taken one request at a time at block size 1 (prompt lookup off);
then N client threads send the prompts round-robin (the default path: the policy's block size,
lookup on) until the time is up, and every output must equal its prompt's reference. Reported:
streams, minutes, requests, errors by status, outputs identical / different, aggregate tokens/s,
TTFT p50 / p99, and the machine. Bounded in time (--minutes) and count (--max-requests); loopback
or any address, TLS and tokens as the other client commands.

    .venv/bin/blockpilot up
    .venv/bin/python benchmarks/soak.py ../shared/datasets --streams 8 --minutes 5 --out runs/soak.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from blockpilot.benchmarking import machine_info, read_jsonl_prompts
from blockpilot.cli_args import add_client_security_args, client_security
from blockpilot.client import BlockPilotClient
from blockpilot.errors import BlockPilotError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("datasets", type=Path, help="folder of evaluation *.jsonl files ({id, dataset, turns})")
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--prompts-per-dataset", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams")
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--max-requests", type=int, default=10_000)
    parser.add_argument("--out", type=Path, required=True)
    add_client_security_args(parser)
    args = parser.parse_args(argv)

    security = client_security(args)
    prompts = [p for f in sorted(args.datasets.glob("*.jsonl")) for p in read_jsonl_prompts(f, args.prompts_per_dataset)]
    messages = [[{"role": "user", "content": p["text"]}] for p in prompts]
    with BlockPilotClient(args.server, security=security) as client:
        references = [client.generate(messages=m, max_new_tokens=args.max_new_tokens, block_size="off", prompt_lookup=False).token_ids
                      for m in messages]
    print(f"references: {len(references)} prompts", file=sys.stderr)

    lock = threading.Lock()
    counts: Counter = Counter()
    ttfts: list[float] = []
    tokens = [0]
    differing: list[str] = []
    issued = iter(range(args.max_requests))
    began = time.monotonic()
    stop_at = began + args.minutes * 60

    def worker() -> None:
        with BlockPilotClient(args.server, security=security, retries=0) as own:
            while time.monotonic() < stop_at:
                with lock:
                    index = next(issued, None)
                if index is None:
                    return
                prompt = index % len(messages)
                sent = time.monotonic()
                first = None
                try:
                    output: list[int] = []
                    for event in own.stream(messages=messages[prompt], max_new_tokens=args.max_new_tokens):
                        if event.token_ids and first is None:
                            first = time.monotonic() - sent
                        output += event.token_ids
                except BlockPilotError as err:
                    code = getattr(err, "status_code", None)
                    with lock:
                        counts[f"error:{code.name if code is not None else 'client'}"] += 1
                    continue
                with lock:
                    counts["ok"] += 1
                    tokens[0] += len(output)
                    if first is not None:
                        ttfts.append(first)
                    if output != references[prompt]:
                        differing.append(prompts[prompt]["id"])

    threads = [threading.Thread(target=worker) for _ in range(args.streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - began
    ttfts.sort()
    report = {
        "machine": machine_info(), "server": args.server, "tls": security.tls, "token": bool(security.token_file),
        "streams": args.streams, "minutes": seconds / 60, "requests": sum(counts.values()), "outcomes": dict(counts),
        "errors": sum(v for k, v in counts.items() if k != "ok"), "identical": counts["ok"] - len(differing),
        "different": sorted(set(differing)), "tokens_per_s": tokens[0] / seconds,
        "ttft_s_p50": statistics.median(ttfts) if ttfts else None,
        "ttft_s_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}))
    return 0 if report["errors"] == 0 and not differing else 1


if __name__ == "__main__":
    sys.exit(main())
