"""The `onnxruntime` backend on the CPU: the fused graph (blockpilot.backends.fused_graph), fp32 or int4.

Each pass runs one sequence: its K/V is written in place into the engine's own layer-major cache
(KVCache, each layer bound as that layer's past and present: nothing is copied between steps).
Why not a batch of sessions like the torch engine's ragged one: GroupQueryAttention on the CPU
takes several sequences only one token each ("batch_size must be 1 when sequence_length > 1 and
past context is given", ONNX Runtime 1.32), and a verify block is several tokens. Nor one token of
each session in one pass: that runs GroupQueryAttention's one-token path, whose numbers differ from
its multi-token path (measured on a tiny test model: 2e-6 in fp32 logits, ~0.1 at int4, where the
activations' 8-bit rounding amplifies it), so a session's tokens would depend on the batch. The scheduler runs one
pass per session on this backend (BatchDecoder without ragged batches).

Row invariance, the property losslessness rests on: a token's logits must not depend on how many
other tokens share its pass (how a verify block or a prefill is cut). Measured on this graph with
the default model (AVX-512 Zen 4, benchmarks/engine.py): every pass of 2 or more tokens gives each
token exactly the same numbers, but a pass of a single token takes other kernels (MatMulNBits' and
the fp32 GEMM's one-row paths, GroupQueryAttention's one-token path) and differs (fp32: 3.7e-5 in
the logits; int4: 1.97, its one-row path quantizes the activations differently). So a pass never
runs one token: a lone token is padded with a second one, written past the sequence's end and never
read (one slot of headroom in every cache this backend makes; 10-15 % on a one-token step).
Whether the CPU at hand keeps rows invariant is checked when the backend starts
(check_row_invariance), not assumed: kernels are chosen by CPU features.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch

from blockpilot.backends.base import ONNXRUNTIME, TorchTargetParts, check_layers_match
from blockpilot.backends.onnx_export import OnnxExport, check_export_matches
from blockpilot.errors import FailedPreconditionError, InvalidArgumentError, ResourceExhaustedError
from blockpilot.models.kv_cache import BatchKVCache, KVCache
from blockpilot.models.target import ForwardOutput, TargetModel

log = logging.getLogger(__name__)

MIN_PASS_ROWS = 2  # token rows per pass, at least (see the module docstring)


class HeadroomKVCache(KVCache):
    """A KVCache with `headroom` physical slots past its capacity, where a padded pass writes."""

    headroom = 1

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        layers, batch, heads, capacity, dim = shape
        return super()._allocate((layers, batch, heads, capacity + self.headroom, dim), dtype, device)


class FusedOnnxRuntimeTarget(TorchTargetParts):
    """A VerifierBackend (see blockpilot.backends.base) over a fused export, on the CPU."""

    backend = ONNXRUNTIME

    def __init__(self, export: OnnxExport, target: TargetModel, *, threads: int | None = None,
                 verify_weights: bool = True, check_rows: bool = True, pad_single_tokens: bool = True) -> None:
        """export: a fused export of exactly this target (checked unless verify_weights=False).
        check_rows: run check_row_invariance() once (refuses to start when rows are not invariant).
        pad_single_tokens: False runs a lone token as a one-row pass (only to measure what the
        padding buys: benchmarks/engine.py); such a backend is not row-invariant and not checked."""
        import onnxruntime as ort

        if export.metadata.graph != "fused":
            raise InvalidArgumentError(f"'{export.directory}' holds a {export.metadata.graph} graph, not a fused one")
        if verify_weights:
            check_export_matches(export, target)
        self.export = export
        self.torch_target = target
        self.config = target.config
        self.hidden_layer_ids = export.hidden_layer_ids
        self.precision = export.metadata.precision
        self.provider = "cpu"
        options = ort.SessionOptions()
        self.threads = threads or torch.get_num_threads()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(export.model_path), options, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._min_rows = MIN_PASS_ROWS if pad_single_tokens else 1
        log.info("onnxruntime backend: fused %s graph %s, %d threads, layers %s", self.precision, export.model_path,
                 self.threads, list(self.hidden_layer_ids))
        if check_rows and pad_single_tokens:
            check_row_invariance(self)

    # ---- the VerifierBackend surface ------------------------------------------------------------

    @property
    def verify_cost(self) -> dict[int, float] | None:
        """A verify pass of k tokens relative to one token, k = 1..12, as measured when this graph
        was exported (None for an export without the measurement)."""
        measured = self.export.metadata.verify_cost_ms
        if not measured:
            return None
        return {int(k): v / measured["1"] for k, v in measured.items()}

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def new_cache(self, capacity: int, batch_size: int = 1) -> KVCache:
        cfg = self.config
        return HeadroomKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, capacity, batch_size=batch_size)

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
        """TargetModel.forward's contract, one sequence. Differences: positions must be the slots'
        own (the default); every layer runs whatever num_logits says; hidden_layer_ids must be the
        export's layers (or none); key_valid is not supported."""
        if key_valid is not None:
            raise InvalidArgumentError("the onnxruntime backend runs unpadded sequences: key_valid is not supported")
        if hidden_layer_ids and tuple(hidden_layer_ids) != tuple(self.hidden_layer_ids):
            check_layers_match(self.hidden_layer_ids, hidden_layer_ids, str(self.export.directory))
        if num_logits is not None and num_logits < 0:
            raise InvalidArgumentError(f"num_logits must be >= 0 or None, got {num_logits}")
        if tokens.dim() != 2 or tokens.shape[1] < 1:
            raise InvalidArgumentError(f"tokens must have shape [B, T>=1], got {tuple(tokens.shape)}")
        tokens = tokens.to(dtype=torch.long, device="cpu")
        rows, steps = tokens.shape
        if rows != 1 or isinstance(cache, BatchKVCache) or cache.keys.shape[1] != 1:
            raise InvalidArgumentError(f"the onnxruntime backend runs one sequence ([1, T] tokens, a one-row cache), got {tuple(tokens.shape)}")
        start = cache.reserve(steps)
        self._check_positions(positions, torch.arange(start, start + steps))
        wanted = steps if num_logits is None else min(max(num_logits, 1), steps)
        out = self._run(tokens, cache, start, torch.arange(steps - wanted, steps))
        cache.length = start + steps
        return ForwardOutput(logits=out["logits"][None] if num_logits != 0 else None,
                             hidden=out["hidden"][:, :steps] if hidden_layer_ids else None,
                             final_state=out["final_state"][:, :steps])

    @staticmethod
    def _check_positions(given: torch.Tensor | None, slots: torch.Tensor) -> None:
        if given is not None and not torch.equal(given.reshape(-1).cpu(), slots.reshape(-1)):
            raise InvalidArgumentError("the onnxruntime backend places tokens at their cache slots: positions other than the slots are not supported")

    def _run(self, tokens: torch.Tensor, cache: KVCache, start: int, picks: torch.Tensor) -> dict[str, torch.Tensor]:
        """One session run: tokens [1, T] at slots start.. of `cache`, logits of the token indices
        `picks`. A single token is padded with a second (see the module docstring)."""
        steps = tokens.shape[1]
        if steps < self._min_rows:
            tokens = torch.cat([tokens, tokens], dim=1)
            steps += 1
        physical = cache.keys.shape[3]
        if start + steps > physical:
            raise ResourceExhaustedError(
                f"KV cache full: a pass of {steps} tokens at slot {start} exceeds the {physical} slots of the cache"
            )
        cfg = self.config
        feeds = {  # the graph's contract (fused_graph): seqlens_k is the cache length after the pass - 1
            "input_ids": tokens.contiguous(),
            "seqlens_k": torch.tensor([start + steps - 1], dtype=torch.int32),
            "total_sequence_length": torch.tensor(start + steps, dtype=torch.int32),
            "logit_index": picks.to(torch.long).contiguous(),
        }
        out = {"logits": torch.empty((picks.shape[0], cfg.vocab_size)),
               "final_state": torch.empty((1, steps, cfg.hidden_size))}
        if self.hidden_layer_ids:
            out["hidden"] = torch.empty((1, steps, len(self.hidden_layer_ids) * cfg.hidden_size))
        binding = self.session.io_binding()
        for name, tensor in feeds.items():
            dtype = np.int32 if tensor.dtype == torch.int32 else np.int64
            binding.bind_input(name, "cpu", 0, dtype, tuple(tensor.shape), tensor.data_ptr())
        for name, tensor in out.items():
            binding.bind_output(name, "cpu", 0, np.float32, tuple(tensor.shape), tensor.data_ptr())
        shape = (1, cfg.num_key_value_heads, physical, cfg.head_dim)
        for layer in range(cfg.num_hidden_layers):
            for kind, buffer in (("key", cache.keys[layer]), ("value", cache.values[layer])):
                # Past and present bound to the same memory: GroupQueryAttention writes in place.
                binding.bind_input(f"past_{kind}_{layer}", "cpu", 0, np.float32, shape, buffer.data_ptr())
                binding.bind_output(f"present_{kind}_{layer}", "cpu", 0, np.float32, shape, buffer.data_ptr())
        self.session.run_with_iobinding(binding)
        return out


