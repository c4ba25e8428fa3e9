"""`blockpilot` command line.

Contract of `blockpilot generate` (benchmarks and later services rely on it; extend, do not break):
    blockpilot generate [--target NAME_OR_PATH] [--drafter PATH|ORG/NAME|random|none] [--block-size N|auto]
                        [--prompt-lookup on|off] [--temperature T] [--top-k K] [--top-p P] [--max-new-tokens N]
                        [--seed S] [--raw]
                        [--json] PROMPT
    (also: --policy/--policies with --block-size auto, --backend/--onnx, --dtype (every backend), --device
    (--backend torch), --server HOST:PORT)
`--json` prints exactly one JSON object on stdout. Bad arguments exit with status 2 and one line
on stderr; no traceback reaches the user for an expected failure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from blockpilot.backends import BACKENDS, CPU_BACKENDS, DEFAULT_PRECISION, DEFAULT_VERIFIER_BACKEND, PRECISION_CHOICES, TORCH
from blockpilot.cli_args import (AUTO, EXIT_FAILURE, EXIT_USAGE, OneLineParser, add_client_security_args, block_size_arg,
                                 client_security, json_object, non_negative_int, positive_int, temperature, top_p)
from blockpilot.errors import BlockPilotError, FailedPreconditionError, InvalidArgumentError
from blockpilot.models.placement import DEFAULT_DEVICE, DEFAULT_DTYPE, DTYPE_NAMES, Placement, check_backend_placement

# Command groups kept beside their code: each module's add_parsers(sub) adds its subcommands and
# sets `handler` (args -> exit status) on them with set_defaults.
COMMAND_GROUPS = ("blockpilot.backends.cli", "blockpilot.policy.cli", "blockpilot.policy.ab_cli", "blockpilot.bench_cli")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="blockpilot", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    gen = sub.add_parser("generate", help="generate a reply with speculative decoding (in-process)")
    gen.add_argument("prompt", metavar="PROMPT", help="one user message (wrapped in the chat template unless --raw)")
    gen.add_argument("--target", default=None, help="'default' (SmolLM2-135M-Instruct), a Hugging Face model directory, a .gguf file, "
                                                    "or a Hugging Face repository id such as Qwen/Qwen3-4B (from the Hugging Face "
                                                    "cache, downloaded into it unless HF_HUB_OFFLINE=1)")
    gen.add_argument("--drafter", default=None, help="DFlash checkpoint directory or Hugging Face repository id (e.g. "
                                                     "z-lab/Qwen3-4B-DFlash-b16), 'random' (untrained, for testing) or 'none'; "
                                                     "default: the shipped drafter of the default target")
    gen.add_argument("--block-size", type=block_size_arg, default=AUTO,
                     help="DFlash block: tokens per verify step of a drafter draft; 1 = no drafter pass (with "
                          "--prompt-lookup off: plain autoregressive decoding); 'auto' (default) = the block-size "
                          "policy decides from the prefill")
    gen.add_argument("--prompt-lookup", choices=("on", "off"), default="on",
                     help="verify a copy of what followed an earlier occurrence of the last tokens (prompt + output) "
                          "when there is one, instead of a drafter pass (default: on)")
    gen.add_argument("--lookup-corpus", default="auto",
                     help="where the text has no match of 2+ tokens, prompt lookup proposes the target's habits "
                          "from corpus n-grams: 'auto' (the shipped table, for the default target's weights only), "
                          "'none', or a table folder (`blockpilot drafter corpus`)")
    gen.add_argument("--policy", default="", help="with --block-size auto (the default): the policy to ask ('' = the shipped policy, a learned "
                                                  "policy's name, 'default' or 'fixed-<n>'; with --server also an experiment)")
    gen.add_argument("--policies", type=Path, default=None, help="with --block-size auto: policy repository folder (default: the shipped policies/)")
    gen.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=non_negative_int, default=0,
                     help="at temperature > 0: sample from the K most likely tokens only (default 0 = off)")
    gen.add_argument("--top-p", type=top_p, default=1.0,
                     help="at temperature > 0: sample from the most likely tokens holding P of the mass (default 1 = off)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=128)
    gen.add_argument("--seed", type=int, default=None, help="seed of the request's random stream (temperature > 0)")
    gen.add_argument("--draft-sampling", choices=("greedy", "sample"), default="greedy",
                     help="at temperature > 0: 'greedy' drafts + sample-and-match (DFlash), 'sample' drafts + min(1, p/q)")
    gen.add_argument("--raw", action="store_true", help="send PROMPT as plain text, without the chat template")
    gen.add_argument("--chat-template-kwargs", type=json_object, default=None, metavar="JSON",
                     help='extra chat-template arguments, e.g. \'{"enable_thinking": false}\' for Qwen3, over those the '
                          "drafter's config.json names (not with --raw)")
    gen.add_argument("--logprobs", action="store_true",
                     help="report each token's log-probability under the target's raw distribution (in --json, else on stderr)")
    gen.add_argument("--json", action="store_true", help="print one JSON object with the tokens and statistics")
    gen.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    gen.add_argument("--backend", choices=BACKENDS, default=None,
                     help="verifier backend: ONNX Runtime (default; exports the target once into $BLOCKPILOT_CACHE/onnx), "
                          "the torch engine (no export), or TensorRT (GPU, gpu extra)")
    gen.add_argument("--onnx", type=Path, default=None,
                     help="ONNX export folder for --backend onnxruntime/tensorrt (default: export on demand into $BLOCKPILOT_CACHE/onnx)")
    gen.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                     help="onnxruntime on the CPU: 'int4' runs the GGUF's own 4-bit codes, 'fp32' the de-quantized weights; "
                          "'auto' (default): int4 for a target converted from a GGUF of Q4_1/Q8_0 codes (the default model), "
                          "else fp32 (with --onnx: the export's)")
    gen.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                     help=f"precision of the target's and the drafter's weights and KV caches (default {DEFAULT_DTYPE}); "
                          f"output equals the same dtype's own --block-size 1 output. --backend onnxruntime / tensorrt "
                          f"run an export of this dtype (ONNX Runtime on the CPU: float32 or float16)")
    gen.add_argument("--device", default=None,
                     help=f"with --backend torch: 'cpu', 'cuda' or 'cuda:N', where the target, the drafter and their "
                          f"caches live (default {DEFAULT_DEVICE})")
    gen.add_argument("--server", metavar="HOST:PORT", default=None,
                     help="generate through a verifier service (e.g. 127.0.0.1:50051) instead of in-process")
    gen.add_argument("--timeout", type=float, default=600.0, help="with --server: deadline of the request in seconds")
    add_client_security_args(gen)
    _add_stack_parsers(sub)

    prep = sub.add_parser("prepare", help="make the default model ready: de-quantize it once into the cache, and export it "
                                          "to ONNX for the default verifier backend")
    prep.add_argument("--target", default=None)
    prep.add_argument("--drafter", default=None,
                      help="also fetch this drafter (a Hugging Face repository id, or a checkpoint directory to check); "
                           "the export then returns the target layers it reads ('', 'none', 'random': nothing to fetch)")
    prep.add_argument("--backend", choices=CPU_BACKENDS, default=DEFAULT_VERIFIER_BACKEND,
                      help="the verifier backend to prepare for (default: onnxruntime, which needs the export; torch needs none)")
    prep.add_argument("--precision", choices=PRECISION_CHOICES, default=DEFAULT_PRECISION,
                      help=f"the onnxruntime precision to export for (default: {DEFAULT_PRECISION}, as generate and the verifier run)")
    prep.add_argument("--dtype", choices=DTYPE_NAMES, default=DEFAULT_DTYPE,
                      help=f"the dtype the verifier runs (its config 'dtype', default {DEFAULT_DTYPE}): onnxruntime runs an export "
                           f"of that dtype (on the CPU: float32 or float16); the torch backend needs nothing per dtype")

    drafter = sub.add_parser("drafter", help="make, train and evaluate DFlash drafters")
    drafter_sub = drafter.add_subparsers(dest="drafter_command", required=True, parser_class=OneLineParser)
    data = drafter_sub.add_parser("data", help="the target's own responses to training prompts (resumable)")
    data.add_argument("--prompts", type=Path, nargs="+", required=True, help="training *.jsonl files or folders of them (never evaluation sets)")
    data.add_argument("--out", type=Path, required=True, help="data folder of binary shards (created; rerun to resume or grow)")
    data.add_argument("--target", default=None)
    data.add_argument("--prompts-per-file", type=positive_int, default=None,
                      help="prompts taken from each file, a fixed-seed shuffle (default: all; a larger number later grows the same sample)")
    data.add_argument("--sample-fraction", type=float, default=0.5, help="share of prompts also answered at temperature 1")
    data.add_argument("--max-new-tokens", type=positive_int, default=192)
    data.add_argument("--batch-size", type=positive_int, default=32, help="rows of the refilling batch")
    data.add_argument("--refill-min", type=positive_int, default=4, help="free rows that trigger a refill from the prompt queue")
    data.add_argument("--shard-records", type=positive_int, default=256, help="records per shard written")
    data.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                      help="auto: bf16 where the CPU has native BF16 instructions (AVX512_BF16 / AMX), else fp32")
    data.add_argument("--max-jobs", type=positive_int, default=None, help="stop after this many responses (default: all)")
    data.add_argument("--import-jsonl", type=Path, default=None, metavar="JSONL",
                      help="generate nothing: move the records of a JSONL file of the earlier format into --out")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--threads", type=positive_int, default=None)

    train = drafter_sub.add_parser("train", help="train a DFlash drafter on a `drafter data` file (resumable)")
    train.add_argument("--data", type=Path, required=True, help="data folder written by `blockpilot drafter data` (or a JSONL file of the earlier format)")
    train.add_argument("--out", type=Path, required=True, help="run folder: drafter/ (DFlash format), state.pt, history.json")
    train.add_argument("--data-tokens", type=positive_int, default=None,
                       help="train on the first records holding this many response tokens (learning curves; default: all)")
    train.add_argument("--target", default=None)
    train.add_argument("--steps", type=positive_int, default=2000)
    train.add_argument("--layers", type=positive_int, default=1, help="draft layers")
    train.add_argument("--target-layers", type=int, nargs="+", default=None, help="target layer ids (default: DFlash's rule)")
    train.add_argument("--block-size", type=positive_int, default=8)
    train.add_argument("--gamma", type=float, default=4.0, help="loss decay exp(-(k-1)/gamma)")
    train.add_argument("--accept-until-fail", type=float, default=0.0, metavar="W",
                       help="mix weight of the accept-until-fail loss (0 = off, 1 = only it)")
    train.add_argument("--accept-until-fail-after", type=int, default=0, metavar="STEPS", help="warm-up steps before it applies")
    train.add_argument("--distill", type=float, default=0.0, metavar="W",
                       help="0 = labels are the recorded response tokens; W in (0, 1]: labels are the target's argmax and the "
                            "loss mixes in W x cross-entropy against the target's top-k distribution (computed with the features)")
    train.add_argument("--teacher-top-k", type=positive_int, default=32, metavar="K", help="target logits kept per position for --distill")
    train.add_argument("--features-on-demand", action="store_true",
                       help="compute each sequence's features when training first draws it, instead of all before step 1 "
                            "(cheaper when the run sees only part of the data)")
    train.add_argument("--lr", type=float, default=6e-4)
    train.add_argument("--anchors", type=positive_int, default=32, help="anchors per sequence")
    train.add_argument("--sequences", type=positive_int, default=4, help="sequences per optimizer step")
    train.add_argument("--mask-token-id", type=int, default=None, help="default: the tokenizer's <empty_output> or the last special token")
    train.add_argument("--eval-every", type=positive_int, default=200)
    train.add_argument("--save-every", type=positive_int, default=100)
    train.add_argument("--init-from", type=Path, default=None, help="start from this drafter checkpoint")
    train.add_argument("--holdout-ids", type=Path, default=None,
                       help="JSON list of prompt ids to hold out (e.g. the holdout_ids.json of the run --init-from continues); "
                            "default: a seeded 5%% of the ids")
    train.add_argument("--feature-dir", type=Path, default=None, help="persistent store of target features shared by runs (default: in memory only)")
    train.add_argument("--feature-layers", type=int, nargs="+", default=None, help="target layers to store (a superset of --target-layers; lets runs share a store)")
    train.add_argument("--feature-precision", choices=("auto", "fp32", "bf16"), default="fp32",
                       help="precision of the target pass that computes the features: bf16 is ~2.5x faster where the "
                            "CPU has native BF16 (auto picks it there) and rounds them by ~4e-3 (default fp32)")
    train.add_argument("--draft-vocab-size", type=positive_int, default=8192,
                       help="the most frequent response tokens that form the draft vocabulary (from scratch only)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=positive_int, default=None)

    corpus = drafter_sub.add_parser("corpus", help="corpus n-grams of the target's own responses, for prompt lookup")
    corpus.add_argument("--data", type=Path, required=True, help="a `drafter data` folder (its greedy records are counted)")
    corpus.add_argument("--out", type=Path, required=True, help="table folder (ngrams.npz, corpus.json)")
    corpus.add_argument("--min-count", type=positive_int, default=2, help="fewest occurrences of a trigram kept (default 2)")
    corpus.add_argument("--holdout-share", type=float, default=0.05,
                        help="share of records (by a hash of the id) kept out to measure the tables (default 0.05)")
    corpus.add_argument("--threads", type=positive_int, default=None)
    evaluate = drafter_sub.add_parser("eval", help="τ per dataset and block size on evaluation prompts")
    evaluate.add_argument("--drafter", default=None, help="DFlash checkpoint directory or Hugging Face repository id, e.g. "
                                                          "z-lab/Qwen3-4B-DFlash-b16 (default: the shipped drafter)")
    evaluate.add_argument("--datasets-dir", type=Path, default=None, help="folder with the evaluation *.jsonl files (required unless --merge)")
    evaluate.add_argument("--merge", type=Path, nargs="+", default=None, metavar="REPORT",
                          help="evaluate nothing: merge the JSON reports of runs over disjoint --datasets (one process per core) into one")
    evaluate.add_argument("--datasets", nargs="+", default=["gsm8k", "math500", "humaneval", "mbpp", "mt_bench", "alpaca"])
    evaluate.add_argument("--prompts-per-dataset", type=positive_int, default=20)
    evaluate.add_argument("--max-new-tokens", type=positive_int, default=128)
    evaluate.add_argument("--radius", type=int, default=4, help="sweep block sizes trained ± radius")
    evaluate.add_argument("--block-size", type=positive_int, default=None, help="block size of the real decodes (default: the drafter's)")
    evaluate.add_argument("--no-temperature", action="store_true", help="skip the T=1 runs")
    evaluate.add_argument("--no-lookup", action="store_true",
                          help="skip the real decodes with prompt lookup ('dflash+lookup' at the block size, 'lookup' at 1)")
    evaluate.add_argument("--drafter-precision", choices=("auto", "loaded", "fp32", "bf16", "int8"), default="auto",
                          help="the drafter's precision (auto: what the engine picks on this machine; loaded: the checkpoint's)")
    evaluate.add_argument("--target", default=None)
    evaluate.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    evaluate.add_argument("--threads", type=positive_int, default=None)
    evaluate.add_argument("--backend", choices=CPU_BACKENDS, default=DEFAULT_VERIFIER_BACKEND,
                          help="backend of the real decodes (default: the default verifier backend, onnxruntime)")
    evaluate.add_argument("--dtype", choices=DTYPE_NAMES, default=DEFAULT_DTYPE,
                          help=f"precision of the target's and the drafter's weights and KV caches (default {DEFAULT_DTYPE}); "
                               f"--backend onnxruntime runs an export of this dtype (on the CPU: float32 or float16)")
    evaluate.add_argument("--device", default=DEFAULT_DEVICE,
                          help=f"with --backend torch: 'cpu', 'cuda' or 'cuda:N', where the target, the drafter and their "
                               f"caches live (default {DEFAULT_DEVICE})")
    evaluate.add_argument("--chat-template-kwargs", type=json_object, default=None, metavar="JSON",
                          help='chat-template arguments of the evaluation prompts, e.g. \'{"enable_thinking": false}\' '
                               "for Qwen3, over those the drafter's config.json names")
    for module in COMMAND_GROUPS:
        importlib.import_module(module).add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        handler = getattr(args, "handler", None)
        if handler is not None:
            return handler(args)
        if args.command == "generate":
            return _generate(args)
        if args.command in ("up", "down", "status"):
            return _stack(args)
        if args.command == "prepare":
            return _prepare(args)
        if args.command == "drafter":
            return _drafter(args)
    except BlockPilotError as err:
        print(f"blockpilot {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, InvalidArgumentError) else EXIT_FAILURE
    except ModuleNotFoundError as err:
        if (err.name or "blockpilot").split(".")[0] == "blockpilot":
            raise
        # The base install is the client only; the model and service commands need the server extra.
        print(f"blockpilot {args.command}: error: {err}; this command needs the server install: "
              "pip install 'blockpilot[server]'", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("blockpilot: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE


def _prepare(args: argparse.Namespace) -> int:
    from blockpilot.models.store import is_default_target, resolve_target

    logging.getLogger("blockpilot").setLevel(logging.INFO)
    target_dir = resolve_target(args.target)
    print(target_dir)
    drafter_layers = None
    if args.drafter not in (None, "", "none", "random"):  # '' = the engine's default, as the services take it
        from blockpilot.backends.loader import drafter_checkpoint_layers
        from blockpilot.models.store import resolve_drafter

        print(resolve_drafter(args.drafter))
        drafter_layers = drafter_checkpoint_layers(args.drafter)
    if args.backend != TORCH:
        # The export the verifier would otherwise make on its first start (and time out a client on):
        # the one its backend picks for this machine's provider, the dtype and the precision.
        from blockpilot.backends.loader import BackendOptions, backend_export, default_export_layers
        from blockpilot.models.target import TargetModel

        target = TargetModel.from_pretrained(target_dir, dtype=Placement(args.dtype).torch_dtype)
        export, _ = backend_export(target, BackendOptions(name=args.backend, precision=args.precision),
                                   drafter_layers=drafter_layers, source=str(target_dir),
                                   default_layers=default_export_layers(target, is_default_target(args.target)))
        print(export.directory)
    return 0


def _drafter(args: argparse.Namespace) -> int:
    from blockpilot.runtime import set_threads

    set_threads(args.threads)
    logging.getLogger("blockpilot").setLevel(logging.INFO)
    if args.drafter_command == "data":
        return _drafter_data(args)
    if args.drafter_command == "train":
        return _drafter_train(args)
    if args.drafter_command == "eval":
        return _drafter_eval(args)
    if args.drafter_command == "corpus":
        return _drafter_corpus(args)
    raise InvalidArgumentError(f"unknown drafter command {args.drafter_command!r}")


def _drafter_corpus(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from blockpilot.decoding.corpus import build_from_responses
    from blockpilot.training.shards import ResponseStore

    store = ResponseStore.open_existing(args.data)
    target = store.manifest.get("target") or {}
    if not target.get("weights_digest"):
        raise FailedPreconditionError(f"the data folder '{args.data}' names no target weights digest")
    with tqdm(desc="greedy records", unit="rec") as progress:
        corpus = build_from_responses(store.records(), target, min_count=args.min_count,
                                      holdout_share=args.holdout_share, progress=progress)
    out = corpus.save(args.out, int(target["vocab_size"]))
    print(json.dumps({"out": str(out), "records": corpus.info["records"], "tokens": corpus.info["tokens"],
                      "held_out_records": corpus.info["held_out_records"], "bigrams": len(corpus.bigram),
                      "trigrams": len(corpus.trigram), "survival_no_match": corpus.survival[0],
                      "survival_one_token_match": corpus.survival[1]}, indent=1))
    return 0


def _drafter_data(args: argparse.Namespace) -> int:
    import signal

    import torch

    from blockpilot.backends.onnx_export import weights_digest
    from blockpilot.benchmarking import machine_info
    from blockpilot.models.store import resolve_target
    from blockpilot.models.target import TargetModel
    from blockpilot.models.tokenizer import ChatTokenizer
    from blockpilot.training.data import DataConfig, generate_dataset, import_jsonl, resolve_precision

    target_dir = resolve_target(args.target)
    target = TargetModel.from_pretrained(target_dir)
    target_info = {"name": args.target or target_dir.name, "weights_digest": weights_digest(target),
                   "vocab_size": target.config.vocab_size}
    if args.import_jsonl is not None:
        entry = import_jsonl(args.import_jsonl, args.out, target_info,
                             {"imported_from": args.import_jsonl.name, "code": "left-padded batches (before the refilling batch)",
                              "precision": "fp32"})
        print(json.dumps({"imported": entry}))
        return 0
    precision = resolve_precision(args.precision)
    if precision == "bf16":
        target = TargetModel.from_pretrained(target_dir, dtype=torch.bfloat16)
    cfg = DataConfig(prompts_per_file=args.prompts_per_file, sample_fraction=args.sample_fraction,
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, refill_min=args.refill_min,
                     shard_records=args.shard_records, precision=precision, seed=args.seed)
    machine = machine_info()
    generator_info = {"threads": torch.get_num_threads(), "cpu": machine["cpu"], "cpu_flags": machine["cpu_flags"],
                      "torch": machine["torch"]}
    # A background run stopped by SIGTERM still writes its finished responses (the finally in
    # generate_dataset runs on KeyboardInterrupt).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    why = {"auto": "chosen for this CPU", "fp32": "asked for", "bf16": "asked for"}[args.precision]
    print(f"drafter data: precision {precision} ({why}), {torch.get_num_threads()} threads, into {args.out}", file=sys.stderr)
    summary = generate_dataset(target, ChatTokenizer(target_dir), args.prompts, args.out, cfg, target_info=target_info,
                               generator_info=generator_info, max_jobs=args.max_jobs)
    print(json.dumps(summary))
    return 0


def _drafter_train(args: argparse.Namespace) -> int:
    import torch

    from blockpilot.models.store import resolve_target
    from blockpilot.models.target import TargetModel
    from blockpilot.models.tokenizer import ChatTokenizer
    from blockpilot.training.data import read_dataset, resolve_precision
    from blockpilot.training.train import TrainConfig, train_drafter

    target_dir = resolve_target(args.target)
    target = TargetModel.from_pretrained(target_dir)
    feature_target = TargetModel.from_pretrained(target_dir, dtype=torch.bfloat16) if resolve_precision(args.feature_precision) == "bf16" else None
    mask = args.mask_token_id if args.mask_token_id is not None else default_mask_token(ChatTokenizer(target_dir))
    cfg = TrainConfig(num_draft_layers=args.layers, target_layer_ids=tuple(args.target_layers) if args.target_layers else None,
                      block_size=args.block_size, mask_token_id=mask, gamma=args.gamma, lr=args.lr, steps=args.steps,
                      anchors_per_sequence=args.anchors, sequences_per_step=args.sequences, eval_every=args.eval_every,
                      save_every=args.save_every, accept_until_fail=args.accept_until_fail,
                      accept_until_fail_after=args.accept_until_fail_after, distill=args.distill, teacher_top_k=args.teacher_top_k,
                      draft_vocab_size=args.draft_vocab_size, seed=args.seed)
    holdout_ids = read_id_list(args.holdout_ids) if args.holdout_ids is not None else None
    summary = train_drafter(target, read_dataset(args.data, args.data_tokens), args.out, cfg, init_from=args.init_from,
                            feature_dir=args.feature_dir, feature_layer_ids=args.feature_layers, holdout_ids=holdout_ids,
                            feature_target=feature_target, features_on_demand=args.features_on_demand)
    (args.out / "history.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "history"} | {"last": summary["history"][-1] if summary["history"] else None}))
    return 0


def read_json_file(path: Path, what: str):
    """The JSON value in `path`, or a one-line InvalidArgumentError naming `what` it should be."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"cannot read the {what} {str(path)!r}: {exc}") from None


