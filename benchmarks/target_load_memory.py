"""Peak CPU memory of loading the target (TargetModel.from_pretrained) at a dtype.

Each dtype loads in a fresh child process: it imports the engine, notes its RSS (the interpreter +
torch floor), loads the target as the engine does (blockpilot.models.store.resolve_target, then
TargetModel.from_pretrained with the dtype and device), and reports the peak RSS (VmHWM: this
process's own peak; ru_maxrss would carry the parent's RSS over fork and exec), the RSS after
loading, the load time, the
bytes of the weights it holds and a SHA-256 of the logits of a fixed prompt, so that two builds of
the loader can be compared on the same numbers (same digest = same outputs).

    .venv/bin/python benchmarks/target_load_memory.py --dtype bfloat16 float32 --out runs/target_load_memory.json
    .venv/bin/python benchmarks/target_load_memory.py --target Qwen/Qwen3-4B --dtype bfloat16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MIB = 1 << 20


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) * 1024


def child(target: str, dtype: str, device: str) -> dict:
    import hashlib

    import torch

    from blockpilot.models.placement import Placement
    from blockpilot.models.store import resolve_target
    from blockpilot.models.target import TargetModel

    torch.set_num_threads(1)
    placement = Placement(dtype, device)
    model_dir = resolve_target(target)
    floor = status_bytes("VmRSS")
    began = time.perf_counter()
    model = TargetModel.from_pretrained(model_dir, dtype=placement.torch_dtype, device=placement.torch_device())
    load_s = time.perf_counter() - began
    peak, rss = status_bytes("VmHWM"), status_bytes("VmRSS")
    tokens = torch.arange(1, 17, device=model.device)[None] % model.config.vocab_size
    with torch.inference_mode():
        logits = model(tokens, model.new_cache(16)).logits
    weights = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return {"dtype": dtype, "placement": placement.describe(), "load_s": round(load_s, 2),
            "floor_rss_mib": round(floor / MIB, 1), "peak_rss_mib": round(peak / MIB, 1),
            "rss_after_load_mib": round(rss / MIB, 1), "peak_above_floor_mib": round((peak - floor) / MIB, 1),
            "weights_mib": round(sum(weights.values()) / MIB, 1),
            "logits_sha256": hashlib.sha256(logits.float().cpu().numpy().tobytes()).hexdigest()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="default")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.target, args.child, args.device)))
        return 0

    from blockpilot.benchmarking import machine_info

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    for dtype in args.dtype:
        done = subprocess.run([sys.executable, __file__, "--child", dtype, "--target", args.target, "--device", args.device],
                              capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{args.target} {row['placement']}: peak RSS {row['peak_rss_mib']} MiB ({row['peak_above_floor_mib']} MiB above "
              f"the {row['floor_rss_mib']} MiB import floor), RSS after load {row['rss_after_load_mib']} MiB, weights "
              f"{row['weights_mib']} MiB, {row['load_s']} s; logits {row['logits_sha256'][:16]}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"target": args.target, "rows": rows, "machine": machine_info()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
