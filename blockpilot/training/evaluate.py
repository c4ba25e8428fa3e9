"""`blockpilot drafter eval`: τ per dataset and block size on evaluation prompts.

Per prompt:
1. the target's greedy continuation, decoded autoregressively through the engine (block size 1):
   the baseline's decode tokens/s, and the reference output;
2. greedy τ at every swept block size, by replaying the loop over the recorded continuation
   (decoding.replay: at T=0 the loop commits exactly that continuation, so a draft token is
   accepted iff it equals the recorded token; this costs drafter passes only);
3. real greedy decodes, each with its decode tokens/s (speed-up over step 1, same run), its τ and
   a check that its output equals step 1's: "dflash" (the drafter alone at the measured block
   size, default the drafter's own) and, with lookup on, "dflash+lookup" (the same with prompt
   lookup drafts, as `generate` runs) and "lookup" (block size 1: lookup drafts alone);
4. at T=1, real decodes with DFlash's sample-and-match rule and with a sampled draft + min(1, p/q).

The drafter runs at the precision the engine gives it beside this target on this machine
(`drafter_run_precision`) unless told otherwise, and the prompts render with the chat-template
arguments the verifier would use (the drafter's, EvalConfig's over them), so the replayed τ is the τ
of the drafts the engine would make.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from blockpilot.backends.base import VerifierBackend
from blockpilot.benchmarking import read_jsonl_prompts
from blockpilot.decoding.drafting import LocalDrafter
from blockpilot.decoding.lookup import LOOKUP_OFF, lookup_for
from blockpilot.decoding.replay import replay_greedy
from blockpilot.decoding.speculative import SamplingParams, SpeculativeDecoder
from blockpilot.errors import InvalidArgumentError
from blockpilot.models.drafter import DFlashDrafter
from blockpilot.models.placement import Placement, drafter_run_precision
from blockpilot.models.target import TargetModel
from blockpilot.models.tokenizer import ChatTokenizer
from blockpilot.training.train import FeatureCache


@dataclass(frozen=True)
class EvalConfig:
    datasets: tuple[str, ...] = ("gsm8k", "math500", "humaneval", "mbpp", "mt_bench", "alpaca")
    prompts_per_dataset: int = 20
    max_new_tokens: int = 128
    sweep_radius: int = 4
    block_size: int | None = None  # the real decode's block size; None = the drafter's own
    temperature_runs: bool = True
    lookup: bool = True  # also the "dflash+lookup" and "lookup" real decodes
    drafter_precision: str | None = "auto"  # "auto" = what the engine picks beside the target; None = as loaded
    seed: int = 0
    # Chat-template arguments of the prompts, over those the drafter names (its config's): the
    # prompts render as the verifier renders them.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)


def evaluate_drafter(target: TargetModel, tokenizer: ChatTokenizer, drafter: DFlashDrafter, datasets_dir: Path,
                     cfg: EvalConfig, *, verifier: VerifierBackend | None = None, progress: bool = True) -> dict:
    """verifier: what runs the target in the real decodes (default: the torch engine `target`);
    the replay's teacher-forced features always come from `target`."""
    trained = drafter.block_size
    measured = cfg.block_size or trained
    sizes = [b for b in range(trained - cfg.sweep_radius, trained + cfg.sweep_radius + 1) if b >= 2]
    if cfg.drafter_precision == "auto":
        # As runtime.load_engine: a 16-bit target or a GPU drafts as loaded (in the target's dtype).
        placement = Placement(str(target.dtype).removeprefix("torch."), str(target.device))
        precision = drafter_run_precision(placement, target.device)
    else:
        precision = cfg.drafter_precision
    template_kwargs = {**drafter.config.chat_template_kwargs, **cfg.chat_template_kwargs}
    provider = LocalDrafter(drafter, target, precision=precision)
    verifier = verifier if verifier is not None else target
    autoregressive = SpeculativeDecoder(verifier)
    speculative = SpeculativeDecoder(verifier, provider)
    lookup = lookup_for(verifier)
    decodes = {"dflash": (measured, LOOKUP_OFF)} | ({"dflash+lookup": (measured, lookup), "lookup": (1, lookup)} if cfg.lookup else {})
    features = FeatureCache(target, drafter.target_layer_ids)
    prompts = [p for name in cfg.datasets for p in read_jsonl_prompts(datasets_dir / f"{name}.jsonl", cfg.prompts_per_dataset)]
    rows = []
    for index, prompt in enumerate(tqdm(prompts, desc="eval prompts", disable=not progress, file=sys.stderr)):
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt["text"]}], template_kwargs)
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, stop_token_ids=tokenizer.stop_token_ids)
        ar = autoregressive.generate(ids, params, 1)
        sequence = ids + ar.token_ids
        feats = features.get(index, sequence)
        replay = {b: replay_greedy(provider, sequence, len(ids), feats, b, cfg.max_new_tokens, tokenizer.stop_token_ids).acceptance_lengths
                  for b in sizes}
        row = {
            "id": prompt["id"], "dataset": prompt["dataset"], "prompt_tokens": len(ids), "new_tokens": len(ar.token_ids),
            "replay_tau": {b: _mean(v) for b, v in replay.items()},
            "ar_decode_tokens_per_s": ar.decode_tokens_per_s,
            "ar_decode_s": ar.decode_s, "ar_tokens": sum(ar.acceptance_lengths), "decodes": {},
        }
        for name, (size, lookup_config) in decodes.items():
            spec = speculative.generate(ids, params, size, lookup=lookup_config)
            row["decodes"][name] = {"block_size": size, "tau": spec.tau, "equals_ar": spec.token_ids == ar.token_ids,
                                    "decode_s": spec.decode_s, "tokens": sum(spec.acceptance_lengths)}
        row["best_block_size"] = max(sizes, key=lambda b: (round(row["replay_tau"][b], 9), -b))
        if cfg.temperature_runs:
            for rule in ("greedy", "sample"):
                sampled = speculative.generate(ids, SamplingParams(temperature=1.0, max_new_tokens=cfg.max_new_tokens,
                                                                   stop_token_ids=tokenizer.stop_token_ids,
                                                                   seed=cfg.seed + index, draft_sampling=rule), measured)
                row[f"t1_tau_{'sample_and_match' if rule == 'greedy' else 'min_p_q'}"] = sampled.tau
        rows.append(row)
    return summarize(rows, sizes, trained, measured) | {"drafter_precision": provider.precision,
                                                         "chat_template_kwargs": template_kwargs}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def summarize(rows: list[dict], sizes: list[int], trained: int, measured: int) -> dict:
    by_dataset: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_dataset[row["dataset"]].append(row)

    def decode_summary(group: list[dict], name: str, speed_ar: float) -> dict:
        runs = [r["decodes"][name] for r in group]
        speed = sum(d["tokens"] for d in runs) / sum(d["decode_s"] for d in runs)
        return {"block_size": runs[0]["block_size"], "tau": _mean(d["tau"] for d in runs), "decode_tokens_per_s": speed,
                "speedup": speed / speed_ar, "lossless_prompts": sum(d["equals_ar"] for d in runs)}

    def block(group: list[dict]) -> dict:
        speed_ar = sum(r["ar_tokens"] for r in group) / sum(r["ar_decode_s"] for r in group)
        out = {
            "prompts": len(group),
            "replay_tau": {b: _mean(r["replay_tau"][b] for r in group) for b in sizes},
            "ar_decode_tokens_per_s": speed_ar,
            "decodes": {name: decode_summary(group, name, speed_ar) for name in group[0]["decodes"]},
            "best_block_size_counts": {b: sum(r["best_block_size"] == b for r in group) for b in sizes},
            "share_best_not_trained": _mean(r["best_block_size"] != trained for r in group),
            "oracle_replay_tau": _mean(r["replay_tau"][r["best_block_size"]] for r in group),
        }
        for key in ("t1_tau_sample_and_match", "t1_tau_min_p_q"):
            if key in group[0]:
                out[key] = _mean(r[key] for r in group)
        return out

    return {"trained_block_size": trained, "measured_block_size": measured, "sweep": sizes,
            "datasets": {name: block(group) for name, group in by_dataset.items()}, "overall": block(rows), "prompts": rows}


