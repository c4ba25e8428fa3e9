"""`blockpilot bench`: a load generator over gRPC against a running verifier (registered by blockpilot.cli).

    blockpilot bench PROMPTS [--server 127.0.0.1:50051] [--concurrency 1,2,4,8,16]
                     [--requests N] [--max-new-tokens 64] [--block-size auto|off|N] [--compare-off]
                     [--time-limit-s S] [--out bench.json] [--plot bench.png]

Closed loop: at each concurrency level C, C clients each send one request, wait for its last
message and send the next, until the level's requests are done (or its time limit passes).
Prompts are the first turns of a JSONL file, or round-robin over a folder's files. Per level it
reports TTFT and inter-token latency (p50 / p99), aggregate tokens/s (completion tokens of all
requests over the level's wall time), goodput (requests finished per second), τ and the block
sizes the policy chose, and whether each prompt's tokens equal those of the first level (greedy
outputs must not depend on the load). --compare-off repeats every level as plain decoding (block
size 1, prompt lookup off: no speculation at all), interleaved level by level, for the speed-up of
speculation at each concurrency.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from blockpilot.cli_args import add_client_security_args, checked_number, client_security
from blockpilot.errors import BlockPilotError, InvalidArgumentError


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise InvalidArgumentError(f"--concurrency must be positive integers separated by commas, e.g. 1,4,16; got {text!r}")
    return levels


def _block_size(text: str) -> int | str:
    if text in ("auto", "off"):
        return text
    return checked_number(text, int, "auto, off or a block size", lambda v: v >= 1, "auto, off or a block size >= 1")


def add_parsers(sub) -> None:
    bench = sub.add_parser("bench", help="load-test a running verifier over gRPC: latency and throughput by concurrency")
    bench.add_argument("prompts", type=Path, metavar="PROMPTS", help="a prompt JSONL file or a folder of them")
    bench.add_argument("--datasets", nargs="+", default=None, metavar="NAME",
                       help="with a folder: these <NAME>.jsonl files, round-robin in this order (default: all, sorted)")
    bench.add_argument("--server", default="127.0.0.1:50051", help="the verifier's HOST:PORT (default 127.0.0.1:50051)")
    add_client_security_args(bench)
    bench.add_argument("--concurrency", type=_levels, default=[1, 2, 4, 8, 16, 32], help="levels, e.g. 1,4,16 (default 1,2,4,8,16,32)")
    bench.add_argument("--requests", type=lambda t: checked_number(t, int, "a count", lambda v: v >= 1, "a count >= 1"),
                       default=None, help="requests per level (default: max(16, 2 x the level))")
    bench.add_argument("--max-new-tokens", type=lambda t: checked_number(t, int, "a count", lambda v: v >= 1, "a count >= 1"),
                       default=64)
    bench.add_argument("--temperature", type=float, default=0.0)
    bench.add_argument("--block-size", type=_block_size, default="auto", help="auto (the policy; default), off or a size")
    bench.add_argument("--compare-off", action="store_true",
                       help="also run every level as plain decoding (block size 1, prompt lookup off), interleaved")
    bench.add_argument("--time-limit-s", type=float, default=600.0, help="per level: no new request after this long")
    bench.add_argument("--timeout-s", type=float, default=300.0, help="deadline of each request")
    bench.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    bench.add_argument("--plot", type=Path, default=None, help="write a PNG of tokens/s and latency by concurrency")
    bench.set_defaults(handler=_bench)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


PLAIN = "plain"  # the --compare-off baseline: block size 1 and prompt lookup off


def _one(client, prompt: dict, args, block_size) -> dict:
    began = time.perf_counter()
    ttft, gaps, tokens, final = None, [], [], None
    last = began
    for event in client.stream(messages=[{"role": "user", "content": prompt["text"]}], max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, block_size="off" if block_size == PLAIN else block_size,
                               prompt_lookup=False if block_size == PLAIN else None, timeout=args.timeout_s):
        now = time.perf_counter()
        if event.final is not None:
            final = event.final
            break
        if ttft is None:
            ttft = now - began
        elif event.token_ids:
            gaps.extend([(now - last) / len(event.token_ids)] * len(event.token_ids))
        tokens.extend(event.token_ids)
        last = now
    return {"id": prompt["id"], "ttft_s": ttft or 0.0, "gaps": gaps, "token_ids": tokens, "tau": final.tau,
            "block_size": final.block_size, "fallback_reason": final.fallback_reason, "total_s": time.perf_counter() - began,
            "backend": f"{final.backend}/{final.precision}"}


def run_level(server: str, prompts: list[dict], concurrency: int, count: int, args, block_size) -> dict:
    """One closed-loop level: `concurrency` clients share `count` requests."""
    from blockpilot.client import BlockPilotClient

    results: list[dict] = []
    errors: Counter = Counter()
    lock = threading.Lock()
    next_index = iter(range(count))
    began = time.perf_counter()

    def worker():
        with BlockPilotClient(server, security=client_security(args)) as client:
            while time.perf_counter() - began < args.time_limit_s:
                with lock:
                    index = next(next_index, None)
                if index is None:
                    return
                try:
                    row = _one(client, prompts[index % len(prompts)], args, block_size)
                except BlockPilotError as err:
                    with lock:
                        code = getattr(err, "status_code", None)
                        errors[code.name if code is not None else "UNKNOWN"] += 1
                    continue
                row["index"] = index
                with lock:
                    results.append(row)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(len(r["token_ids"]) for r in results)
    return {
        "concurrency": concurrency, "block_size": str(block_size), "requests": len(results), "errors": dict(errors),
        "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "goodput_requests_per_s": len(results) / wall if wall > 0 else 0.0,
        "ttft_p50_s": _percentile([r["ttft_s"] for r in results], 50), "ttft_p99_s": _percentile([r["ttft_s"] for r in results], 99),
        "itl_p50_s": _percentile(gaps, 50), "itl_p99_s": _percentile(gaps, 99),
        "tau": sum(r["tau"] for r in results) / len(results) if results else 0.0,
        "block_sizes": dict(Counter(str(r["block_size"]) for r in results)),
        "backends": dict(Counter(r["backend"] for r in results)),  # backend/precision the server named
        "fallbacks": dict(Counter(r["fallback_reason"] for r in results if r["fallback_reason"])),
        "outputs": {str(r["index"]): r["token_ids"] for r in results},
    }


def _bench(args) -> int:
    from blockpilot.benchmarking import load_prompts, machine_info

    levels = args.concurrency
    count_for = (lambda c: args.requests) if args.requests else (lambda c: max(16, 2 * c))
    prompts = load_prompts(args.prompts, max(count_for(c) for c in levels), args.datasets)
    if not prompts:
        raise InvalidArgumentError(f"no prompts in '{args.prompts}'")
    modes = [args.block_size] + ([PLAIN] if args.compare_off else [])
    report = {"server": args.server, "prompts": str(args.prompts), "datasets": args.datasets,
              "prompt_ids": [p["id"] for p in prompts], "max_new_tokens": args.max_new_tokens,
              "temperature": args.temperature, "machine": machine_info(), "levels": []}
    reference: dict[str, dict[str, list[int]]] = {}
    for concurrency in levels:
        for mode in modes:
            print(f"bench: concurrency {concurrency}, block size {mode} ...", file=sys.stderr, flush=True)
            level = run_level(args.server, prompts, concurrency, count_for(concurrency), args, mode)
            # Greedy outputs must not depend on the load: compare each prompt with its first run.
            seen = reference.setdefault(str(mode), {})
            same = total = 0
            for index, ids in level["outputs"].items():
                key = prompts[int(index) % len(prompts)]["id"]
                if key in seen:
                    total += 1
                    same += seen[key] == ids
                else:
                    seen[key] = ids
            level["identical_to_first_run"] = f"{same}/{total}"
            del level["outputs"]
            report["levels"].append(level)
            print(f"  {level['tokens_per_s']:.1f} tok/s, TTFT p50 {level['ttft_p50_s']:.2f} s p99 {level['ttft_p99_s']:.2f} s, "
                  f"ITL p50 {1000 * level['itl_p50_s']:.0f} ms p99 {1000 * level['itl_p99_s']:.0f} ms, tau {level['tau']:.2f}, "
                  f"identical {level['identical_to_first_run']}, errors {level['errors'] or 0}", file=sys.stderr, flush=True)
    base = {str(m): next((l["tokens_per_s"] for l in report["levels"] if l["block_size"] == str(m)), 0.0) for m in modes}
    for level in report["levels"]:
        level["x_one_stream"] = level["tokens_per_s"] / base[level["block_size"]] if base[level["block_size"]] else 0.0
    if len(modes) == 2:
        plain = {l["concurrency"]: l["tokens_per_s"] for l in report["levels"] if l["block_size"] == PLAIN}
        for level in report["levels"]:
            if level["block_size"] != PLAIN and plain.get(level["concurrency"]):
                level["x_plain"] = level["tokens_per_s"] / plain[level["concurrency"]]
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    if args.plot:
        _plot(report, args.plot)
    return 0


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in dict.fromkeys(l["block_size"] for l in report["levels"]):
        rows = [l for l in report["levels"] if l["block_size"] == mode]
        xs = [l["concurrency"] for l in rows]
        left.plot(xs, [l["tokens_per_s"] for l in rows], marker="o", label=f"block size {mode}")
        right.plot(xs, [1000 * l["itl_p99_s"] for l in rows], marker="o", label=f"p99, block size {mode}")
        right.plot(xs, [1000 * l["itl_p50_s"] for l in rows], marker=".", linestyle="--", label=f"p50, block size {mode}")
    left.set(xlabel="concurrent streams", ylabel="aggregate tokens/s", xscale="log", title="throughput")
    right.set(xlabel="concurrent streams", ylabel="inter-token latency (ms)", xscale="log", title="latency")
    left.legend()
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
