"""The `tensorrt` verifier backend: native TensorRT engines built from the ONNX export.

Build (`build_engine`, `blockpilot export trt`): TensorRT 10's ONNX parser reads the export; two
optimization profiles cover what the loop runs — "decode" (1 .. max_block_size new tokens, the verify
blocks) and "prefill" (1 .. prefill_chunk tokens; longer prompts run in chunks) — each for cache
lengths 0 .. the context size. Precision fp16 or bf16 (the norms' squares, their means and the
softmax are pinned to fp32: an fp16 square of a large activation would overflow) or fp32 (TF32
off). The export's dtype sets it (engine_precision): a float16 / bfloat16 export (made from a target
loaded in that dtype, no fp32 detour) builds at fp16 / bf16 only; a float32 one at any of the three
(fp16 unless asked). Engines are cached on disk under `$BLOCKPILOT_CACHE/trt/<key>/`, the key a SHA-256 of the
ONNX files, the GPU (name and compute capability), the TensorRT version, the precision and the
profile shapes, so a different GPU, TensorRT or export never loads a stale engine.

Run (`TensorRTTarget`): one execution context per profile; each step sets the input shapes and binds
tensor addresses with `set_tensor_address`: the `past_*` inputs are the first `length` slots of the
sequence-major cache (a torch CUDA tensor) and the `new_*` outputs the slots right after them, so
the cache is written in place and never copied between steps; `execute_async_v3` runs on torch's
current CUDA stream, ordered with the torch ops around it.

Without the `tensorrt` package or without a CUDA GPU the backend refuses to start with one clear
message (BackendUnavailableError); nothing falls back silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from blockpilot.backends.base import TENSORRT, BackendUnavailableError
from blockpilot.backends.cache import SeqMajorKVCache
from blockpilot.backends.onnx_export import OnnxExport, _lock, check_export_matches
from blockpilot.backends.onnxruntime_backend import prepare_step
from blockpilot.errors import BlockPilotError, FailedPreconditionError, InvalidArgumentError, ModelFormatError
from blockpilot.models.kv_cache import KVCache
from blockpilot.models.store import cache_root
from blockpilot.models.target import ForwardOutput, TargetModel

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "bf16", "fp32")
# The precision a 16-bit export builds at: its own (its weights are already rounded to it).
EXPORT_PRECISION = {"float16": "fp16", "bfloat16": "bf16"}
FP32_EXPORT_PRECISION = "fp16"  # a float32 export's engine when none is asked for (TensorRT's usual choice)
_PRECISION_DTYPE = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
ENGINE_FILE = "engine.plan"
ENGINE_INFO = "engine.json"
UNAVAILABLE_HINT = ("install the gpu extra (pip install -e '.[gpu]') with a CUDA build of torch, on a machine "
                    "with an NVIDIA GPU; or use --backend torch / onnxruntime")


def require_tensorrt():
    """The `tensorrt` module, or one BackendUnavailableError that says what is missing."""
    try:
        import tensorrt
    except ImportError as err:
        raise BackendUnavailableError(f"the tensorrt backend needs the 'tensorrt' package ({err}); {UNAVAILABLE_HINT}") from None
    if not torch.cuda.is_available():
        raise BackendUnavailableError(
            f"the tensorrt backend needs an NVIDIA GPU visible to torch, and torch.cuda.is_available() is False "
            f"(torch {torch.__version__}); {UNAVAILABLE_HINT}"
        )
    major = int(str(tensorrt.__version__).split(".")[0])
    if major < 10:
        raise BackendUnavailableError(f"the tensorrt backend needs TensorRT >= 10, found {tensorrt.__version__}")
    return tensorrt


def tensorrt_unavailable_reason() -> str | None:
    """Why the tensorrt backend cannot start here (None: it can). Tests skip with this reason."""
    try:
        require_tensorrt()
    except BackendUnavailableError as err:
        return str(err)
    return None


@dataclass(frozen=True)
class EngineSpec:
    """What an engine is built for.

    max_block_size: largest verify block (decode profile, new tokens 1 .. max_block_size).
    prefill_chunk: largest prefill piece (prefill profile); longer prompts are run in chunks.
    max_context: largest cache length (default: the model's max_position_embeddings).
    precision: 'fp16' | 'bf16' | 'fp32'. workspace_gb: TensorRT's builder workspace limit.
    """

    max_block_size: int = 16
    prefill_chunk: int = 512
    max_context: int | None = None
    precision: str = "fp16"
    workspace_gb: float = 4.0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InvalidArgumentError(f"TensorRT precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        for name in ("max_block_size", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise InvalidArgumentError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.max_context is not None and self.max_context < 2:
            raise InvalidArgumentError(f"max_context must be >= 2, got {self.max_context!r}")
        if not self.workspace_gb > 0:
            raise InvalidArgumentError(f"workspace_gb must be > 0, got {self.workspace_gb!r}")


def engine_precision(export: OnnxExport, requested: str | None = None) -> str:
    """The precision an engine of `export` is built at: `requested`, or when None the export's own
    (fp16 for a float32 export). A 16-bit export builds at its own precision only."""
    own = EXPORT_PRECISION.get(export.metadata.dtype)
    if requested is None:
        return own or FP32_EXPORT_PRECISION
    if requested not in PRECISIONS:
        raise InvalidArgumentError(f"TensorRT precision must be one of {list(PRECISIONS)}, got {requested!r}")
    if own is not None and requested != own:
        raise FailedPreconditionError(
            f"the ONNX export at '{export.directory}' is {export.metadata.dtype}, so its TensorRT engine is {own}, but "
            f"precision {requested} was asked for; export the target in {_PRECISION_DTYPE[requested]} (blockpilot export "
            f"onnx --graph portable --dtype {_PRECISION_DTYPE[requested]} --out DIR), or in float32 to build at any precision"
        )
    return requested


def _profiles(export: OnnxExport, spec: EngineSpec) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
    """min/opt/max shapes of every input, per profile: [decode, prefill]."""
    meta = export.metadata
    kv = (meta.num_hidden_layers, 1, meta.num_key_value_heads, meta.head_dim)
    context = spec.max_context or meta.max_position_embeddings
    out = []
    for low, opt, high in ((1, min(8, spec.max_block_size), spec.max_block_size),
                           (1, max(1, spec.prefill_chunk // 4), spec.prefill_chunk)):
        past_opt = min(512, context)
        out.append({
            "input_ids": ((1, low), (1, opt), (1, high)),
            "position_ids": ((1, low), (1, opt), (1, high)),
            "logit_index": ((1,), (opt,), (high,)),
            "past_keys": ((0, *kv), (past_opt, *kv), (context, *kv)),
            "past_values": ((0, *kv), (past_opt, *kv), (context, *kv)),
        })
    return out


def onnx_digest(export: OnnxExport) -> str:
    """SHA-256 of every file of the export's graph (model.onnx and its external data)."""
    digest = hashlib.sha256()
    for path in sorted(export.directory.glob("model.onnx*")):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def engine_key(export: OnnxExport, spec: EngineSpec, trt) -> tuple[str, dict]:
    """The engine cache key and what it is made of (also written beside the engine)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    parts = {
        "onnx_sha256": onnx_digest(export),
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "tensorrt": str(trt.__version__),
        "spec": dataclasses.asdict(spec),
        "profiles": _profiles(export, spec),
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]
    return key, parts


def build_engine(export: OnnxExport, spec: EngineSpec = EngineSpec(), *, cache_dir: str | Path | None = None,
                 rebuild: bool = False) -> Path:
    """Path of the serialized engine for this export and spec, built (once, under a lock) if the
    cache does not hold it."""
    trt = require_tensorrt()
    engine_precision(export, spec.precision)  # a 16-bit export at another precision is refused, before a build
    key, parts = engine_key(export, spec, trt)
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "trt"
    folder = root / key
    path = folder / ENGINE_FILE
    if path.is_file() and not rebuild:
        log.info("TensorRT engine from the cache: %s", path)
        return path
    with _lock(root / f".{key}.lock"):
        if path.is_file() and not rebuild:
            return path
        log.warning("building the TensorRT engine (%s, %s) into %s: a few minutes once", spec.precision,
                    parts["gpu"], folder)
        started = time.monotonic()
        plan = _build(trt, export, spec)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{ENGINE_FILE}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.write_bytes(plan)
        tmp.replace(path)
        info = dict(parts, export=str(export.directory), build_s=round(time.monotonic() - started, 1))
        (folder / ENGINE_INFO).write_text(json.dumps(info, indent=2) + "\n")
        log.warning("TensorRT engine built in %.0f s: %s", info["build_s"], path)
        return path


def _build(trt, export: OnnxExport, spec: EngineSpec) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(export.model_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelFormatError(f"TensorRT could not parse '{export.model_path}': {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.workspace_gb * (1 << 30)))
    if spec.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32: TF32 matmuls would round inputs to 10 bits
    else:
        config.set_flag(trt.BuilderFlag.FP16 if spec.precision == "fp16" else trt.BuilderFlag.BF16)
        pinned = _pin_fp32(trt, network)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
        log.info("TensorRT: %d layers (norm squares and means, softmax) pinned to fp32", pinned)
    for shapes in _profiles(export, spec):
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelFormatError(f"TensorRT failed to build an engine from '{export.model_path}' (see its log above)")
    return bytes(plan)


def _pin_fp32(trt, network) -> int:
    """Keep the overflow- and rounding-sensitive layers in fp32: the squares and means of RMSNorm
    (an fp16 square overflows past 256) and the attention softmax."""
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        keep = layer.type in (trt.LayerType.REDUCE, trt.LayerType.SOFTMAX)
        if layer.type == trt.LayerType.ELEMENTWISE:
            layer.__class__ = trt.IElementWiseLayer  # the Python API's way to reach the subclass fields
            keep = layer.op == trt.ElementWiseOperation.POW
        if keep:
            layer.precision = trt.float32
            for output in range(layer.num_outputs):
                layer.set_output_type(output, trt.float32)
            pinned += 1
    return pinned


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int64: torch.int64,
             trt.bfloat16: torch.bfloat16}
    if dtype not in table:
        raise ModelFormatError(f"the TensorRT engine uses an I/O type this backend does not handle: {dtype}")
    return table[dtype]


class TensorRTTarget:
    """A VerifierBackend over a TensorRT engine (see blockpilot.backends.base)."""

    backend = TENSORRT

    def __init__(self, export: OnnxExport, target: TargetModel, *, spec: EngineSpec = EngineSpec(),
                 cache_dir: str | Path | None = None, verify_weights: bool = True) -> None:
        trt = require_tensorrt()
        if verify_weights:
            check_export_matches(export, target)
        self.export = export
        self.torch_target = target
        self.config = target.config
        self.hidden_layer_ids = export.hidden_layer_ids
        self.spec = spec
        self._device = torch.device("cuda", torch.cuda.current_device())
        self.engine_path = build_engine(export, spec, cache_dir=cache_dir)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise ModelFormatError(f"TensorRT could not load the engine '{self.engine_path}' (built by another version?)")
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        missing = sorted((set(export.metadata.inputs) | set(export.metadata.outputs)) - names)
        if missing:
            raise ModelFormatError(f"the TensorRT engine '{self.engine_path}' lacks the tensors {missing}")
        self._dtypes = {name: _torch_dtype(trt, self.engine.get_tensor_dtype(name)) for name in names}
        stream = torch.cuda.current_stream(self._device)
        self._contexts = []
        for profile in range(self.engine.num_optimization_profiles):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(profile, stream.cuda_stream)
            self._contexts.append(context)
        stream.synchronize()
        # Execution contexts hold per-call shapes and addresses: one call at a time.
        self._lock = threading.Lock()
        cfg = self.config
        self._kv_shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim)
        log.info("tensorrt backend: %s (%s, %s), layers %s", self.engine_path, spec.precision,
                 torch.cuda.get_device_name(self._device), list(self.hidden_layer_ids))

    # ---- the VerifierBackend surface ------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtypes["past_keys"]

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.torch_target.norm(hidden.to(self.torch_target.device, self.torch_target.dtype))

    @property
    def lm_head(self):
        return self.torch_target.lm_head

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.torch_target.embed(tokens.to(self.torch_target.device))

    def new_cache(self, capacity: int, batch_size: int = 1) -> SeqMajorKVCache:
        if batch_size != 1:
            raise InvalidArgumentError(f"the {self.backend} backend runs batch 1, got batch_size {batch_size}")
        context = self.spec.max_context or self.export.metadata.max_position_embeddings
        if capacity > context:
            raise InvalidArgumentError(f"cache capacity {capacity} exceeds the engine's context of {context} tokens")
        cfg = self.config
        return SeqMajorKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, capacity,
                               dtype=self.dtype, device=self._device)

    def __call__(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor | None = None,
        *,
        num_logits: int | None = None,
        hidden_layer_ids: Sequence[int] = (),
        key_valid: torch.Tensor | None = None,
    ) -> ForwardOutput:
        """TargetModel.forward's contract, batch 1 (as the onnxruntime backend). Blocks of up to
        max_block_size tokens run on the decode profile; longer inputs in prefill_chunk pieces."""
        steps, start, positions, logit_index = prepare_step(self, tokens, cache, positions, num_logits,
                                                            hidden_layer_ids, key_valid)
        tokens = tokens.to(self._device).reshape(1, -1)
        first_logit = int(logit_index[0])
        chunk = self.spec.max_block_size if steps <= self.spec.max_block_size else self.spec.prefill_chunk
        pieces = []
        with self._lock:
            for begin in range(0, steps, chunk):
                end = min(begin + chunk, steps)
                # Logits of this piece's positions that are among the ones asked for (at least one
                # row: the graph always projects something).
                low = max(first_logit, begin)
                wanted = torch.arange(low - begin, end - begin, device=self._device) if low < end else \
                    torch.arange(end - begin - 1, end - begin, device=self._device)
                pieces.append((self._run(tokens[:, begin:end], positions[:, begin:end], wanted, cache, start + begin),
                               low < end))
                cache.length = start + end
        logits = torch.cat([p.logits for p, used in pieces if used], dim=1)
        final = torch.cat([p.final_state for p, _ in pieces], dim=1)
        hidden = torch.cat([p.hidden for p, _ in pieces], dim=1) if self.hidden_layer_ids else None
        return ForwardOutput(logits=logits if num_logits != 0 else None,
                             hidden=hidden if hidden_layer_ids else None, final_state=final)

    def _run(self, tokens, positions, logit_index, cache: SeqMajorKVCache, start: int) -> ForwardOutput:
        steps = tokens.shape[1]
        cfg = self.config
        profile = 0 if steps <= self.spec.max_block_size else 1
        if steps > (self.spec.max_block_size, self.spec.prefill_chunk)[profile]:
            raise InvalidArgumentError(f"{steps} tokens exceed the engine's profiles")
        context = self._contexts[profile]
        device, dtypes = self._device, self._dtypes
        inputs = {
            "input_ids": tokens.to(dtypes["input_ids"]).contiguous(),
            "position_ids": positions.to(dtypes["position_ids"]).contiguous(),
            "logit_index": logit_index.to(dtypes["logit_index"]).contiguous(),
        }
        new_k, new_v = cache.slots(start, steps)
        outputs = {
            "logits": torch.empty((1, logit_index.shape[0], cfg.vocab_size), dtype=dtypes["logits"], device=device),
            "final_state": torch.empty((1, steps, cfg.hidden_size), dtype=dtypes["final_state"], device=device),
            "new_keys": new_k, "new_values": new_v,
        }
        if self.hidden_layer_ids:
            outputs["hidden"] = torch.empty((1, steps, len(self.hidden_layer_ids) * cfg.hidden_size),
                                            dtype=dtypes["hidden"], device=device)
        for name, tensor in inputs.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        # The committed slots start at the buffer's start; binding the buffer (not the slice) also
        # gives an empty past (prefill) a valid address (an empty tensor's data_ptr() is 0).
        for name, buffer in (("past_keys", cache.key_buffer), ("past_values", cache.value_buffer)):
            context.set_input_shape(name, (start, *self._kv_shape))
            context.set_tensor_address(name, buffer.data_ptr())
        for name, tensor in outputs.items():
            context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream(device)
        if not context.execute_async_v3(stream.cuda_stream):
            raise BlockPilotError(f"TensorRT execution failed ({steps} tokens on a cache of {start}); see its log")
        return ForwardOutput(outputs["logits"], outputs.get("hidden"), outputs["final_state"])
