"""The `onnxruntime` verifier backend: the exported target graph run by ONNX Runtime.

Execution providers: CPU here; CUDA when onnxruntime-gpu and a CUDA torch are present ("auto"
picks it then); TensorRT through ONNX Runtime on request (`provider="tensorrt"`, with optimization
profiles for the block sizes and cache lengths it will see).

Copies: the KV cache is a SeqMajorKVCache. Each step binds (IO binding) the graph's `past_*` inputs
to the cache's first `length` slots and its `new_*` outputs to the slots right after them, and the
logits / hidden / final-state outputs to tensors allocated for the step, all through raw pointers on
the cache's device; so the cache is neither copied in nor out between steps, and the step's outputs
are torch tensors without a conversion. (On CPU, plain `session.run` with numpy views measured about
the same per step for the default model, since ONNX Runtime also wraps contiguous numpy inputs
without a copy; `io_binding=False` keeps that path for comparison and for runtimes where binding is
unavailable.)

The embedding table, the final norm and the output projection that the drafter and the policy
feature use outside the graph stay those of the torch TargetModel this backend was built from.

Dtypes: the export's (export.json), for the cache, the step's outputs and the bindings. ONNX
Runtime's CPU provider runs float32 and float16 graphs but has no bfloat16 kernels (1.32: not even
Mul); a bfloat16 export is refused there with what runs it instead (CPU_DTYPES, checked by
tests/unit/test_export_dtype.py against the installed onnxruntime).
"""

from __future__ import annotations

import logging
import threading
from typing import Sequence

import numpy as np
import torch

from blockpilot.backends.base import ONNXRUNTIME, BackendUnavailableError, TorchTargetParts, check_layers_match
from blockpilot.backends.cache import SeqMajorKVCache
from blockpilot.backends.onnx_export import DTYPE_PRECISION, OnnxExport, check_export_matches
from blockpilot.errors import InvalidArgumentError
from blockpilot.models.kv_cache import KVCache
from blockpilot.models.target import ForwardOutput, TargetModel

log = logging.getLogger(__name__)

PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
_ORT_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
CPU_DTYPES = ("float32", "float16")
# onnx.TensorProto's element types, which IO binding takes for any dtype (numpy has no bfloat16).
_ONNX_ELEMENT_TYPE = {"float32": 1, "float16": 10, "bfloat16": 16}


def provider_dtype_problem(provider: str, dtype: str) -> str | None:
    """Why ONNX Runtime's `provider` cannot run a `dtype` graph, or None."""
    if provider == "cpu" and dtype not in CPU_DTYPES:
        return f"ONNX Runtime's CPU provider has no {dtype} kernels (it runs {' and '.join(CPU_DTYPES)} graphs)"
    return None


def check_provider_dtype(provider: str, dtype: str) -> None:
    """BackendUnavailableError when `provider` cannot run a `dtype` graph, saying what runs it."""
    problem = provider_dtype_problem(provider, dtype)
    if problem:
        raise BackendUnavailableError(f"the onnxruntime backend cannot run a {dtype} graph here: {problem}; run it with "
                                      f"provider cuda (onnxruntime-gpu on an NVIDIA GPU), backend tensorrt, or backend "
                                      f"torch with dtype {dtype}")


def _import_ort():
    try:
        import onnxruntime
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise BackendUnavailableError(f"the onnxruntime backend needs the 'onnxruntime' package: {err}") from None
    return onnxruntime


