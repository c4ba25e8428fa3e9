"""Where a decode step's time goes, per block size and draft source, next to the isolated verify pass.

For each prompt and block size the default engine (default backend, the shipped drafter) decodes
greedily with prompt lookup off (every step of a block size > 1 is then a DFlash step) and on, and
the loop's own phase clock (GenerationResult.phase_s: lookup, draft, verify, accept, bookkeeping)
is divided by its steps. Beside it, the same backend's verify pass of k tokens timed alone (the
cost model of a policy sweep), so the in-loop verify can be compared with what the forward costs.

    .venv/bin/python benchmarks/step_profile.py ../shared/datasets --prompts 6 --block-sizes 1 2 4 8 --out runs/step_profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from blockpilot.backends import DEFAULT_VERIFIER_BACKEND
from blockpilot.backends.loader import BackendOptions
from blockpilot.benchmarking import load_prompts, machine_info
from blockpilot.decoding.lookup import LOOKUP_OFF, LookupConfig, lookup_for
from blockpilot.decoding.speculative import STEP_PHASES, SamplingParams
from blockpilot.policy.sweep import measure_cost_model
from blockpilot.runtime import load_engine, set_threads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("datasets", type=Path, help="a prompt JSONL file or a folder of them")
    parser.add_argument("--prompts", type=int, default=6, help="prompts in all, round-robin over the files")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    set_threads(args.threads)
    engine = load_engine(None, None, backend=BackendOptions(name=DEFAULT_VERIFIER_BACKEND, threads=args.threads))
    prompts = load_prompts(args.datasets, args.prompts)
    encoded = [engine.tokenizer.encode_chat([{"role": "user", "content": p["text"]}]) for p in prompts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, stop_token_ids=engine.tokenizer.stop_token_ids)
    context = sorted(len(ids) for ids in encoded)[len(encoded) // 2] + args.max_new_tokens // 2
    isolated = measure_cost_model(engine.verifier_target, engine.drafter, max(args.block_sizes), context, repeats=5,
                                  max_verify_size=LookupConfig().max_tokens + 1)
    totals: dict[str, dict] = {}
    for ids in tqdm(encoded, desc="prompts", file=sys.stderr):
        for lookup_name, lookup in (("off", LOOKUP_OFF), ("on", lookup_for(engine.decoder.target))):
            for size in args.block_sizes:
                result = engine.decoder.generate(ids, params, size, lookup=lookup)
                entry = totals.setdefault(f"B={size} lookup={lookup_name}", {"steps": 0, "tokens": 0, "decode_s": 0.0,
                                                                            **dict.fromkeys(STEP_PHASES, 0.0)})
                entry["steps"] += len(result.acceptance_lengths)
                entry["tokens"] += sum(result.acceptance_lengths)
                entry["decode_s"] += result.decode_s
                for name in STEP_PHASES:
                    entry[name] += result.phase_s[name]
    rows = {}
    for key, entry in totals.items():
        steps = max(entry["steps"], 1)
        rows[key] = {"steps": entry["steps"], "tau": entry["tokens"] / steps,
                     "step_ms": 1000 * entry["decode_s"] / steps,
                     **{f"{name}_ms": 1000 * entry[name] / steps for name in STEP_PHASES},
                     "decode_tokens_per_s": entry["tokens"] / entry["decode_s"] if entry["decode_s"] else 0.0}
    report = {"machine": machine_info(), "backend": engine.backend, "drafter": engine.drafter_name,
              "prompts": [p["id"] for p in prompts], "max_new_tokens": args.max_new_tokens,
              "isolated_verify_ms": {k: 1000 * v for k, v in isolated.verify_s.items()},
              "isolated_draft_ms": {k: 1000 * v for k, v in isolated.draft_s.items()},
              "isolated_context_tokens": context, "by_block_size": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    one = report["isolated_verify_ms"][1]
    print("isolated verify ms (x 1 token): " + ", ".join(f"{k}: {v:.1f} ({v / one:.2f})" for k, v in report["isolated_verify_ms"].items()))
    print("isolated draft ms: " + ", ".join(f"{k}: {v:.1f}" for k, v in report["isolated_draft_ms"].items()))
    print(f"{'':18s} {'steps':>6s} {'tau':>5s} {'step':>6s} " + " ".join(f"{n:>11s}" for n in STEP_PHASES) + "  tok/s")
    for key, row in rows.items():
        print(f"{key:18s} {row['steps']:6d} {row['tau']:5.2f} {row['step_ms']:6.1f} "
              + " ".join(f"{row[n + '_ms']:11.2f}" for n in STEP_PHASES) + f"  {row['decode_tokens_per_s']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
