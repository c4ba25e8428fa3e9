"""The drafter service's shared passes: N sessions' draft steps as N passes (one after another, as
each session alone) vs one pass over all of them (`propose_together`, what the service's batcher
runs), same drafter, same steps, interleaved.

Each session holds `--context` tokens of context (random target features) and drafts a block of
the drafter's size from 1-3 new context rows per step, as in decoding. The drafter runs in the
precision the engine picks on this machine (int8 where torch has the x86 int8 kernels) and,
with --precisions, others beside it. Drafts of the two ways are compared (the shared pass sums
over more rows, so a float kernel may round differently; int8 layers quantize their input over
the whole pass): the share of draft tokens that agree is reported. JSON (--out) with ms per
round (all N sessions drafting once) each way, the ratio, agreement and the machine.

    .venv/bin/python benchmarks/drafter_batching.py --sessions 1 4 8 16 --out runs/drafter_batching.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def rounds(local, sessions: int, context: int, width: int, vocab: int, repeats: int, seed: int):
    """The steps of `repeats` rounds for `sessions` sessions (fixed by seed), and the held context."""
    import torch

    from blockpilot.decoding.drafting import DraftRequest

    generator = torch.Generator().manual_seed(seed)
    held = [torch.randn(context, width, generator=generator) for _ in range(sessions)]
    steps, length = [], context
    for _ in range(repeats):
        new = int(torch.randint(1, 4, (), generator=generator))
        steps.append([DraftRequest(anchor=int(torch.randint(vocab, (), generator=generator)), start=length + new,
                                   num_draft=local.block_size - 1, context=torch.randn(new, width, generator=generator),
                                   context_start=length) for _ in range(sessions)])
        length += new
    return held, steps


def opened(local, held, capacity: int):
    """Sessions whose caches hold the given context (one prefill step each, not timed)."""
    import torch

    from blockpilot.decoding.drafting import DraftRequest

    sessions = []
    for context in held:
        session = local.open_session(capacity)
        session.propose(DraftRequest(anchor=0, start=context.shape[0], num_draft=1, context=context, context_start=0))
        sessions.append(session)
    return sessions


def measure(local, sessions: int, context: int, repeats: int, seed: int) -> dict:
    from blockpilot.decoding.drafting import propose_together

    config = local.target.config
    width = len(local.target_layer_ids) * config.hidden_size
    held, steps = rounds(local, sessions, context, width, config.vocab_size, repeats, seed)
    capacity = context + 4 * repeats + 8
    alone_sessions, together_sessions = opened(local, held, capacity), opened(local, held, capacity)
    alone_ms, together_ms, agree, total = [], [], 0, 0
    for index, round_steps in enumerate(steps):
        # Interleaved, the order alternating, so drift in the machine's speed hits both ways.
        ways = ("alone", "together") if index % 2 == 0 else ("together", "alone")
        drafts = {}
        for way in ways:
            started = time.perf_counter()
            if way == "alone":
                drafts[way] = [s.propose(r) for s, r in zip(alone_sessions, round_steps)]
                alone_ms.append((time.perf_counter() - started) * 1e3)
            else:
                drafts[way] = propose_together(together_sessions, round_steps)
                together_ms.append((time.perf_counter() - started) * 1e3)
        for a, b in zip(drafts["alone"], drafts["together"]):
            agree += int((a.tokens == b.tokens).sum())
            total += a.tokens.numel()
    warm = max(1, repeats // 5)  # first rounds warm the kernels
    alone, together = statistics.median(alone_ms[warm:]), statistics.median(together_ms[warm:])
    return {"sessions": sessions, "alone_ms_per_round": round(alone, 3), "together_ms_per_round": round(together, 3),
            "speedup": round(alone / together, 3), "ms_per_session_step_together": round(together / sessions, 3),
            "draft_token_agreement": round(agree / total, 4), "rounds": repeats - warm}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="default", help="target (default: the default model)")
    parser.add_argument("--drafter", default="", help="drafter ('' = the target's shipped drafter)")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8, 16], help="sessions per round")
    parser.add_argument("--precisions", nargs="+", default=["auto"],
                        help="drafter precisions: auto (the engine's pick on this machine), fp32, bf16, int8")
    parser.add_argument("--context", type=int, default=256, help="context tokens each session holds")
    parser.add_argument("--repeats", type=int, default=30, help="rounds per session count")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the drafter service's default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)

    import torch

    from blockpilot.benchmarking import machine_info
    from blockpilot.decoding.drafting import LocalDrafter, draft_precision
    from blockpilot.serving.models import load_drafter_target, load_served_drafter

    torch.set_num_threads(args.threads)
    served = load_drafter_target(args.target)
    shipped, name = load_served_drafter(served, args.drafter)
    if shipped is None:
        raise SystemExit(f"target {args.target!r} has no drafter {args.drafter!r}")
    report = {"machine": machine_info(), "target": args.target, "drafter": name, "context": args.context,
              "block_size": shipped.block_size, "threads": args.threads, "rows": []}
    for precision in args.precisions:
        model = served.torch_model  # the target's embedding and lm_head (what the drafter service holds)
        chosen = draft_precision(model.device) if precision == "auto" else precision
        local = LocalDrafter(shipped.source, model, precision=chosen)
        for sessions in args.sessions:
            row = {"precision": local.precision, **measure(local, sessions, args.context, args.repeats, args.seed)}
            report["rows"].append(row)
            print(f"{row['precision']:>5} {sessions:>3} sessions: alone {row['alone_ms_per_round']:8.2f} ms, "
                  f"one pass {row['together_ms_per_round']:8.2f} ms ({row['speedup']:.2f}x), "
                  f"drafts agree {row['draft_token_agreement']:.1%}", file=sys.stderr)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