def choose_provider(requested: str) -> str:
    """'auto' -> 'cuda' when ONNX Runtime has the CUDA provider *and* torch sees a GPU (the cache
    lives in torch CUDA memory), else 'cpu'. An explicit GPU provider that cannot run is an error,
    never a silent CPU run."""
    if requested not in PROVIDERS:
        raise InvalidArgumentError(f"unknown ONNX Runtime provider {requested!r} (choose one of {', '.join(PROVIDERS)})")
    available = _import_ort().get_available_providers()
    gpu = torch.cuda.is_available()
    if requested == "auto":
        if "CUDAExecutionProvider" in available and gpu:
            return "cuda"
        if "CUDAExecutionProvider" in available:
            log.warning("ONNX Runtime has the CUDA provider but torch sees no GPU: running on CPU")
        return "cpu"
    if requested != "cpu":
        if _ORT_PROVIDER[requested] not in available:
            raise BackendUnavailableError(
                f"ONNX Runtime provider {_ORT_PROVIDER[requested]} is not available (this onnxruntime has "
                f"{', '.join(available)}); install the gpu extra (onnxruntime-gpu) on a machine with a GPU"
            )
        if not gpu:
            raise BackendUnavailableError(f"the ONNX Runtime {requested} provider needs a CUDA GPU visible to torch; none is")
    return requested


