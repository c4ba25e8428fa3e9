"""The default `generate` path against plain autoregressive decoding, per dataset, in one run.

For the first N prompts of each evaluation file, every method decodes the same prompt in turn
(interleaved, so a slow phase of a shared machine hits them alike), through the default verifier
backend with the default model and the shipped drafter and policy:

    autoregressive   block size 1, prompt lookup off: the baseline of every speed-up
    default          what `blockpilot generate PROMPT` does: the policy picks the block size, lookup on,
                     and a step drops its draft where drafts do not pay on this engine (the speed gate)
    default_ungated  the same without the speed gate: every step drafts as the policy and lookup allow
    default_no_corpus  `default` without prompt lookup's corpus n-grams (the shipped table): lookup
                     copies from the request's own text only, as before the table shipped
    lookup_off       the policy's block size, DFlash drafts only
    lookup_only      block size 1 with lookup on: prompt-lookup drafts, no drafter pass

Per prompt: decode tokens/s (prefill excluded, reported apart as TTFT), τ, accepted tokens by
source, the block size chosen, and at temperature 0 whether the output equals the autoregressive
one (lossless). Summaries per dataset and overall: the median of per-prompt speed-ups over
autoregressive, τ, each source's share of the accepted tokens, the policy's block sizes. At
temperature > 0 each method gets the same seed (outputs differ by design; the law is what the
chi-square tests prove).

    .venv/bin/python benchmarks/default_path.py ../shared/datasets --prompts-per-dataset 20 --out runs/default_path.json

--precisions fp32 int4 runs every method at each precision of the onnxruntime backend (one engine per
precision, interleaved per prompt): each precision's speed-ups are over its own autoregressive
decoding (lossless: equal to it), and `vs_first_autoregressive` compares with the first precision's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from blockpilot.backends import DEFAULT_PRECISION, DEFAULT_VERIFIER_BACKEND, PRECISION_CHOICES
from blockpilot.backends.loader import BackendOptions
from blockpilot.benchmarking import machine_info, read_jsonl_prompts
from blockpilot.decoding.lookup import LOOKUP_OFF, lookup_for
from blockpilot.decoding.speculative import SamplingParams
from blockpilot.policy.in_process import InProcessPolicy
from blockpilot.runtime import load_engine, set_threads

METHODS = ("autoregressive", "default", "default_ungated", "default_no_corpus", "lookup_off", "lookup_only")
BASELINE = "autoregressive"


def run_method(engine, policy: InProcessPolicy, method: str, prompt_ids, params: SamplingParams, gate) -> dict:
    if method in ("autoregressive", "lookup_off"):
        lookup = LOOKUP_OFF
    else:  # the corpus n-grams the engine loaded (the shipped table for the default target), but one method
        lookup = lookup_for(engine.decoder.target, None if method == "default_no_corpus" else engine.corpus)
    if method in ("default", "default_ungated", "default_no_corpus", "lookup_off"):
        block_size = policy.hook(engine.default_block_size, engine.decoder.max_block_size)
    else:
        block_size = 1
    result = engine.decoder.generate(prompt_ids, params, block_size, lookup=lookup,
                                     gate=gate if method in ("default", "default_no_corpus") else None)
    return {"token_ids": result.token_ids, "block_size": result.block_size, "tau": result.tau,
            "decode_s": result.decode_s, "decode_tokens_per_s": result.decode_tokens_per_s, "ttft_s": result.ttft_s,
            "steps": len(result.acceptance_lengths), "accepted_by_source": dict(result.accepted_by_source),
            "drafter_passes_skipped": result.drafter_passes_skipped, "capped_steps": result.capped_steps,
            "fallback_reason": (policy.decision.fallback_reason if method in ("default", "default_ungated", "default_no_corpus", "lookup_off")
                                and policy.decision else "")
            or result.fallback_reason}


def summarize(rows: list[dict], methods: list[str], temperature: float, precision: str, first: str) -> dict:
    out = {"prompts": len(rows), "methods": {}}
    for method in methods:
        runs = [r["runs"][precision][method] for r in rows]
        speedups = [r["runs"][precision][method]["decode_tokens_per_s"] / r["runs"][precision][BASELINE]["decode_tokens_per_s"]
                    for r in rows if r["runs"][precision][BASELINE]["decode_tokens_per_s"] > 0]
        versus_first = [r["runs"][precision][method]["decode_tokens_per_s"] / r["runs"][first][BASELINE]["decode_tokens_per_s"]
                        for r in rows if r["runs"][first][BASELINE]["decode_tokens_per_s"] > 0]
        accepted = Counter()
        for run in runs:
            accepted.update(run["accepted_by_source"])
        total_accepted = sum(accepted.values())
        entry = {
            "median_speedup": statistics.median(speedups) if speedups else 0.0,
            "median_vs_first_autoregressive": statistics.median(versus_first) if versus_first else 0.0,
            "min_speedup": min(speedups) if speedups else 0.0,
            "mean_tau": statistics.fmean(r["tau"] for r in runs if r["steps"]) if any(r["steps"] for r in runs) else 0.0,
            "decode_tokens_per_s": sum(len(r["token_ids"]) - 1 for r in runs) / sum(r["decode_s"] for r in runs),
            "accepted_share": {k: v / total_accepted for k, v in accepted.items()} if total_accepted else {},
            "accepted_by_source": dict(accepted),
            "block_sizes": dict(Counter(str(r["block_size"]) for r in runs)),
            "drafter_passes_skipped": sum(r["drafter_passes_skipped"] for r in runs),
            "capped_steps": sum(r["capped_steps"] for r in runs),
            "steps": sum(r["steps"] for r in runs),
        }
        if temperature == 0:
            entry["lossless"] = sum(r["runs"][precision][method]["token_ids"] == r["runs"][precision][BASELINE]["token_ids"] for r in rows)
        out["methods"][method] = entry
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("datasets", type=Path, help="folder of evaluation *.jsonl files ({id, dataset, turns})")
    parser.add_argument("--prompts-per-dataset", type=int, default=20, help="first N prompts of each file")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                        help="methods to run (autoregressive always runs: it is the baseline)")
    parser.add_argument("--sampled-methods", nargs="+", choices=METHODS, default=None,
                        help="methods at temperature > 0 (default: the same as --methods)")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of every request at temperature > 0")
    parser.add_argument("--precisions", nargs="+", choices=PRECISION_CHOICES, default=[DEFAULT_PRECISION],
                        help=f"onnxruntime precisions to run (default: {DEFAULT_PRECISION}, the default path's)")
    parser.add_argument("--out", type=Path, required=True, help="JSON report")
    args = parser.parse_args(argv)

    set_threads(args.threads)
    engines = {}
    for precision in args.precisions:  # keyed by the precision each runs ('auto' resolved)
        each = load_engine(None, None, backend=BackendOptions(name=DEFAULT_VERIFIER_BACKEND, precision=precision, threads=args.threads))
        engines[each.precision] = each
    precisions = list(engines)
    engine = engines[precisions[0]]
    first = precisions[0]
    policy = InProcessPolicy()
    files = sorted(args.datasets.glob("*.jsonl"))
    prompts = [p for f in files for p in read_jsonl_prompts(f, args.prompts_per_dataset)]
    setup = {"machine": machine_info(), "backend": engine.backend, "precisions": precisions, "drafter": engine.drafter_name,
             "policy": ",".join(policy.spec.policy_versions),
             "lookup": {precision: lookup_for(each.decoder.target, each.corpus).describe() for precision, each in engines.items()},
             "max_new_tokens": args.max_new_tokens,
             "prompts_per_dataset": args.prompts_per_dataset, "datasets": [f.stem for f in files],
             "temperatures": args.temperatures, "seed": args.seed}
    print(json.dumps(setup), file=sys.stderr)
    report = {"setup": setup, "runs": {}}
    started = time.perf_counter()
    for temperature in args.temperatures:
        chosen = args.methods if temperature == 0 or args.sampled_methods is None else args.sampled_methods
        methods = [BASELINE] + [m for m in chosen if m != BASELINE]
        rows = []
        # One speed gate per engine, gated method and temperature, learning across prompts as a serving
        # process does (each method's own: a gate's record of lookup drafts depends on the corpus).
        gates = {(precision, m): each.decoder.speed_gate() for precision, each in engines.items() for m in methods}
        for prompt in tqdm(prompts, desc=f"T={temperature:g}", unit="prompt", file=sys.stderr):
            ids = engine.tokenizer.encode_chat([{"role": "user", "content": prompt["text"]}])
            params = SamplingParams(temperature=temperature, max_new_tokens=args.max_new_tokens,
                                    stop_token_ids=engine.tokenizer.stop_token_ids,
                                    seed=args.seed if temperature > 0 else None)
            runs = {precision: {m: run_method(each, policy, m, ids, params, gates[precision, m]) for m in methods}
                    for precision, each in engines.items()}
            rows.append({"id": prompt["id"], "dataset": prompt["dataset"], "prompt_tokens": len(ids), "runs": runs})
        for precision in precisions:
            by_dataset = {}
            for name in dict.fromkeys(r["dataset"] for r in rows):
                by_dataset[name] = summarize([r for r in rows if r["dataset"] == name], methods, temperature, precision, first)
            key = f"T={temperature:g} {precision}"
            report["runs"][key] = {"precision": precision, "overall": summarize(rows, methods, temperature, precision, first),
                                   "datasets": by_dataset}
        report.setdefault("prompts", {})[f"T={temperature:g}"] = rows
    report["seconds"] = time.perf_counter() - started
    policy.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for key, block in report["runs"].items():
        print(f"\n{key}: median per-prompt speed-up over autoregressive (min), mean τ, accepted share lookup/dflash")
        for name, summary in [*block["datasets"].items(), ("ALL", block["overall"])]:
            cells = []
            for method, m in summary["methods"].items():
                if method == BASELINE:
                    cells.append(f"AR {m['decode_tokens_per_s']:.1f} tok/s ({m['median_vs_first_autoregressive']:.2f}x {first} AR)")
                    continue
                share = m["accepted_share"]
                lossless = f" lossless {m['lossless']}/{summary['prompts']}" if "lossless" in m else ""
                cells.append(f"{method} {m['median_speedup']:.2f}x ({m['min_speedup']:.2f}) τ {m['mean_tau']:.2f} "
                             f"{share.get('lookup', 0):.0%}/{share.get('dflash', 0):.0%}{lossless}")
            print(f"  {name:12s} " + " | ".join(cells))
    print(f"\nwrote {args.out} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
