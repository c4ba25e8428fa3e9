"""What TLS + tokens cost: the plain stack and the `up --secure` stack, same model, same prompts.

Starts both stacks with `blockpilot up`'s machinery (blockpilot/serving/stack.py), each in its own
run dir on free loopback ports with its own redis-server: the plain one, and the secured one (TLS on
every service, mTLS and the service token between verifier, drafter and policy, the client's token,
a Redis ACL user). Then, after one warm-up request per stack, each prompt goes through both stacks
one request at a time, the order alternating per prompt (so drift of a loaded machine hits both
alike): greedy, the default path (policy block size, prompt lookup on). Measured per request: TTFT
and decode tokens/s as the client sees them (first token's arrival; tokens after the first over
the time from the first to the last) and as the verifier reports them. Outputs of the two stacks
must be identical. JSON (--out) with per-prompt rows, medians, secure/plain ratios (medians of
per-prompt ratios) and the machine.

    .venv/bin/python benchmarks/secure_overhead.py ../shared/datasets --prompts 10 --out runs/secure_overhead.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from blockpilot.benchmarking import load_prompts, machine_info, timed_generation
from blockpilot.client import BlockPilotClient
from blockpilot.serving import stack
from blockpilot.serving.security import ClientSecurity


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def run_dir(folder: Path):
    """The stack functions find their stack through $BLOCKPILOT_RUN_DIR: point it at one stack."""
    before = os.environ.get("BLOCKPILOT_RUN_DIR")
    os.environ["BLOCKPILOT_RUN_DIR"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("BLOCKPILOT_RUN_DIR")
        else:
            os.environ["BLOCKPILOT_RUN_DIR"] = before


def measure(client: BlockPilotClient, messages: list[dict], max_new_tokens: int) -> dict:
    run = timed_generation(client, messages, max_new_tokens)
    final = run["final"]
    return {"tokens": run["token_ids"], "ttft_s": run["ttft_s"], "total_s": run["total_s"],
            "decode_tokens_per_s": run["decode_tokens_per_s"],
            "server_ttft_s": final.timings.ttft_s, "server_decode_tokens_per_s": final.timings.decode_tokens_per_s,
            "fallback_reason": final.fallback_reason, "block_size": final.block_size}


def stack_options(args, secure: bool) -> stack.StackOptions:
    ports = {f"{name}_{kind}": free_port() for name in stack.SERVICES for kind in ("port", "metrics_port")}
    # Nothing answers on a fresh port: `up` starts an own redis-server (with the ACL user when secure).
    return stack.StackOptions(redis_url=f"redis://127.0.0.1:{free_port()}/0", threads=args.threads, timeout_s=600,
                              secure=secure, **ports)


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("datasets", type=Path, help="folder of evaluation *.jsonl files ({id, dataset, turns})")
    parser.add_argument("--prompts", type=int, default=10, help="prompts, round-robin over the datasets")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="threads per service")
    parser.add_argument("--run-dir", type=Path, default=None, help="parent of the two stacks' run dirs (default: a new "
                                                                    "temporary folder)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    prompts = load_prompts(args.datasets, args.prompts)
    base = args.run_dir or Path(tempfile.mkdtemp(prefix="blockpilot-secure-overhead-"))
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    began = time.monotonic()
    clients: dict[str, BlockPilotClient] = {}
    started: list[Path] = []
    try:
        for name in ("plain", "secure"):
            folder = base / name
            folder.mkdir(parents=True, exist_ok=True)
            with run_dir(folder):
                started.append(folder)
                state = stack.up(stack_options(args, secure=name == "secure"), log=log)
            address = state["services"]["verifier"]["address"]
            security = ClientSecurity()
            if name == "secure":  # what a client of `up --secure` holds: the CA and the data token
                material = folder / "secure"
                security = ClientSecurity(tls_ca=str(material / stack.SECURE_FILES["ca"]),
                                          token_file=str(material / stack.SECURE_FILES["token"]))
            clients[name] = BlockPilotClient(address, security=security, retries=0, timeout=300)
        for name, client in clients.items():  # warm-up: first-request costs are not what is measured
            measure(client, [{"role": "user", "content": prompts[0]["text"]}], args.max_new_tokens)
        rows = []
        for index, prompt in enumerate(prompts):
            messages = [{"role": "user", "content": prompt["text"]}]
            order = ("plain", "secure") if index % 2 == 0 else ("secure", "plain")
            row = {"id": prompt["id"], "order": list(order)}
            for name in order:
                row[name] = measure(clients[name], messages, args.max_new_tokens)
            row["identical"] = row["plain"]["tokens"] == row["secure"]["tokens"]
            for name in order:
                row[name]["tokens"] = len(row[name]["tokens"])
            rows.append(row)
            log(f"{prompt['id']}: plain {row['plain']['decode_tokens_per_s']:.1f} tok/s, TTFT {1000 * row['plain']['ttft_s']:.0f} ms; "
                f"secure {row['secure']['decode_tokens_per_s']:.1f} tok/s, TTFT {1000 * row['secure']['ttft_s']:.0f} ms; "
                f"identical {row['identical']}")
    finally:
        for client in clients.values():
            client.close()
        for folder in reversed(started):
            with run_dir(folder):
                stack.down(grace_s=10, log=log)

    def ratio(key: str) -> float | None:
        return median(r["secure"][key] / r["plain"][key] for r in rows if r["secure"][key] and r["plain"][key])

    keys = ("decode_tokens_per_s", "ttft_s", "server_decode_tokens_per_s", "server_ttft_s", "total_s")
    summary = {name: {key: median(r[name][key] for r in rows) for key in keys} for name in ("plain", "secure")}
    summary["secure_over_plain"] = {key: ratio(key) for key in keys}
    report = {"machine": machine_info(), "model": "default", "path": "default (policy block size, prompt lookup on), greedy",
              "settings": {"prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "threads": args.threads,
                           "datasets": args.datasets.name},
              "secure": "TLS on every service, mTLS + service token between services, client token, Redis ACL user",
              "minutes": round((time.monotonic() - began) / 60, 2), "identical": sum(r["identical"] for r in rows),
              "requests_per_stack": len(rows), "summary": summary, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("identical", "requests_per_stack", "summary")}, indent=1))
    return 0 if report["identical"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