def read_id_list(path: Path) -> list[str]:
    """A JSON list of prompt ids, with a one-line error for anything else."""
    ids = read_json_file(path, "id list")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise InvalidArgumentError(f"{str(path)!r} must hold a non-empty JSON list of prompt id strings")
    return ids


def default_mask_token(tokenizer) -> int:
    """A special token that never appears in chat text: SmolLM2's <empty_output> (id 16)."""
    token_id = tokenizer.token_id("<empty_output>")
    return token_id if token_id is not None else 0


def _drafter_eval(args: argparse.Namespace) -> int:
    from blockpilot.models.drafter import DFlashDrafter
    from blockpilot.models.store import resolve_drafter, resolve_target
    from blockpilot.models.target import TargetModel
    from blockpilot.models.tokenizer import ChatTokenizer
    from blockpilot.runtime import shipped_drafter_dir
    from blockpilot.training.evaluate import EvalConfig, evaluate_drafter, format_table, merge_reports, write_report

    if args.merge:
        report = merge_reports([read_json_file(path, "eval report") for path in args.merge])
        write_report(report, args.out)
        print(format_table(report))
        return 0
    if args.datasets_dir is None:
        raise InvalidArgumentError("--datasets-dir is required (or --merge REPORT ...)")
    drafter_dir = resolve_drafter(args.drafter) if args.drafter else shipped_drafter_dir()
    if drafter_dir is None:
        raise InvalidArgumentError("no --drafter given and this checkout ships none")
    placement = Placement(args.dtype, args.device)
    check_backend_placement(placement, args.backend)
    device = placement.torch_device()  # before any load: a missing GPU is said at once
    target_dir = resolve_target(args.target)
    cfg = EvalConfig(datasets=tuple(args.datasets), prompts_per_dataset=args.prompts_per_dataset,
                     max_new_tokens=args.max_new_tokens, sweep_radius=args.radius, block_size=args.block_size,
                     temperature_runs=not args.no_temperature, lookup=not args.no_lookup,
                     drafter_precision=None if args.drafter_precision == "loaded" else args.drafter_precision,
                     chat_template_kwargs=args.chat_template_kwargs or {})
    from blockpilot.backends.loader import BackendOptions, load_backend

    target = TargetModel.from_pretrained(target_dir, dtype=placement.torch_dtype, device=device)
    drafter = DFlashDrafter.from_pretrained(drafter_dir, dtype=placement.torch_dtype, device=device)
    verifier = load_backend(target, BackendOptions(name=args.backend, threads=args.threads),
                            drafter_layers=drafter.target_layer_ids, source=str(target_dir))
    report = evaluate_drafter(target, ChatTokenizer(target_dir), drafter, args.datasets_dir, cfg, verifier=verifier)
    report["drafter"] = args.drafter or str(drafter_dir)  # a repository id as given, not its snapshot folder
    report["backend"] = args.backend
    report["dtype"], report["device"] = placement.dtype, placement.device
    write_report(report, args.out)
    print(format_table(report))
    return 0