class OnnxRuntimeTarget(TorchTargetParts):
    """A VerifierBackend over an ONNX export (see blockpilot.backends.base)."""

    backend = ONNXRUNTIME

    def __init__(
        self,
        export: OnnxExport,
        target: TargetModel,
        *,
        provider: str = "auto",
        threads: int | None = None,
        io_binding: bool = True,
        verify_weights: bool = True,
        max_block_size: int = 16,
        trt_cache_dir: str | None = None,
        profile_prefix: str | None = None,
    ) -> None:
        """export: an export of exactly this target (checked: architecture and weights digest, unless
        verify_weights=False, used by the exporter's own check on an export it just made).
        threads: ONNX Runtime intra-op threads (default: torch's thread count, so both backends
        compare on equal terms). max_block_size / trt_cache_dir: only for provider='tensorrt'.
        profile_prefix: record ONNX Runtime's per-node profile into '<prefix>_<date>.json'
        (`self.session.end_profiling()` closes it and returns its path; benchmarks/engine.py)."""
        ort = _import_ort()
        if verify_weights:
            check_export_matches(export, target)
        self.export = export
        self.torch_target = target
        self.config = target.config
        self.hidden_layer_ids = export.hidden_layer_ids
        self.provider = choose_provider(provider)
        dtype = export.metadata.dtype
        check_provider_dtype(self.provider, dtype)
        if dtype == "bfloat16" and not io_binding:
            raise InvalidArgumentError("a bfloat16 export runs with IO binding only (numpy, which session.run takes, "
                                       "has no bfloat16)")
        self._dtype, self._element_type = getattr(torch, dtype), _ONNX_ELEMENT_TYPE[dtype]
        self.precision = DTYPE_PRECISION[dtype]
        self._device = torch.device("cuda" if self.provider in ("cuda", "tensorrt") else "cpu")
        self._ort_device = "cuda" if self._device.type == "cuda" else "cpu"
        self.io_binding = io_binding
        options = ort.SessionOptions()
        self.threads = threads or torch.get_num_threads()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if profile_prefix:
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        cfg = self.config
        self._kv_shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim)
        providers = self._providers(max_block_size, trt_cache_dir)
        try:
            self.session = ort.InferenceSession(str(export.model_path), options, providers=providers)
        except ort.capi.onnxruntime_pybind11_state.NotImplemented as err:
            # A provider without a kernel for one of the graph's ops at its dtype (said per node).
            raise BackendUnavailableError(
                f"ONNX Runtime {ort.__version__} cannot run the {dtype} export at '{export.directory}' on the "
                f"{self.provider} provider: {str(err).strip().splitlines()[0]}; use backend tensorrt or torch"
            ) from None
        wanted = _ORT_PROVIDER[self.provider]
        if wanted not in self.session.get_providers():
            # ONNX Runtime only warns when a GPU provider fails to load (missing CUDA / cuDNN /
            # TensorRT libraries) and runs on CPU instead; the cache lives on the GPU, so say so.
            raise BackendUnavailableError(
                f"ONNX Runtime could not start {wanted} (it runs {', '.join(self.session.get_providers())}; see its "
                f"warning above, usually missing CUDA/cuDNN libraries); use the 'cpu' provider or fix the GPU install"
            )
        self._outputs = tuple(o.name for o in self.session.get_outputs())
        self._local = threading.local()
        log.info("onnxruntime backend: %s on %s (%s), %d threads, layers %s", export.model_path,
                 ", ".join(self.session.get_providers()), "io binding" if io_binding else "session.run",
                 options.intra_op_num_threads, list(self.hidden_layer_ids))

    def _providers(self, max_block_size: int, trt_cache_dir: str | None) -> list:
        if self.provider == "cpu":
            return ["CPUExecutionProvider"]
        device_id = torch.cuda.current_device()
        cuda = ("CUDAExecutionProvider", {"device_id": device_id})
        if self.provider == "cuda":
            return [cuda, "CPUExecutionProvider"]
        # TensorRT through ONNX Runtime: without explicit profiles it would rebuild its engine for
        # every new cache length (every step), so give it one profile spanning all of them.
        cfg = self.config
        kv = "x".join(str(d) for d in self._kv_shape)
        context = cfg.max_position_embeddings

        def shapes(steps: int, past: int) -> str:
            return ",".join([f"input_ids:1x{steps}", f"position_ids:1x{steps}", f"logit_index:{steps}",
                             f"past_keys:{past}x{kv}", f"past_values:{past}x{kv}"])

        trt_options = {
            "device_id": device_id, "trt_fp16_enable": True, "trt_engine_cache_enable": True,
            "trt_engine_cache_path": trt_cache_dir or str(self.export.directory / "ort-trt-cache"),
            "trt_profile_min_shapes": shapes(1, 0), "trt_profile_opt_shapes": shapes(max_block_size, 512),
            "trt_profile_max_shapes": shapes(max(max_block_size, 512), context),
        }
        return [("TensorrtExecutionProvider", trt_options), cuda, "CPUExecutionProvider"]

    # ---- the VerifierBackend surface ------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def new_cache(self, capacity: int, batch_size: int = 1) -> SeqMajorKVCache:
        if batch_size != 1:
            raise InvalidArgumentError(f"the {self.backend} backend runs batch 1, got batch_size {batch_size}")
        cfg = self.config
        return SeqMajorKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, capacity,
                               dtype=self._dtype, device=self._device)

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
        """TargetModel.forward's contract, batch 1. Differences: with num_logits=0 every layer still
        runs (the graph is one piece) and the cache is valid for all of them; hidden_layer_ids must
        be the export's layers (or none)."""
        steps, start, positions, logit_index = prepare_step(self, tokens, cache, positions, num_logits,
                                                            hidden_layer_ids, key_valid)
        cfg = self.config
        device = self._device
        dtype = self._dtype
        logits = torch.empty((1, logit_index.shape[0], cfg.vocab_size), dtype=dtype, device=device)
        final = torch.empty((1, steps, cfg.hidden_size), dtype=dtype, device=device)
        hidden = (torch.empty((1, steps, len(self.hidden_layer_ids) * cfg.hidden_size), dtype=dtype, device=device)
                  if self.hidden_layer_ids else None)
        tokens = tokens.to(device=device, dtype=torch.long).contiguous()
        if self.io_binding:
            self._run_bound(tokens, positions, logit_index, cache, start, steps, logits, hidden, final)
        else:
            self._run_plain(tokens, positions, logit_index, cache, start, steps, logits, hidden, final)
        cache.length = start + steps
        return ForwardOutput(
            logits=logits if num_logits != 0 else None,
            hidden=hidden if hidden_layer_ids else None,
            final_state=final,
        )

    def _binding(self):
        binding = getattr(self._local, "binding", None)
        if binding is None:  # one per thread: the verifier decodes several streams at once
            binding = self._local.binding = self.session.io_binding()
        return binding

    def _run_bound(self, tokens, positions, logit_index, cache, start, steps, logits, hidden, final) -> None:
        binding = self._binding()
        dev = self._ort_device
        index = self._device.index or 0
        new_k, new_v = cache.slots(start, steps)
        binding.bind_input("input_ids", dev, index, np.int64, tuple(tokens.shape), tokens.data_ptr())
        binding.bind_input("position_ids", dev, index, np.int64, tuple(positions.shape), positions.data_ptr())
        binding.bind_input("logit_index", dev, index, np.int64, tuple(logit_index.shape), logit_index.data_ptr())
        # The committed slots start at the buffer's start; binding the buffer (not the slice) also
        # gives an empty past (prefill) a valid address (an empty tensor's data_ptr() is 0).
        element = self._element_type
        binding.bind_input("past_keys", dev, index, element, (start, *self._kv_shape), cache.key_buffer.data_ptr())
        binding.bind_input("past_values", dev, index, element, (start, *self._kv_shape), cache.value_buffer.data_ptr())
        outputs = {"logits": logits, "hidden": hidden, "final_state": final, "new_keys": new_k, "new_values": new_v}
        for name in self._outputs:
            tensor = outputs[name]
            binding.bind_output(name, dev, index, element, tuple(tensor.shape), tensor.data_ptr())
        if dev == "cuda":
            # Inputs were written by torch on its current stream; ONNX Runtime runs on its own.
            torch.cuda.current_stream().synchronize()
        binding.synchronize_inputs()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    def _run_plain(self, tokens, positions, logit_index, cache, start, steps, logits, hidden, final) -> None:
        past_k, past_v = cache.past(start)
        feeds = {"input_ids": tokens.cpu().numpy(), "position_ids": positions.cpu().numpy(),
                 "logit_index": logit_index.cpu().numpy(), "past_keys": past_k.cpu().numpy(),
                 "past_values": past_v.cpu().numpy()}
        results = dict(zip(self._outputs, self.session.run(list(self._outputs), feeds)))
        new_k, new_v = cache.slots(start, steps)
        targets = {"logits": logits, "hidden": hidden, "final_state": final, "new_keys": new_k, "new_values": new_v}
        for name, value in results.items():
            targets[name].copy_(torch.from_numpy(value))


