"""`blockpilot export onnx | trt` (registered by blockpilot.cli).

    blockpilot export onnx --out exports/smollm2                 # layers of the shipped drafter (or DFlash's default)
    blockpilot export onnx --precision int4 --out DIR            # the GGUF's own 4-bit codes (fused CPU graph)
    blockpilot export onnx --graph portable --out DIR            # standard ops, fp32 (GPU providers, TensorRT)
    blockpilot export onnx --dtype bfloat16 --out DIR            # the portable graph in bf16, from a bf16 target (GPU)
    blockpilot export onnx --drafter PATH --out DIR              # the layers PATH reads
    blockpilot export onnx --hidden-layers 1 9 17 --out DIR      # explicit layers
    blockpilot export trt --onnx DIR                             # TensorRT engine at the export's dtype (GPU;
                                                                 # --precision for a float32 export, default fp16)

Each prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from blockpilot.cli_args import OneLineParser, positive_int
from blockpilot.errors import InvalidArgumentError
from blockpilot.models.placement import DEFAULT_DTYPE, DTYPE_NAMES

log = logging.getLogger(__name__)


def add_parsers(sub) -> None:
    """`export` with its `onnx` and `trt` subcommands."""
    export = sub.add_parser("export", help="export the target for the onnxruntime / tensorrt verifier backends")
    export_sub = export.add_subparsers(dest="export_command", required=True, parser_class=OneLineParser)

    onnx = export_sub.add_parser("onnx", help="ONNX graph of the target with its KV cache (checked with onnx.checker and numerically)")
    _add_target_args(onnx)
    onnx.add_argument("--out", type=Path, required=True, help="export folder (model.onnx, model.onnx.data, export.json)")
    onnx.add_argument("--graph", choices=("fused", "portable"), default=None,
                      help="'fused': ONNX Runtime's fused CPU ops, what the onnxruntime backend runs on the CPU (default "
                           "for float32); 'portable': standard ops, for ONNX Runtime's GPU providers and TensorRT (the "
                           "only graph of a float16 / bfloat16 export)")
    onnx.add_argument("--precision", choices=("fp32", "int4"), default="fp32",
                      help="'int4': the GGUF's own 4-bit codes (fused graph; the target must come from a GGUF file)")
    onnx.add_argument("--dtype", choices=DTYPE_NAMES, default=DEFAULT_DTYPE,
                      help="the graph's float type: the target is loaded in it and exported as it is (no fp32 detour); "
                           "float16 / bfloat16 are for GPU runtimes (ONNX Runtime's CPU provider runs float32 and "
                           "float16, not bfloat16; TensorRT builds a 16-bit export at its own precision)")
    onnx.add_argument("--opset", type=positive_int, default=None, help="ONNX opset of the portable graph (default: 18)")
    onnx.add_argument("--force", action="store_true", help="replace an existing export in --out")
    onnx.set_defaults(handler=_export_onnx)

    trt = export_sub.add_parser("trt", help="TensorRT engine built from an ONNX export (needs the gpu extra and an NVIDIA GPU)")
    _add_target_args(trt)
    trt.add_argument("--onnx", type=Path, default=None, help="export folder (default: the on-demand export in $BLOCKPILOT_CACHE/onnx)")
    trt.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                     help="with --onnx: the export's (checked); without: the dtype of the on-demand export (default float32)")
    trt.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default=None,
                     help="engine precision (default: the export's dtype, fp16 for a float32 export; a float16 / "
                          "bfloat16 export builds at its own only)")
    trt.add_argument("--max-block-size", type=positive_int, default=16, help="largest verify block (decode profile: 1..N tokens)")
    trt.add_argument("--prefill-chunk", type=positive_int, default=512, help="largest prefill piece (prefill profile)")
    trt.add_argument("--max-context", type=positive_int, default=None, help="largest cache length (default: the model's context)")
    trt.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT builder workspace")
    trt.add_argument("--rebuild", action="store_true", help="build even when the cache holds the engine")
    trt.set_defaults(handler=_export_trt)


def _add_target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=None, help="'default' (SmolLM2-135M-Instruct), a Hugging Face directory, a .gguf file "
                                                        "or a Hugging Face repository id (ORG/NAME)")
    parser.add_argument("--drafter", default=None,
                        help="the drafter whose target layers the export returns: a DFlash checkpoint directory, 'random' "
                             "(DFlash's one-layer default) or 'none' (no hidden states); default: the shipped drafter of "
                             "the default target, else DFlash's one-layer default")
    parser.add_argument("--hidden-layers", type=int, nargs="+", default=None, help="explicit target layer ids (instead of --drafter)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")


def resolve_layers(args: argparse.Namespace, target, is_default: bool) -> tuple[int, ...]:
    """--hidden-layers, else the layers of --drafter, else blockpilot.backends.loader.default_export_layers."""
    from blockpilot.backends.loader import default_export_layers, drafter_checkpoint_layers
    from blockpilot.models.drafter import default_target_layer_ids

    if args.hidden_layers is not None:
        if args.drafter is not None:
            raise InvalidArgumentError("give --hidden-layers or --drafter, not both")
        return tuple(args.hidden_layers)
    if args.drafter == "none":
        return ()
    if args.drafter == "random":
        return tuple(default_target_layer_ids(target.config.num_hidden_layers, 1))
    if args.drafter is not None:
        return drafter_checkpoint_layers(args.drafter)
    return default_export_layers(target, is_default)


def _load_target(args: argparse.Namespace, dtype: str):
    """The target loaded in `dtype` on the CPU (an export's weights are its own, in that dtype)."""
    import torch

    from blockpilot.models.store import is_default_target, resolve_target
    from blockpilot.models.target import TargetModel
    from blockpilot.runtime import set_threads

    set_threads(args.threads)
    logging.getLogger("blockpilot").setLevel(logging.INFO)
    target_dir = resolve_target(args.target)
    is_default = is_default_target(args.target)
    return target_dir, TargetModel.from_pretrained(target_dir, dtype=getattr(torch, dtype)), is_default


def _export_onnx(args: argparse.Namespace) -> int:
    from blockpilot.backends.onnx_export import DEFAULT_OPSET, FUSED, INT4, PORTABLE, check_graph_precision, describe, export_onnx

    graph = args.graph or (FUSED if args.dtype == DEFAULT_DTYPE else PORTABLE)
    check_graph_precision(graph, args.precision, args.dtype)  # before loading anything
    target_dir, target, is_default = _load_target(args, args.dtype)
    layers = resolve_layers(args, target, is_default)
    if args.opset is not None and graph != PORTABLE:
        raise InvalidArgumentError("--opset applies to the portable graph (the fused graph has its own opset)")
    codes = None
    if args.precision == INT4:
        from blockpilot.backends.gguf_codes import codes_for_target

        codes = codes_for_target(target, target_dir)
    export = export_onnx(target, args.out, layers, source=str(target_dir), opset=args.opset or DEFAULT_OPSET,
                         overwrite=args.force, graph=graph, precision=args.precision, codes=codes)
    print(json.dumps(describe(export)))
    return 0


def _export_trt(args: argparse.Namespace) -> int:
    from blockpilot.backends.onnx_export import cached_export, check_export_dtype, check_export_matches, read_export
    from blockpilot.backends.tensorrt_backend import EngineSpec, build_engine, engine_precision, require_tensorrt

    require_tensorrt()  # one clear message before loading anything
    if args.onnx is not None:
        if args.hidden_layers is not None or args.drafter is not None:
            raise InvalidArgumentError("--onnx fixes the layers: --hidden-layers / --drafter are not allowed with it")
        export = read_export(args.onnx)
        if args.dtype is not None:
            check_export_dtype(export, args.dtype)
        precision = engine_precision(export, args.precision)  # before loading the target
        target_dir, target, is_default = _load_target(args, export.metadata.dtype)
        check_export_matches(export, target)
    else:
        target_dir, target, is_default = _load_target(args, args.dtype or DEFAULT_DTYPE)
        export = cached_export(target, resolve_layers(args, target, is_default), source=str(target_dir))
        precision = engine_precision(export, args.precision)
    spec = EngineSpec(max_block_size=args.max_block_size, prefill_chunk=args.prefill_chunk, max_context=args.max_context,
                      precision=precision, workspace_gb=args.workspace_gb)
    path = build_engine(export, spec, rebuild=args.rebuild)
    print(json.dumps({"engine": str(path), "export": str(export.directory), "dtype": export.metadata.dtype,
                      "precision": spec.precision, "max_block_size": spec.max_block_size,
                      "prefill_chunk": spec.prefill_chunk, "hidden_layer_ids": list(export.hidden_layer_ids)}))
    return 0