def _add_stack_parsers(sub) -> None:
    """`blockpilot up | down | status`: the local service stack (blockpilot/serving/stack.py)."""
    up = sub.add_parser("up", help="start Redis (if needed), the policy, drafter and verifier services and the HTTP "
                                   "gateway (OpenAI API) on loopback")
    up.add_argument("--target", default="default", help="target model of the verifier and drafter")
    up.add_argument("--drafter", default="", help="drafter of the drafter service ('' = the engine's default, 'random', 'none', "
                                                  "a checkpoint directory or a Hugging Face repository id)")
    up.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis to use (started when none answers and redis-server is installed)")
    for name, port, metrics_port in (("verifier", 50051, 9101), ("drafter", 50052, 9102), ("policy", 50053, 9103)):
        up.add_argument(f"--{name}-port", type=positive_int, default=port)
        up.add_argument(f"--{name}-metrics-port", type=int, default=metrics_port)
    up.add_argument("--gateway-port", type=positive_int, default=8000, help="HTTP port of the gateway (the OpenAI API)")
    up.add_argument("--gateway-metrics-port", type=int, default=9104)
    up.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads per service")
    up.add_argument("--backend", choices=BACKENDS, default="",
                    help="the verifier's backend (default: its config's, i.e. BLOCKPILOT_VERIFIER_BACKEND, else onnxruntime)")
    up.add_argument("--precision", choices=PRECISION_CHOICES, default="",
                    help="the verifier's onnxruntime precision (default: its config's, i.e. BLOCKPILOT_VERIFIER_PRECISION, "
                         f"else {DEFAULT_PRECISION})")
    up.add_argument("--dtype", choices=DTYPE_NAMES, default="",
                    help="the verifier's and the drafter's precision (default: their configs', i.e. BLOCKPILOT_VERIFIER_DTYPE "
                         f"and BLOCKPILOT_DRAFTER_DTYPE, else {DEFAULT_DTYPE}); a graph backend runs an export of it")
    up.add_argument("--device", default="",
                    help="where the verifier (--backend torch) and the drafter run: 'cpu', 'cuda' or 'cuda:N' (default: their "
                         f"configs', i.e. BLOCKPILOT_VERIFIER_DEVICE and BLOCKPILOT_DRAFTER_DEVICE, else {DEFAULT_DEVICE})")
    up.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for all services to be SERVING")
    up.add_argument("--secure", action="store_true",
                    help="TLS on every service (mTLS between them), a data and an admin token, a Redis user with a password "
                         "(started Redis only): all made once under <run dir>/secure/")
    down = sub.add_parser("down", help="stop the local stack started by `blockpilot up`")
    down.add_argument("--grace", type=float, default=15.0, help="seconds each service gets to drain before SIGKILL")
    sub.add_parser("status", help="health of the local stack and what the verifier serves (exit 0 when every service is SERVING)")