def merge_reports(reports: list[dict]) -> dict:
    """One report from the reports of shards (e.g. datasets split over processes, one per core):
    the same drafter, backend and block sizes, disjoint prompts; summarized as if run at once."""
    if not reports:
        raise InvalidArgumentError("nothing to merge")
    # The run's settings: kept in the merged report.
    settings = ("drafter", "backend", "drafter_precision", "dtype", "device", "chat_template_kwargs")
    keys = ("trained_block_size", "measured_block_size", "sweep", *settings)
    first = reports[0]
    for report in reports[1:]:
        differing = [k for k in keys if report.get(k) != first.get(k)]
        if differing:
            raise InvalidArgumentError(f"cannot merge eval reports that differ in {', '.join(differing)}")
    rows = []
    for report in reports:
        for row in report["prompts"]:
            # JSON turned the block-size keys into strings.
            rows.append({**row, "replay_tau": {int(b): v for b, v in row["replay_tau"].items()}})
    ids = [(r["dataset"], r["id"]) for r in rows]
    if len(set(ids)) != len(ids):
        raise InvalidArgumentError("the eval reports share prompts: merge shards of disjoint datasets or prompts")
    merged = summarize(rows, first["sweep"], first["trained_block_size"], first["measured_block_size"])
    return merged | {k: first[k] for k in settings if k in first}


def format_table(report: dict) -> str:
    """Replayed τ per block size, then per real decode: τ, speed-up over block size 1, lossless."""
    sizes = report["sweep"]
    decodes = list(report["overall"]["decodes"])
    head = (["dataset", "n"] + [f"B={b}" for b in sizes] + ["oracle", "not-B*"]
            + [f"{name} B={report['overall']['decodes'][name]['block_size']} {what}" for name in decodes for what in ("τ", "speed-up", "lossless")]
            + ["T1 s&m", "T1 p/q"])
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for name, d in list(report["datasets"].items()) + [("ALL", report["overall"])]:
        cells = [name, str(d["prompts"])] + [f"{d['replay_tau'][b]:.2f}" for b in sizes]
        cells += [f"{d['oracle_replay_tau']:.2f}", f"{d['share_best_not_trained']:.0%}"]
        for decode in decodes:
            run = d["decodes"][decode]
            cells += [f"{run['tau']:.2f}", f"{run['speedup']:.2f}x", f"{run['lossless_prompts']}/{d['prompts']}"]
        cells += [f"{d[key]:.2f}" if key in d else "-" for key in ("t1_tau_sample_and_match", "t1_tau_min_p_q")]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def write_report(report: dict, out: Path | None) -> None:
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")

