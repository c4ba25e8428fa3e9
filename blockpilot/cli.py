"""`blockpilot` command line.

Contract of `blockpilot generate` (benchmarks and later services rely on it; extend, do not break):
    blockpilot generate [--target NAME_OR_PATH] [--drafter PATH|random|none] [--block-size N]
                        [--temperature T] [--max-new-tokens N] [--seed S] [--raw] [--json] PROMPT
`--json` prints exactly one JSON object on stdout. Bad arguments exit with status 2 and one line
on stderr; no traceback reaches the user for an expected failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Sequence

from blockpilot.errors import BlockPilotError, InvalidArgumentError

EXIT_USAGE = 2
EXIT_FAILURE = 1


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints a multi-line usage on errors; users and scripts want one clear line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="blockpilot", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    gen = sub.add_parser("generate", help="generate a reply with speculative decoding (in-process)")
    gen.add_argument("prompt", metavar="PROMPT", help="one user message (wrapped in the chat template unless --raw)")
    gen.add_argument("--target", default=None, help="'default' (SmolLM2-135M-Instruct), a Hugging Face model directory, or a .gguf file")
    gen.add_argument("--drafter", default=None, help="DFlash checkpoint directory, 'random' (untrained, for testing) or 'none'; default: the shipped drafter of the default target")
    gen.add_argument("--block-size", type=_positive_int, default=None, help="tokens per verify step; 1 = autoregressive (default: the drafter's trained size, else 1)")
    gen.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=128)
    gen.add_argument("--seed", type=int, default=None, help="seed of the request's random stream (temperature > 0)")
    gen.add_argument("--draft-sampling", choices=("greedy", "sample"), default="greedy",
                     help="at temperature > 0: 'greedy' drafts + sample-and-match (DFlash), 'sample' drafts + min(1, p/q)")
    gen.add_argument("--raw", action="store_true", help="send PROMPT as plain text, without the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object with the tokens and statistics")
    gen.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")

    prep = sub.add_parser("prepare", help="make the default model ready (de-quantize once into the cache)")
    prep.add_argument("--target", default=None)

    drafter = sub.add_parser("drafter", help="make, train and evaluate DFlash drafters")
    drafter_sub = drafter.add_subparsers(dest="drafter_command", required=True, parser_class=_OneLineParser)
    data = drafter_sub.add_parser("data", help="the target's own responses to training prompts (resumable)")
    data.add_argument("--prompts", type=Path, nargs="+", required=True, help="training *.jsonl files or folders of them (never evaluation sets)")
    data.add_argument("--out", type=Path, required=True, help="JSONL dataset file (appended to; rerun to resume)")
    data.add_argument("--target", default=None)
    data.add_argument("--prompts-per-file", type=_positive_int, default=200)
    data.add_argument("--sample-fraction", type=float, default=0.5, help="share of prompts also answered at temperature 1")
    data.add_argument("--max-new-tokens", type=_positive_int, default=192)
    data.add_argument("--batch-size", type=_positive_int, default=32)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--threads", type=_positive_int, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "prepare":
            return _prepare(args)
        if args.command == "drafter":
            return _drafter(args)
    except BlockPilotError as err:
        print(f"blockpilot {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, InvalidArgumentError) else EXIT_FAILURE
    except KeyboardInterrupt:
        print("blockpilot: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE


def _prepare(args: argparse.Namespace) -> int:
    from blockpilot.models.store import resolve_target

    logging.getLogger("blockpilot").setLevel(logging.INFO)
    print(resolve_target(args.target))
    return 0


def _drafter(args: argparse.Namespace) -> int:
    from blockpilot.runtime import set_threads

    set_threads(args.threads)
    logging.getLogger("blockpilot").setLevel(logging.INFO)
    if args.drafter_command == "data":
        from blockpilot.models.store import resolve_target
        from blockpilot.models.target import TargetModel
        from blockpilot.models.tokenizer import ChatTokenizer
        from blockpilot.training.data import DataConfig, generate_dataset

        target_dir = resolve_target(args.target)
        cfg = DataConfig(prompts_per_file=args.prompts_per_file, sample_fraction=args.sample_fraction,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
        summary = generate_dataset(TargetModel.from_pretrained(target_dir), ChatTokenizer(target_dir), args.prompts, args.out, cfg)
        print(json.dumps(summary))
        return 0
    raise InvalidArgumentError(f"unknown drafter command {args.drafter_command!r}")


def _generate(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise InvalidArgumentError("the prompt is empty")
    if args.drafter not in (None, "none", "random") and not Path(args.drafter).expanduser().exists():
        raise InvalidArgumentError(f"--drafter '{args.drafter}' does not exist (give a DFlash checkpoint directory, 'random' or 'none')")
    if args.block_size is not None and args.block_size > 1 and args.drafter in (None, "none"):
        from blockpilot.runtime import shipped_drafter_dir

        if args.drafter == "none" or shipped_drafter_dir() is None or args.target not in (None, "default"):
            raise InvalidArgumentError(
                f"--block-size {args.block_size} needs a drafter: pass --drafter PATH (a DFlash checkpoint) or --drafter random"
            )

    from blockpilot.decoding.speculative import GenerationResult, SamplingParams
    from blockpilot.models.tokenizer import IncrementalDecoder
    from blockpilot.runtime import load_engine, set_threads

    set_threads(args.threads)
    engine = load_engine(args.target, args.drafter)
    tokenizer = engine.tokenizer
    prompt_ids = tokenizer.encode_raw(args.prompt) if args.raw else tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    block_size = args.block_size if args.block_size is not None else engine.default_block_size
    params = SamplingParams(
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        stop_token_ids=tokenizer.stop_token_ids,
        seed=args.seed,
        draft_sampling=args.draft_sampling,
    )
    result = GenerationResult(prompt_token_ids=prompt_ids)
    stream = engine.decoder.stream(prompt_ids, params, block_size, result)
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
        "draft_sampling": args.draft_sampling,
        "seed": args.seed,
        "acceptance_lengths": result.acceptance_lengths,
        "tau": round(result.tau, 4),
        "num_steps": len(result.acceptance_lengths),
        "ttft_s": round(result.ttft_s, 4),
        "decode_s": round(result.decode_s, 4),
        "decode_tokens_per_s": round(result.decode_tokens_per_s, 2),
        "finish_reason": result.finish_reason,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"[{len(result.token_ids)} tokens, finish={result.finish_reason}, block_size={result.block_size}, "
            f"drafter={engine.drafter_name}, tau={result.tau:.2f}, ttft={result.ttft_s * 1000:.0f} ms, "
            f"decode={result.decode_tokens_per_s:.1f} tokens/s]",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