def _stack(args: argparse.Namespace) -> int:
    from blockpilot.serving import stack

    if args.command == "up":
        opts = stack.StackOptions(
            target=args.target, drafter=args.drafter, redis_url=args.redis_url, verifier_port=args.verifier_port,
            drafter_port=args.drafter_port, policy_port=args.policy_port, verifier_metrics_port=args.verifier_metrics_port,
            drafter_metrics_port=args.drafter_metrics_port, policy_metrics_port=args.policy_metrics_port, gateway_port=args.gateway_port,
            gateway_metrics_port=args.gateway_metrics_port,
            threads=args.threads, timeout_s=args.timeout, backend=args.backend, precision=args.precision, dtype=args.dtype,
            device=args.device, secure=args.secure)
        state = stack.up(opts)
        print(f"stack up: verifier at {state['services']['verifier']['address']}, OpenAI API at "
              f"{'https' if opts.secure else 'http'}://{state['services']['gateway']['address']}/v1 (logs in {state['run_dir']})")
        return 0
    if args.command == "down":
        return stack.down(args.grace)
    return stack.status()


def _generate_remote(args: argparse.Namespace) -> int:
    """`generate --server`: the same output contract, through the verifier service."""
    from google.protobuf import json_format

    from blockpilot.client import BlockPilotClient

    if args.target is not None or args.drafter is not None or args.threads is not None or args.policies is not None:
        raise InvalidArgumentError("--target, --drafter, --threads and --policies are the server's settings; not allowed with --server")
    if args.dtype is not None or args.device is not None:
        raise InvalidArgumentError("--dtype and --device are the server's settings (verifier config 'dtype', 'device'); "
                                   "not allowed with --server")
    request = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   draft_sampling=args.draft_sampling, block_size=args.block_size, policy=args.policy,
                   return_prompt_token_ids=True, prompt_lookup=args.prompt_lookup == "on", logprobs=args.logprobs,
                   chat_template_kwargs=args.chat_template_kwargs)
    if args.raw:
        request["prompt"] = args.prompt
    else:
        request["messages"] = [{"role": "user", "content": args.prompt}]
    final = None
    with BlockPilotClient(args.server, timeout=args.timeout, security=client_security(args)) as client:
        for event in client.stream(**request):
            if event.final is not None:
                final = event.final
            elif not args.json:
                sys.stdout.write(event.text)
                sys.stdout.flush()
    if not args.json:
        sys.stdout.write("\n")
    timings = final.timings
    report = {
        "target": final.target,
        "drafter": final.drafter,
        "prompt_token_ids": list(final.prompt_token_ids),
        "token_ids": list(final.token_ids),
        "text": final.text,
        "block_size": final.block_size,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "draft_sampling": args.draft_sampling,
        "seed": args.seed,
        "acceptance_lengths": list(final.acceptance_lengths),
        "tau": round(final.tau, 4),
        "num_steps": len(final.acceptance_lengths),
        "ttft_s": round(timings.ttft_s, 4),
        "decode_s": round(timings.decode_s, 4),
        "decode_tokens_per_s": round(timings.decode_tokens_per_s, 2),
        "finish_reason": final.finish_reason,
        "prompt_lookup": final.prompt_lookup,
        "accepted_by_source": dict(final.accepted_by_source),
        "drafter_passes_skipped": final.drafter_passes_skipped,
        "server": args.server,
        "backend": final.backend,
        "precision": final.precision,
        "policy_version": final.policy_version,
        "arm": final.arm,
        "fallback_reason": final.fallback_reason,
        "total_s": round(timings.total_s, 4),
        "trace_id": final.trace_id,
        "chat_template_kwargs": json_format.MessageToDict(final.chat_template_kwargs),
    }
    if args.logprobs:
        report["logprobs"] = [[lp.token_id, lp.logprob, lp.text] for lp in final.logprobs]
        _print_logprobs(report["logprobs"], args.json)
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"[{len(final.token_ids)} tokens, finish={final.finish_reason}, block_size={final.block_size}, "
            f"drafter={final.drafter}, tau={final.tau:.2f}, accepted lookup={final.accepted_by_source['lookup']} "
            f"dflash={final.accepted_by_source['dflash']}, ttft={timings.ttft_s * 1000:.0f} ms, "
            f"decode={timings.decode_tokens_per_s:.1f} tokens/s, server={args.server} ({final.backend}/{final.precision})"
            + (f", policy={final.policy_version} arm={final.arm}" if final.policy_version else "")
            + (f", fallback={final.fallback_reason}" if final.fallback_reason else "") + "]",
            file=sys.stderr,
        )
    return 0


