"""The drafter service's memory: the whole target (how the service loaded it before) vs its
embedding and lm_head alone (blockpilot.serving.models.load_drafter_target), same drafter.

Each way runs in a fresh child process that imports what the service imports, loads the target and
the drafter as the service does, opens one draft session and drafts a fixed set of steps; it
reports its resident memory after loading (RSS, psutil), its peak (ru_maxrss) and the drafts. A
third child only imports (the interpreter + torch floor). The drafts of the two ways must be
identical. JSON (--out) with the three rows, the differences and the machine.

    .venv/bin/python benchmarks/drafter_memory.py --out runs/drafter_memory.json
    .venv/bin/python benchmarks/drafter_memory.py --target Qwen/Qwen3-4B --drafter z-lab/Qwen3-4B-DFlash-b16 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

WAYS = ("imports-only", "whole-target", "embedding-and-lm-head")
MIB = 1 << 20


def child(way: str, target: str, drafter: str, dtype: str, device: str) -> dict:
    """Load as the drafter service does (one way) and report memory and drafts."""
    import psutil
    import torch

    from blockpilot.decoding.drafting import DraftRequest
    from blockpilot.models.placement import Placement
    from blockpilot.serving.models import load_drafter_target, load_served_drafter, load_served_target

    torch.set_num_threads(1)
    row: dict = {"way": way}
    if way == "imports-only":
        row["rss_mib"] = round(psutil.Process().memory_info().rss / MIB, 1)
        row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return row
    placement = Placement(dtype, device)
    load = load_served_target if way == "whole-target" else load_drafter_target
    served = load(target, placement=placement)
    local, name = load_served_drafter(served, drafter)
    if local is None:
        raise SystemExit(f"target {target!r} has no drafter {drafter!r} to serve")
    row["rss_after_load_mib"] = round(psutil.Process().memory_info().rss / MIB, 1)
    row["held_parameters"] = sum(p.numel() for p in served.torch_model.parameters())
    width = len(local.target_layer_ids) * served.torch_model.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    session, drafts, committed = local.open_session(512), [], 0
    for new in (64, 3, 1, 5, 2):
        context = torch.randn(new, width, generator=generator)
        step = DraftRequest(anchor=int(torch.randint(served.torch_model.config.vocab_size, (), generator=generator)),
                            start=committed + new, num_draft=local.block_size - 1, context=context, context_start=committed)
        drafts.append(session.propose(step).tokens.tolist())
        committed += new
    row.update(drafter=name, drafter_precision=local.precision, placement=placement.describe(), drafts=drafts,
               rss_mib=round(psutil.Process().memory_info().rss / MIB, 1),
               peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="default")
    parser.add_argument("--drafter", default="", help="'' = the engine's default (the shipped drafter of the default target)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", choices=WAYS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.target, args.drafter, args.dtype, args.device)))
        return 0

    from blockpilot.benchmarking import machine_info

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = {}
    for way in WAYS:
        done = subprocess.run([sys.executable, __file__, "--child", way, "--target", args.target, "--drafter", args.drafter,
                               "--dtype", args.dtype, "--device", args.device], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        rows[way] = json.loads(done.stdout.strip().splitlines()[-1])
    whole, slim = rows["whole-target"], rows["embedding-and-lm-head"]
    identical = whole["drafts"] == slim["drafts"]
    report = {
        "setup": {"target": args.target, "drafter": whole["drafter"], "placement": whole["placement"],
                  "drafter_precision": whole["drafter_precision"], "steps": len(whole["drafts"]), "threads": 1},
        "rows": rows,
        "rss_saved_mib": round(whole["rss_mib"] - slim["rss_mib"], 1),
        "peak_rss_saved_mib": round(whole["peak_rss_mib"] - slim["peak_rss_mib"], 1),
        "drafts_identical": identical,
        "machine": machine_info(),
    }
    floor = rows["imports-only"]["rss_mib"]
    print(f"drafter service memory, target {args.target}, drafter {whole['drafter']} ({whole['drafter_precision']}), "
          f"{whole['placement']}; imports alone {floor} MiB RSS")
    for way in WAYS[1:]:
        row = rows[way]
        print(f"  {way:22s} RSS {row['rss_mib']:8.1f} MiB (peak {row['peak_rss_mib']:8.1f} MiB), target parameters held "
              f"{row['held_parameters']:,}")
    print(f"  saved: RSS {report['rss_saved_mib']} MiB, peak {report['peak_rss_saved_mib']} MiB; drafts identical: {identical}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
