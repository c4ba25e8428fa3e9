"""How long a prompt-lookup proposal should be after a match of n tokens, for a verify-cost curve.

Replays prompt lookup (blockpilot/decoding/lookup.py) along the target's own greedy responses
(`blockpilot drafter data` output: training prompts, never evaluation prompts). At every response
position it finds the longest matching suffix n (1..--max-ngram) and counts how many copied tokens
are right in a row. From that, P(at least j right | n), and for a cost curve c(k) (seconds of a
verify pass of k tokens relative to one token) the proposal length L that maximizes a step's
worth, (1 + sum_{j<=L} P(>= j right | n)) / c(L + 1), against the lengths LookupConfig uses by
default. The cost curve comes from a policy sweep folder's cost model (measured on the machine that
ran it) or from --curve.

    .venv/bin/python benchmarks/lookup_lengths.py --data data/drafter/responses \\
        --cost runs/policy/sweepE-train --out runs/lookup_lengths.json
    .venv/bin/python benchmarks/lookup_lengths.py --data data/drafter/responses --curve 1:1 2:1.18 4:1.18 8:1.43 16:2.01
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from blockpilot.training.data import read_dataset
from blockpilot.benchmarking import machine_info
from blockpilot.decoding.lookup import LookupConfig, PromptLookupIndex
from blockpilot.policy.sweep import read_cost_model

MAX_LENGTH = 16


def acceptance_by_match(records: list[dict], max_ngram: int) -> tuple[dict[int, list[float]], Counter]:
    """{n: [P(>= j copied tokens right | longest match n) for j = 1..MAX_LENGTH]}, positions per n (0 = no match)."""
    config = LookupConfig(min_ngram=1, max_ngram=max_ngram, max_tokens=MAX_LENGTH, max_tokens_by_ngram=())
    runs: dict[int, Counter] = {}
    positions: Counter = Counter()
    for record in records:
        response = record["response_ids"]
        index = PromptLookupIndex(config, record["prompt_ids"] + response[:1])
        for t in range(1, len(response)):
            n, end = index.longest_match()
            proposal = index.propose() if n else []
            positions[n] += 1
            if proposal:
                truth = response[t : t + MAX_LENGTH]
                right = 0
                while right < min(len(proposal), len(truth)) and proposal[right] == truth[right]:
                    right += 1
                runs.setdefault(n, Counter())[right] += 1
            index.extend([response[t]])
    survival = {}
    for n, counts in sorted(runs.items()):
        total = sum(counts.values())
        survival[n] = [sum(v for right, v in counts.items() if right >= j) / total for j in range(1, MAX_LENGTH + 1)]
    return survival, positions


def relative_cost(curve: dict[int, float], k: int) -> float:
    sizes = sorted(curve)
    return float(np.interp(k, sizes, [curve[s] / curve[1] for s in sizes]))


def step_worth(survival: list[float], length: int, curve: dict[int, float]) -> float:
    """Tokens per unit of one-token verify time of a step proposing `length` tokens (0: a plain step)."""
    return (1 + sum(survival[:length])) / relative_cost(curve, length + 1) if length else 1.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="`blockpilot drafter data` folder (or JSONL of the earlier format)")
    parser.add_argument("--cost", type=Path, default=None, help="a policy sweep folder (or cost model JSON) with verify_s")
    parser.add_argument("--curve", nargs="+", default=None, metavar="K:COST", help="a cost curve instead, e.g. 1:1 2:1.1 8:1.5")
    parser.add_argument("--max-records", type=int, default=700)
    parser.add_argument("--mode", choices=("greedy", "sample"), default="greedy",
                        help="which responses: greedy, or sampled at temperature 1 (a copied token equal to the "
                             "sampled one is what sample-and-match accepts, so these give the T=1 acceptance)")
    parser.add_argument("--max-ngram", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if (args.cost is None) == (args.curve is None):
        parser.error("give exactly one of --cost and --curve")
    if args.cost is not None:
        curve = read_cost_model(args.cost).verify_s
    else:
        curve = {int(k): float(v) for k, v in (item.split(":") for item in args.curve)}
    records = [r for r in read_dataset(args.data) if r.get("mode") == args.mode][: args.max_records]
    survival, positions = acceptance_by_match(records, args.max_ngram)
    default = LookupConfig()
    rows, best_total, default_total, total = [], 0.0, 0.0, 0
    for n, curve_n in survival.items():
        worths = [step_worth(curve_n, length, curve) for length in range(0, min(MAX_LENGTH, max(curve)) )]
        best = int(np.argmax(worths))
        chosen = default.cap(n) if n <= default.max_ngram else default.max_tokens
        rows.append({"n": n, "positions": positions[n], "p_right": [round(p, 4) for p in curve_n],
                     "best_length": best, "best_worth": worths[best], "default_length": chosen,
                     "default_worth": worths[min(chosen, len(worths) - 1)]})
        best_total += positions[n] * worths[best]
        default_total += positions[n] * worths[min(chosen, len(worths) - 1)]
        total += positions[n]
    report = {"machine": machine_info(), "mode": args.mode, "records": len(records), "positions": dict(positions), "cost_curve": curve,
              "by_match_length": rows, "default_lengths_efficiency": default_total / best_total if best_total else 0.0,
              "no_match_share": positions[0] / (total + positions[0]) if total else 1.0}
    for row in rows:
        print(f"n={row['n']}: {row['positions']} positions, P(>=1..4 right) {row['p_right'][:4]}, best length "
              f"{row['best_length']} (worth {row['best_worth']:.2f}), default {row['default_length']} ({row['default_worth']:.2f})")
    print(f"default lengths reach {report['default_lengths_efficiency']:.1%} of the per-n best for this curve; "
          f"no match at {report['no_match_share']:.0%} of positions")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