@torch.inference_mode()
def check_row_invariance(backend: FusedOnnxRuntimeTarget, *, prompt_len: int = 5, block: int = 4) -> None:
    """Refuse to run when a token's logits depend on the pass it shares (see the module docstring):
    a block of `block` tokens after a prefill must give exactly the logits of the same tokens one
    at a time and in two halves. About 10 small passes."""
    generator = torch.Generator().manual_seed(1234)
    vocab = backend.config.vocab_size
    prompt = torch.randint(vocab, (1, prompt_len), generator=generator)
    tokens = torch.randint(vocab, (1, block), generator=generator)
    cache = backend.new_cache(prompt_len + block + 1)
    backend(prompt, cache)
    together = backend(tokens, cache).logits[0]
    cache.truncate(prompt_len)
    alone = torch.cat([backend(tokens[:, i : i + 1], cache).logits[0] for i in range(block)])
    cache.truncate(prompt_len)
    half = block // 2
    halves = torch.cat([backend(tokens[:, :half], cache).logits[0], backend(tokens[:, half:], cache).logits[0]])
    worst = max(float((alone - together).abs().max()), float((halves - together).abs().max()))
    if worst != 0.0:
        raise FailedPreconditionError(
            f"on this CPU the {backend.precision} graph gives a token other logits in a pass of several tokens than "
            f"alone (largest difference {worst:.3g}), so speculative output could differ from block size 1: "
            f"run the torch backend, or report this CPU"
        )
    log.info("row invariance checked: a block, its halves and single tokens give identical logits")