def _print_logprobs(rows: list, as_json: bool) -> None:
    """Without --json: one line per token on stderr (id, log-probability, text as a Python literal)."""
    if not as_json:
        for token_id, logprob, text in rows:
            print(f"{token_id:>8} {logprob:10.4f} {text!r}", file=sys.stderr)


def _generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise InvalidArgumentError("the prompt is empty")
    if args.raw and args.chat_template_kwargs:
        raise InvalidArgumentError("--chat-template-kwargs applies to the chat template; not with --raw")
    if args.server:
        if args.backend is not None or args.onnx is not None or args.precision is not None:
            raise InvalidArgumentError("--backend, --precision and --onnx are the server's settings (verifier config "
                                       "'backend', 'precision'); not allowed with --server")
        return _generate_remote(args)
    if args.onnx is not None and args.backend == "torch":
        raise InvalidArgumentError(f"--onnx '{args.onnx}' needs --backend onnxruntime or tensorrt")
    from blockpilot.models.store import is_hub_repo_id

    if args.drafter not in (None, "none", "random") and not Path(args.drafter).expanduser().exists() \
            and not is_hub_repo_id(args.drafter):
        raise InvalidArgumentError(f"--drafter '{args.drafter}' does not exist (give a DFlash checkpoint directory, a Hugging "
                                   f"Face repository id ORG/NAME, 'random' or 'none')")
    placement = Placement(args.dtype or DEFAULT_DTYPE, args.device or DEFAULT_DEVICE)
    auto = args.block_size == AUTO
    if not auto and (args.policy or args.policies is not None):
        raise InvalidArgumentError("--policy and --policies need --block-size auto")
    if not auto and args.block_size > 1 and args.drafter in (None, "none"):
        from blockpilot.runtime import shipped_drafter_dir

        if args.drafter == "none" or shipped_drafter_dir() is None or args.target not in (None, "default"):
            raise InvalidArgumentError(
                f"--block-size {args.block_size} needs a drafter: pass --drafter PATH (a DFlash checkpoint) or --drafter random"
            )

    from blockpilot.decoding.lookup import LOOKUP_OFF, lookup_for
    from blockpilot.decoding.speculative import GenerationResult, SamplingParams
    from blockpilot.models.tokenizer import IncrementalDecoder
    from blockpilot.backends.loader import BackendOptions
    from blockpilot.runtime import load_engine, set_threads

    set_threads(args.threads)
    backend = args.backend or DEFAULT_VERIFIER_BACKEND
    precision = args.precision or DEFAULT_PRECISION
    engine = load_engine(args.target, args.drafter, placement=placement,
                         backend=BackendOptions(name=backend, precision=precision, onnx=args.onnx, threads=args.threads),
                         lookup_corpus=args.lookup_corpus if args.prompt_lookup == "on" else "none")
    tokenizer = engine.tokenizer
    # The drafter's trained-with template arguments, the flag's over them (as the verifier service).
    template_kwargs = {**engine.template_defaults, **(args.chat_template_kwargs or {})}
    prompt_ids = (tokenizer.encode_raw(args.prompt) if args.raw
                  else tokenizer.encode_chat([{"role": "user", "content": args.prompt}], template_kwargs))
    policy = None
    if auto and engine.drafter is not None:
        from blockpilot.policy.in_process import InProcessPolicy

        policy = InProcessPolicy(args.policies, args.policy)
        block_size = policy.hook(engine.default_block_size, engine.decoder.max_block_size)
    else:
        block_size = 1 if auto else args.block_size  # without a drafter there is no block size to decide
    lookup = lookup_for(engine.decoder.target, engine.corpus) if args.prompt_lookup == "on" else LOOKUP_OFF
    params = SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        stop_token_ids=tokenizer.stop_token_ids,
        seed=args.seed,
        draft_sampling=args.draft_sampling,
        logprobs=args.logprobs,
    )
    result = GenerationResult(prompt_token_ids=prompt_ids)
    # A chosen block size drops the drafts that do not pay on this engine (the verifier's load cap
    # alone); a block size the user fixed is honoured as given.
    gate = engine.decoder.speed_gate() if policy is not None else None
    stream = engine.decoder.stream(prompt_ids, params, block_size, result, lookup=lookup, gate=gate)
    if args.json:
        for _ in stream:
            pass
    else:
        text = IncrementalDecoder(tokenizer)
        for event in stream:
            sys.stdout.write(text.push(event.token_ids))
            sys.stdout.flush()
        sys.stdout.write("\n")
    report = {
        "target": str(engine.target_dir),
        "drafter": engine.drafter_name,
        "prompt_token_ids": result.prompt_token_ids,
        "token_ids": result.token_ids,
        "text": tokenizer.decode(result.token_ids),
        "block_size": result.block_size,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "draft_sampling": args.draft_sampling,
        "seed": args.seed,
        "acceptance_lengths": result.acceptance_lengths,
        "tau": round(result.tau, 4),
        "num_steps": len(result.acceptance_lengths),
        "ttft_s": round(result.ttft_s, 4),
        "decode_s": round(result.decode_s, 4),
        "decode_tokens_per_s": round(result.decode_tokens_per_s, 2),
        "finish_reason": result.finish_reason,
        "prompt_lookup": lookup.enabled,
        "accepted_by_source": result.accepted_by_source,
        "drafter_passes_skipped": result.drafter_passes_skipped,
        "capped_steps": result.capped_steps,
        "backend": engine.backend,
        "precision": engine.precision,
        "dtype": engine.placement.dtype,
        "device": engine.placement.device,
        "policy_version": policy.decision.policy_version if policy and policy.decision else "",
        "arm": policy.decision.arm if policy and policy.decision else "",
        "fallback_reason": ",".join(r for r in (policy.decision.fallback_reason if policy and policy.decision else "",
                                                 result.fallback_reason or "") if r),
    }
    if not args.raw:
        report["chat_template_kwargs"] = template_kwargs
    if args.logprobs:
        report["logprobs"] = [[t, lp, tokenizer.decode([t], skip_special_tokens=False)]
                              for t, lp in zip(result.token_ids, result.logprobs)]
        _print_logprobs(report["logprobs"], args.json)
    if policy is not None:
        policy.close()
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"[{len(result.token_ids)} tokens, finish={result.finish_reason}, block_size={result.block_size}, "
            f"drafter={engine.drafter_name}, tau={result.tau:.2f}, accepted lookup={result.accepted_by_source['lookup']} "
            f"dflash={result.accepted_by_source['dflash']}, ttft={result.ttft_s * 1000:.0f} ms, "
            f"decode={result.decode_tokens_per_s:.1f} tokens/s, backend={engine.backend}/{engine.precision}"
            + (f", policy={report['policy_version']}" if report["policy_version"] else "")
            + (f", fallback={report['fallback_reason']}" if report["fallback_reason"] else "") + "]",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