def prepare_step(backend, tokens, cache, positions, num_logits, hidden_layer_ids, key_valid):
    """Checks and inputs shared by the graph backends: returns (steps, start, positions [1, T] int64,
    logit_index [N] int64) on the backend's device, with the cache's room for the tokens reserved."""
    if key_valid is not None:
        raise InvalidArgumentError(f"the {backend.backend} backend runs one unpadded sequence: key_valid is not supported")
    if tokens.dim() != 2 or tokens.shape[0] != 1 or tokens.shape[1] < 1:
        raise InvalidArgumentError(f"the {backend.backend} backend takes tokens of shape [1, T>=1], got {tuple(tokens.shape)}")
    if not isinstance(cache, SeqMajorKVCache):
        raise InvalidArgumentError(
            f"the {backend.backend} backend needs a cache made by its own new_cache() (SeqMajorKVCache), got {type(cache).__name__}"
        )
    if hidden_layer_ids and tuple(hidden_layer_ids) != tuple(backend.hidden_layer_ids):
        check_layers_match(backend.hidden_layer_ids, hidden_layer_ids, str(backend.export.directory))
    if num_logits is not None and num_logits < 0:
        raise InvalidArgumentError(f"num_logits must be >= 0 or None, got {num_logits}")
    steps = tokens.shape[1]
    start = cache.reserve(steps)
    device = backend.device
    if positions is None:
        positions = torch.arange(start, start + steps, device=device)
    positions = positions.to(device=device, dtype=torch.long).reshape(-1)
    if positions.shape[0] != steps:
        raise InvalidArgumentError(f"positions must give one position per token ({steps}), got {positions.shape[0]}")
    # num_logits=0 still computes one row (the graph always projects something); it is not returned.
    wanted = steps if num_logits is None else min(max(num_logits, 1), steps)
    logit_index = torch.arange(steps - wanted, steps, device=device)
    return steps, start, positions[None].contiguous(), logit_index
