"""Pick and build the verifier backend named by the config or the command line.

One place decides, for the CLI (`generate --backend`), the benchmarks and the verifier service:
which export a graph backend runs (the folder given, else one made on demand into
`$BLOCKPILOT_CACHE/onnx/`), that it was made from the loaded weights, and that it returns the
hidden states of the layers the drafter reads.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from blockpilot.backends import AUTO, FP32, INT4, PRECISION_CHOICES
from blockpilot.backends.base import ONNXRUNTIME, TENSORRT, TORCH, VerifierBackend, check_backend_name, check_layers_match
from blockpilot.errors import InvalidArgumentError, ModelFormatError, NotFoundError
from blockpilot.models.target import TargetModel

if TYPE_CHECKING:
    from blockpilot.backends.onnx_export import OnnxExport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendOptions:
    """How to run the verifier's target.

    name: 'torch' | 'onnxruntime' | 'tensorrt'.
    precision: 'fp32' | 'int4' (onnxruntime on the CPU only: the GGUF's own 4-bit codes; see
        blockpilot.backends.fused_graph) | 'auto' (int4 for a target converted from a GGUF file of
        Q4_1 / Q8_0 codes, else fp32; with `onnx`, the export's). On the CPU the onnxruntime
        backend runs the fused graph at either precision; its GPU providers and TensorRT run the
        portable export. The float type is the target's dtype (load_backend): a float16 / bfloat16
        target runs a portable export of its own dtype, unquantized ('auto' or 'fp32').
    onnx: an export folder (`blockpilot export onnx`); None = export on demand into the cache.
    threads: ONNX Runtime intra-op threads (None: torch's thread count).
    ort_provider: 'auto' | 'cpu' | 'cuda' | 'tensorrt' (ONNX Runtime execution provider).
    trt_precision / trt_max_block_size / trt_max_context: the TensorRT engine's precision (None:
        the export's dtype, fp16 for a float32 export; see tensorrt_backend.engine_precision),
        largest verify block and largest cache length (None: the model's context).
    side_threads: torch's intra-op threads once ONNX Runtime runs the target on the CPU: the
        torch work beside it (drafter pass, acceptance, the policy feature) is small, and two
        thread pools spinning on the same cores slow each other down. Measured on a 2-core
        machine (Zen 4), ONNX Runtime on 2 threads: with torch on 2 threads as well, a drafter pass
        of 8 tokens took 23 ms and a 4-token verify 37 ms; with torch on 1, 9 ms and 32 ms.
        None: 1. The torch backend keeps torch's own thread count.
    """

    name: str = TORCH
    precision: str = AUTO
    onnx: str | Path | None = None
    threads: int | None = None
    ort_provider: str = "auto"
    trt_precision: str | None = None
    trt_max_block_size: int = 16
    trt_max_context: int | None = None
    side_threads: int | None = None

    def __post_init__(self) -> None:
        check_backend_name(self.name)
        if self.precision not in PRECISION_CHOICES:
            raise InvalidArgumentError(f"unknown precision {self.precision!r} (choose one of {', '.join(PRECISION_CHOICES)})")
        if self.precision == INT4 and self.name != ONNXRUNTIME:
            raise InvalidArgumentError(f"precision {self.precision} runs on the onnxruntime backend, not {self.name!r}")
        if self.trt_precision not in (None, "fp16", "bf16", "fp32"):
            raise InvalidArgumentError(f"unknown TensorRT precision {self.trt_precision!r} (choose one of fp16, bf16, fp32)")
        if self.side_threads is not None and self.side_threads < 1:
            raise InvalidArgumentError(f"side_threads must be >= 1, got {self.side_threads!r}")
        if self.name == TORCH and self.onnx:
            raise InvalidArgumentError(f"an ONNX export ('{self.onnx}') is only used by the onnxruntime and tensorrt backends, not 'torch'")


def load_backend(target: TargetModel, options: BackendOptions, *, drafter_layers: Sequence[int] | None,
                 default_layers: Sequence[int] = (), source: str = "") -> VerifierBackend:
    """The target as the loop should run it.

    drafter_layers: the target layers the drafter reads (None: no drafter here, or not known).
    default_layers: the layers an on-demand export returns when drafter_layers is None (so one
        export serves block size 1 and the usual drafter alike).
    source: where the target came from (recorded in on-demand exports).
    The export is of the target's dtype (the placement's): one of another dtype is refused, an
    on-demand one made in it."""
    if options.name == TORCH:
        return target
    from blockpilot.backends.onnx_export import FUSED

    export, provider = backend_export(target, options, drafter_layers=drafter_layers, default_layers=default_layers,
                                      source=source)
    if options.name == ONNXRUNTIME:
        if export.metadata.graph == FUSED:
            from blockpilot.backends.onnxruntime_fused import FusedOnnxRuntimeTarget

            backend = FusedOnnxRuntimeTarget(export, target, threads=options.threads, verify_weights=False)
        else:
            from blockpilot.backends.onnxruntime_backend import OnnxRuntimeTarget

            backend = OnnxRuntimeTarget(export, target, provider=provider, threads=options.threads,
                                        verify_weights=False, max_block_size=options.trt_max_block_size)
        if backend.device.type == "cpu":
            side = options.side_threads or 1
            if torch.get_num_threads() != side:
                log.info("torch runs on %d thread(s) beside ONNX Runtime's %d (side_threads): their thread pools "
                         "would compete for the same cores", side, backend.threads)
                torch.set_num_threads(side)
        return backend
    from blockpilot.backends.tensorrt_backend import EngineSpec, TensorRTTarget, engine_precision

    spec = EngineSpec(max_block_size=options.trt_max_block_size, precision=engine_precision(export, options.trt_precision),
                      max_context=options.trt_max_context)
    return TensorRTTarget(export, target, spec=spec, verify_weights=False)


def backend_export(target: TargetModel, options: BackendOptions, *, drafter_layers: Sequence[int] | None,
                   default_layers: Sequence[int] = (), source: str = "") -> tuple["OnnxExport", str | None]:
    """The export a graph backend (onnxruntime, tensorrt) runs for `target`, and the ONNX Runtime
    provider it runs on (None for tensorrt): `options.onnx` checked against the target, else the
    one for this provider, dtype and precision in the cache, made there if missing (what
    `blockpilot prepare` makes ahead of the verifier's first start). Arguments as load_backend's."""
    from blockpilot.backends.onnx_export import (FUSED, PORTABLE, cached_export, check_export_matches, dtype_name,
                                                 read_export, weights_digest)

    if options.name == TENSORRT:
        from blockpilot.backends.tensorrt_backend import require_tensorrt

        require_tensorrt()  # before a minute of exporting, not after
    provider = None
    dtype = dtype_name(target.dtype)
    if options.name == ONNXRUNTIME:
        from blockpilot.backends.onnxruntime_backend import check_provider_dtype, choose_provider

        provider = choose_provider(options.ort_provider)
        if provider != "cpu" and options.precision == INT4:
            raise InvalidArgumentError(f"precision {options.precision} runs on the CPU; the {provider} provider runs fp32")
        check_provider_dtype(provider, dtype)  # before an export that could not run
    digest = weights_digest(target)
    precision = options.precision
    if options.onnx:
        export = read_export(options.onnx)
        check_export_matches(export, target, digest)
        if drafter_layers is not None:
            check_layers_match(export.hidden_layer_ids, drafter_layers, str(export.directory))
        meta = export.metadata
        if precision != AUTO and (precision == INT4) != (meta.precision == INT4):
            raise InvalidArgumentError(
                f"the ONNX export at '{export.directory}' is {meta.precision}, but precision {options.precision} was asked for"
            )
        if meta.graph == FUSED and provider != "cpu":
            raise InvalidArgumentError(f"the ONNX export at '{export.directory}' is a fused CPU graph; "
                                       f"{options.name} {provider or ''} needs a portable one (export onnx --graph portable)")
    else:
        layers = drafter_layers if drafter_layers is not None else default_layers
        # The fused graph is ONNX Runtime's float32 CPU ops; a 16-bit target exports the portable one.
        graph = FUSED if provider == "cpu" and dtype == "float32" else PORTABLE
        if graph == FUSED:
            from blockpilot.backends.fused_graph import fused_unsupported_reason

            reason = fused_unsupported_reason(target.config)
            if reason and precision == INT4:
                raise InvalidArgumentError(f"precision int4 runs on the fused CPU graph, which cannot run this target: {reason}")
            if reason:
                log.info("the fused CPU graph cannot run this target (%s): running the portable fp32 graph", reason)
                graph = PORTABLE
        if precision == AUTO:
            precision = auto_precision(target, tuple(layers), source, digest) if graph == FUSED else FP32
        export = cached_export(target, tuple(layers), source=source, digest=digest, graph=graph, precision=precision)
    return export, provider


def auto_precision(target: TargetModel, layers: Sequence[int], model_dir: str | Path, digest: str | None = None) -> str:
    """'auto' resolved: int4 when `model_dir` was converted from a GGUF file whose decoder layers are
    Q4_1 / Q8_0 codes (the model's own format runs fastest), else fp32 (said in the log). An int4
    export already in the cache answers at once: reading the GGUF's tensor table takes seconds."""
    from blockpilot.backends.gguf_codes import gguf_source_of, int4_unsupported_reason
    from blockpilot.backends.onnx_export import FUSED, cached_export_dir, is_cached, weights_digest

    if is_cached(cached_export_dir(target, layers, digest or weights_digest(target), graph=FUSED, precision=INT4)):
        return INT4
    gguf = gguf_source_of(model_dir) if model_dir else None
    if gguf is None:
        return FP32
    reason = int4_unsupported_reason(gguf)
    if reason:
        log.info("precision auto: fp32 (%s)", reason)
        return FP32
    return INT4


def place_beside(backend: VerifierBackend, target: TargetModel, *modules: torch.nn.Module) -> None:
    """Move the torch target (whose embedding and output projection the drafter uses) and the
    drafter onto the backend's device, so a GPU backend does not draft on the CPU."""
    device = backend.device
    if backend is target or target.device == device:
        return
    log.info("moving the torch target and the drafter to %s (beside the %s backend)", device, getattr(backend, "backend", "?"))
    target.to(device)
    target.prepare_for_inference()  # the one-row weight copies are plain attributes: remake them there
    for module in modules:
        module.to(device)


def drafter_checkpoint_layers(path: str | Path) -> tuple[int, ...]:
    """The target layers a DFlash checkpoint (a directory or a Hugging Face repository id) reads (its
    config.json), without loading its weights."""
    from blockpilot.models.drafter import DrafterConfig
    from blockpilot.models.store import resolve_drafter

    config = resolve_drafter(path) / "config.json"
    if not config.is_file():
        raise NotFoundError(f"no drafter at '{config.parent}': expected a DFlash checkpoint directory with config.json")
    try:
        raw = json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ModelFormatError(f"'{config}' is not valid JSON: {err}") from None
    return DrafterConfig.from_hf_dict(raw).target_layer_ids


def served_drafter_layers(target: str, drafter: str) -> tuple[int, ...] | None:
    """The target layers the drafter service will read, as `blockpilot up` starts it: its
    --target and --drafter ('' = the shipped drafter, 'none', 'random', a checkpoint folder or a
    Hugging Face repository id).
    None when the verifier's own rule already gives them ('' and 'none'). `up` hands them to the
    verifier (onnx_layers), so a graph backend exports what the drafter reads."""
    if drafter in ("", "none"):
        return None
    if drafter == "random":
        from blockpilot.models.config import TargetConfig
        from blockpilot.models.drafter import DrafterConfig
        from blockpilot.models.store import resolve_target

        return DrafterConfig.for_target(TargetConfig.from_dir(resolve_target(target))).target_layer_ids
    return drafter_checkpoint_layers(drafter)


def default_export_layers(target: TargetModel, is_default_target: bool) -> tuple[int, ...]:
    """Layers an export returns when nothing names them: those of the shipped drafter for the
    default target, else DFlash's choice for a one-layer drafter (what `--drafter random` and
    `drafter train` make by default). A drafter reading other layers is refused with a message
    that says how to export for it."""
    from blockpilot.models.drafter import default_target_layer_ids
    from blockpilot.runtime import shipped_drafter_dir

    shipped = shipped_drafter_dir() if is_default_target else None
    if shipped is not None:
        return drafter_checkpoint_layers(shipped)
    return tuple(default_target_layer_ids(target.config.num_hidden_layers, 1))
