"""`blockpilot policy sweep | train | eval` (registered by blockpilot.cli).

    blockpilot policy sweep --prompts ../shared/datasets/train --prompts-per-file 150 \
        --exclude-ids-from data/drafter/responses --out runs/policy/sweep-train
    blockpilot policy train --sweep runs/policy/sweep-train --repository policies --name blockpilot
    blockpilot policy eval --policy policies/blockpilot/5 --prompts ../shared/datasets --prompts-per-file 30 \
        --cost-model runs/policy/sweep-train --sweep runs/policy/sweep-eval --out runs/policy/eval

Each handler returns the exit status and prints one JSON summary line on stdout; progress goes to
stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from blockpilot.backends import CPU_BACKENDS, DEFAULT_VERIFIER_BACKEND
from blockpilot.cli_args import OneLineParser, fraction, non_negative_int, positive_float, positive_int
from blockpilot.errors import InvalidArgumentError
from blockpilot.policy.metadata import FEATURE_KINDS, LABEL_RULES


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=None, help="'default' (SmolLM2-135M-Instruct), a Hugging Face directory or a .gguf file")
    parser.add_argument("--drafter", default=None, help="DFlash checkpoint directory or 'random' (default: the shipped drafter of the default target)")
    parser.add_argument("--random-drafter-block-size", type=positive_int, default=8, help="trained block size of --drafter random")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--backend", choices=CPU_BACKENDS, default=DEFAULT_VERIFIER_BACKEND,
                        help="backend timed by the cost model and run by decode mode (default: the default verifier "
                             "backend, onnxruntime); replay's features come from the torch engine either way")


def _add_sweep_args(parser: argparse.ArgumentParser, *, prompts_required: bool) -> None:
    parser.add_argument("--prompts", type=Path, nargs="+", required=prompts_required, default=None,
                        help="*.jsonl prompt files or folders of them ({id, dataset, turns}); the first turn is used")
    parser.add_argument("--prompts-per-file", type=positive_int, default=200, help="fixed-seed random sample of each file")
    parser.add_argument("--exclude-ids-from", type=Path, nargs="+", default=None, metavar="PATH",
                        help="leave out prompts whose id appears in these JSONL files or drafter data folders (e.g. the drafter training data, "
                             "data/drafter/responses: the drafter accepts more on prompts it was trained on)")
    parser.add_argument("--limit", type=positive_int, default=None, help="at most this many prompts in all (interleaved across files)")
    parser.add_argument("--mode", choices=("replay", "decode"), default="replay",
                        help="replay: one greedy generation + teacher-forced replay per size, cost-modelled tokens/s (default); "
                             "decode: real decoding at every size, measured tokens/s")
    parser.add_argument("--candidates", type=positive_int, nargs="+", default=None,
                        help="block sizes the policy chooses from (default: the drafter's trained size ± --radius, >= 2)")
    parser.add_argument("--radius", type=non_negative_int, default=3)
    parser.add_argument("--prompt-lookup", choices=("on", "off"), default="on",
                        help="decode every size with prompt-lookup drafts as the verifier does by default (block size 1 "
                             "then = lookup drafts only; the autoregressive baseline is recorded apart); default: on")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128)
    parser.add_argument("--max-prompt-tokens", type=positive_int, default=384, help="longer prompts are skipped")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="prompts generated together (replay mode)")
    parser.add_argument("--cost-repeats", type=positive_int, default=10, help="timed runs per size in the cost model (replay mode)")
    parser.add_argument("--cost-model", type=Path, default=None,
                        help="replay mode: reuse the cost model of this sweep folder (or JSON file) instead of measuring one")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-file prompt sample")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_args(parser)


def add_parsers(sub) -> None:
    """Adds `policy` and its subcommands to the top-level parser."""
    policy = sub.add_parser("policy", help="the BlockPilot block-size policy: sweep, train, eval")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, parser_class=OneLineParser)

    sweep = policy_sub.add_parser("sweep", help="τ, steps and decode tokens/s of each prompt at every block size (resumable)")
    _add_sweep_args(sweep, prompts_required=True)
    sweep.add_argument("--out", type=Path, required=True, help="sweep folder (created, or resumed when it exists)")
    sweep.set_defaults(handler=_sweep)

    train = policy_sub.add_parser("train", help="train the block-size predictor on a sweep and publish it as ONNX")
    train.add_argument("--sweep", type=Path, required=True, help="a `policy sweep` folder of training prompts")
    train.add_argument("--repository", type=Path, required=True, help="policy repository: <repository>/<name>/<version>/")
    train.add_argument("--name", required=True, help="policy name (a folder name)")
    train.add_argument("--version", type=positive_int, default=None, help="default: the next free version")
    train.add_argument("--label-rule", choices=LABEL_RULES, default="max_tau")
    train.add_argument("--feature-kinds", choices=FEATURE_KINDS, nargs="+", default=list(FEATURE_KINDS),
                       help="feature kinds to try (model selection picks one)")
    train.add_argument("--widths", type=positive_int, nargs="+", default=[64, 256], help="MLP widths to try")
    train.add_argument("--ranks", type=non_negative_int, nargs="+", default=[32],
                       help="last_logits: learned projection ranks to try (0 = distribution statistics only)")
    train.add_argument("--top-k", type=non_negative_int, default=32, help="last_logits: top-k log-probabilities in the statistics (0 = none)")
    train.add_argument("--epochs", type=positive_int, default=150)
    train.add_argument("--lr", type=positive_float, default=1e-3)
    train.add_argument("--dropout", type=float, default=0.2)
    train.add_argument("--weight-decay", type=float, default=1e-2)
    train.add_argument("--batch-size", type=positive_int, default=64)
    train.add_argument("--holdout", type=fraction, default=0.2, help="share of prompts held out (per dataset)")
    train.add_argument("--folds", type=positive_int, default=4, help="cross-validation folds of the model selection")
    train.add_argument("--max-size-mb", type=positive_float, default=10.0, help="largest model.onnx allowed (MB)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=positive_int, default=None)
    train.add_argument("--quiet", action="store_true", help="no per-configuration lines on stderr")
    train.set_defaults(handler=_train)

    evaluate = policy_sub.add_parser("eval", help="a policy vs fixed block sizes and the oracle on evaluation prompts")
    evaluate.add_argument("--policy", type=Path, required=True, help="a published version folder <repository>/<name>/<version>")
    evaluate.add_argument("--sweep", type=Path, required=True,
                          help="sweep folder of evaluation prompts (with --prompts: created or resumed first)")
    evaluate.add_argument("--out", type=Path, required=True, help="folder for report.md, report.json and the PNG plots")
    evaluate.add_argument("--allow-model-mismatch", action="store_true",
                          help="compare even if the sweep ran another target/drafter than the policy was trained for")
    _add_sweep_args(evaluate, prompts_required=False)
    evaluate.set_defaults(handler=_eval)


def _load_models(args: argparse.Namespace):
    from blockpilot.backends.loader import BackendOptions
    from blockpilot.policy.features import model_fingerprint
    from blockpilot.policy.sweep import SweepModels
    from blockpilot.runtime import load_engine, set_threads

    set_threads(args.threads)
    engine = load_engine(args.target, args.drafter, random_drafter_block_size=args.random_drafter_block_size,
                         backend=BackendOptions(name=args.backend, threads=args.threads))
    if engine.drafter is None:
        raise InvalidArgumentError("a sweep needs a drafter: pass --drafter PATH (a DFlash checkpoint) or --drafter random")
    module = getattr(engine.drafter, "source", None)  # the checkpoint's weights, whatever precision drafts
    # A checkpoint path keeps its last two parts ("runB/drafter"); names ("random") stay as they are.
    drafter_label = "/".join(Path(engine.drafter_name).parts[-2:]) or engine.drafter_name
    drafter_name = model_fingerprint(drafter_label, module) if module is not None else engine.drafter_name
    return SweepModels(engine.target, engine.drafter, engine.tokenizer, model_fingerprint(engine.target_dir.name, engine.target),
                       drafter_name, verifier=engine.verifier_target)


def _run_sweep(args: argparse.Namespace, out: Path, candidates=None) -> dict:
    from blockpilot.decoding.lookup import LOOKUP_OFF, lookup_for
    from blockpilot.policy.sweep import SweepConfig, default_candidates, read_cost_model, read_ids, run_sweep, select_prompts

    # Everything that can fail fast does so before the models load (tens of seconds).
    cost = read_cost_model(args.cost_model) if args.cost_model is not None else None
    excluded = read_ids(args.exclude_ids_from) if args.exclude_ids_from else set()
    prompts = select_prompts(args.prompts, args.prompts_per_file, args.seed, excluded)
    if not prompts:
        raise InvalidArgumentError("no prompt left to sweep (all excluded?)")
    models = _load_models(args)
    if args.limit is not None:
        prompts = prompts[: args.limit]
    chosen = tuple(sorted(set(args.candidates))) if args.candidates else candidates or default_candidates(models.drafter.block_size, args.radius)
    cfg = SweepConfig(candidates=chosen, mode=args.mode, max_new_tokens=args.max_new_tokens,
                      max_prompt_tokens=args.max_prompt_tokens, batch_size=args.batch_size, cost_repeats=args.cost_repeats,
                      lookup=lookup_for(models.verifier or models.target) if args.prompt_lookup == "on" else LOOKUP_OFF)
    logging.getLogger("blockpilot").setLevel(logging.INFO)
    return run_sweep(models, prompts, out, cfg, cost_model=cost, progress=not args.no_progress)


def _sweep(args: argparse.Namespace) -> int:
    summary = _run_sweep(args, args.out)
    print(json.dumps({"sweep": str(args.out), **summary}))
    return 0


def _train(args: argparse.Namespace) -> int:
    from blockpilot.policy.predictor import PredictorConfig
    from blockpilot.policy.trainer import TrainPolicyConfig, train_policy
    from blockpilot.runtime import set_threads

    set_threads(args.threads)
    base = PredictorConfig("final_hidden", top_k=args.top_k, dropout=args.dropout, epochs=args.epochs,
                           batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed)
    cfg = TrainPolicyConfig(name=args.name, version=args.version, label_rule=args.label_rule,
                            feature_kinds=tuple(dict.fromkeys(args.feature_kinds)), widths=tuple(dict.fromkeys(args.widths)),
                            ranks=tuple(dict.fromkeys(args.ranks)), holdout_fraction=args.holdout, folds=args.folds,
                            seed=args.seed, max_bytes=int(args.max_size_mb * 1_000_000), base=base)
    summary = train_policy(args.sweep, args.repository, cfg, progress=not args.quiet)
    print(json.dumps(summary))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from blockpilot.policy.evaluate import evaluate_policy, write_report
    from blockpilot.policy.onnx_policy import OnnxPolicy
    from blockpilot.policy.sweep import load_sweep

    policy = OnnxPolicy.load(args.policy)
    swept = None
    if args.prompts:
        swept = _run_sweep(args, args.sweep, candidates=policy.metadata.candidates)
    report = evaluate_policy(policy, load_sweep(args.sweep), allow_model_mismatch=args.allow_model_mismatch)
    files = write_report(report, args.out)
    overall = report["overall"]["methods"]
    print(json.dumps({"policy": report["policy"], "prompts": report["overall"]["prompts"],
                      "tau": {m: round(v["tau"], 3) for m, v in overall.items()},
                      "speedup": {m: round(v["speedup"], 3) for m, v in overall.items()},
                      "files": {k: str(v) for k, v in files.items()}, **({"sweep": swept} if swept else {})}))
    return 0
