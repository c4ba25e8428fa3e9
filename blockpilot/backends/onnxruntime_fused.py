"""The `onnxruntime` backend on the CPU: the fused graph (blockpilot.backends.fused_graph), fp32 or int4.

A pass runs one sequence, or several sessions' sequences together (continuous batching: the
BatchDecoder's ragged steps). Every sequence's K/V is written in place into the engine's own
layer-major cache (each layer bound as that layer's past and present: nothing is copied between
steps): a KVCache of its own for one sequence, a row of a BatchKVCache pool for a batch.

How a batch runs: GroupQueryAttention on the CPU takes several sequences only one token each
("batch_size must be 1 when sequence_length > 1 and past context is given", ONNX Runtime 1.32),
a verify block is several tokens, and its one-token path computes other numbers than its
multi-token path (2e-6 in fp32 logits, ~0.1 at int4 on a tiny test model). So a batch of S
sessions runs the sessions graph (fused_graph.sessions_graph): the matmuls (the weights' reads,
most of a step) once over all the sessions' tokens packed, and per layer one GroupQueryAttention per
session over its own tokens and its own pool row, exactly the node a one-session pass runs. One
graph per batch size, written beside the export and loaded the first time that size runs.

Row invariance, the property losslessness rests on: a token's logits must not depend on how many
other tokens share its pass (how a verify block or a prefill is cut, which sessions share the
batch). Measured on this graph with the default model (AVX-512 Zen 4, benchmarks/engine.py):
every pass of 2 or more tokens gives each token exactly the same numbers, but a pass of a single
token takes other kernels (MatMulNBits' and the fp32 GEMM's one-row paths, GroupQueryAttention's
one-token path) and differs (fp32: 3.7e-5 in the logits; int4: 1.97, its one-row path quantizes the
activations differently). So no sequence ever runs a single token through one-token attention: a
lone token is padded with a second one, written past the sequence's end and never read (one slot of
headroom in every cache this backend makes). Whether the CPU at hand keeps rows invariant, alone
and in a batch, is checked when the backend starts (check_row_invariance), not assumed: kernels are
chosen by CPU features.

The pad row is not free where the matmuls' cost grows with their rows (int4 with int8 activations:
a 2-row pass costs about twice a 1-row one on an AVX-512 Xeon). On some CPUs the one-row matmul
gives exactly the numbers of a row in a larger pass (measured: Xeon family 6 model 207); there a
lone token runs the sessions graph as one session of one token (its attention still sees two
rows), so its matmuls run one row, and the sequence's blocks run that graph too (one
InferenceSession per sequence's passes: see __call__). Checked at start-up (lone_rows_match), used
only where exact; the export records the lone pass's cost beside the padded curve so the step
planner prices it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Mapping, Sequence

import numpy as np
import torch

from blockpilot.backends.base import ONNXRUNTIME, TorchTargetParts, check_layers_match
from blockpilot.backends.onnx_export import OnnxExport, check_export_matches
from blockpilot.errors import FailedPreconditionError, InvalidArgumentError, ResourceExhaustedError
from blockpilot.models.kv_cache import BatchKVCache, KVCache
from blockpilot.models.target import ForwardOutput, TargetModel

log = logging.getLogger(__name__)

MIN_PASS_ROWS = 2  # token rows per pass, at least (see the module docstring)


class _Headroom:
    """Caches with `headroom` physical slots past their capacity, where a padded pass writes."""

    headroom = 1

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        layers, batch, heads, capacity, dim = shape
        return super()._allocate((layers, batch, heads, capacity + self.headroom, dim), dtype, device)


class HeadroomKVCache(_Headroom, KVCache):
    """A one-sequence KVCache with headroom."""


class HeadroomBatchKVCache(_Headroom, BatchKVCache):
    """A BatchKVCache pool whose rows have headroom."""


class FusedOnnxRuntimeTarget(TorchTargetParts):
    """A VerifierBackend (see blockpilot.backends.base) over a fused export, on the CPU."""

    backend = ONNXRUNTIME
    supports_ragged_batch = True  # several sessions per pass (the sessions graphs)

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
        self._options = options
        self.session = ort.InferenceSession(str(export.model_path), options, providers=["CPUExecutionProvider"])
        self._sessions_graphs: dict[int, object] = {}  # batch size -> InferenceSession of its sessions graph
        self._bindings: dict[int, tuple[tuple, object]] = {}  # batch size -> (pool key, IOBinding): see _pool_binding
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._min_rows = MIN_PASS_ROWS if pad_single_tokens else 1
        # Whether a lone token runs its matmuls as one row (lone_rows_match: kernels differ by CPU);
        # never without the check, which needs the rest of the graph row-invariant first.
        self.lone_rows_invariant = False
        log.info("onnxruntime backend: fused %s graph %s, %d threads, layers %s", self.precision, export.model_path,
                 self.threads, list(self.hidden_layer_ids))
        if check_rows and pad_single_tokens:
            check_row_invariance(self)
            self.lone_rows_invariant = lone_rows_match(self)
            log.info("a lone token's one-row matmuls give %s numbers on this CPU: lone tokens run %s",
                     "the same" if self.lone_rows_invariant else "other",
                     "unpadded" if self.lone_rows_invariant else "padded to two rows")

    # ---- the VerifierBackend surface ------------------------------------------------------------

    @property
    def verify_cost(self) -> dict[int, float] | None:
        """A verify pass of k tokens relative to one token, k = 1..12, as measured when this graph
        was exported at this backend's thread count (or the nearest one measured) and as this
        backend runs its passes: the unpadded curve (every pass on the sessions graph) where it
        runs lone tokens unpadded (lone_rows_invariant), else the padded one; None for an export
        without the measurement."""
        metadata = self.export.metadata
        curves = metadata.unpadded_cost_ms if self.lone_rows_invariant and metadata.unpadded_cost_ms else metadata.verify_cost_ms
        if not curves:
            return None
        measured = {int(k): v for k, v in curves[nearest_measured(curves, self.threads)].items()}
        return {k: v / measured[1] for k, v in measured.items()}

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def new_cache(self, capacity: int, batch_size: int = 1) -> KVCache:
        cfg = self.config
        return HeadroomKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, capacity, batch_size=batch_size)

    def new_batch_cache(self, capacity: int, max_rows: int) -> BatchKVCache:
        """A pool of `max_rows` sequences of up to `capacity` tokens each (see BatchKVCache)."""
        cfg = self.config
        return HeadroomBatchKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, capacity, batch_size=max_rows)

    def __call__(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor | None = None,
        *,
        num_logits: int | None = None,
        hidden_layer_ids: Sequence[int] = (),
        key_valid: torch.Tensor | None = None,
        row_widths: Sequence[int] | None = None,
    ) -> ForwardOutput:
        """TargetModel.forward's contract: one sequence, or a ragged batch over a BatchKVCache pool
        (row_widths). Differences: positions must be the slots' own (the default); every layer
        runs whatever num_logits says; hidden_layer_ids must be the export's layers (or none);
        key_valid is not supported; a ragged batch gives logits of all its tokens unless
        num_logits is 0."""
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
        if isinstance(cache, BatchKVCache):
            if positions is not None:
                raise InvalidArgumentError("the onnxruntime backend places tokens at their cache slots: positions are not supported in a batch")
            return self._ragged(tokens, cache, num_logits, bool(hidden_layer_ids), row_widths)
        if rows != 1 or cache.keys.shape[1] != 1:
            raise InvalidArgumentError(f"the onnxruntime backend runs one sequence ([1, T] tokens, a one-row cache), got {tuple(tokens.shape)}")
        start = cache.reserve(steps)
        self._check_positions(positions, torch.arange(start, start + steps))
        wanted = steps if num_logits is None else min(max(num_logits, 1), steps)
        if self.lone_rows_invariant:
            # A lone token runs the sessions graph unpadded (see lone_rows_match); so do blocks, so
            # that a request's passes all run one InferenceSession: alternating two, each with its
            # own intra-op threads, lets the idle one's threads spin on the cores the other needs
            # (measured on a 2-core Zen 4 at 2 threads, default path: 137 tok/s on one session,
            # 131 alternating; plain decoding runs one either way).
            out = self._run_sessions(tokens, cache, [start], [steps], torch.arange(steps - wanted, steps))
        else:
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
        _bind(binding, feeds, out)
        shape = (1, cfg.num_key_value_heads, physical, cfg.head_dim)
        for layer in range(cfg.num_hidden_layers):
            for kind, buffer in (("key", cache.keys[layer]), ("value", cache.values[layer])):
                # Past and present bound to the same memory: GroupQueryAttention writes in place.
                binding.bind_input(f"past_{kind}_{layer}", "cpu", 0, np.float32, shape, buffer.data_ptr())
                binding.bind_output(f"present_{kind}_{layer}", "cpu", 0, np.float32, shape, buffer.data_ptr())
        self.session.run_with_iobinding(binding)
        return out

    # ---- several sessions per pass --------------------------------------------------------------

    def _ragged(self, tokens: torch.Tensor, pool: BatchKVCache, num_logits: int | None, want_hidden: bool,
                row_widths: Sequence[int] | None) -> ForwardOutput:
        """A ragged step (see TargetModel.forward): row b's first row_widths[b] tokens at its pool
        row's slots, all rows in one run of the sessions graph; outputs packed [1, N, ...]."""
        batch, steps = tokens.shape
        if batch != pool.rows_in_use or batch < 1:
            raise InvalidArgumentError(f"a ragged forward takes one row per pool row in use ({pool.rows_in_use}), got {batch}")
        widths = list(row_widths) if row_widths is not None else [steps] * batch
        if len(widths) != batch or min(widths) < 1 or max(widths) > steps:
            raise InvalidArgumentError(f"row_widths must give 1..{steps} tokens for each of the {batch} rows, got {widths}")
        starts = pool.reserve_rows(torch.tensor(widths))
        if sum(widths) < self._min_rows and not self.lone_rows_invariant:
            # One lone token in all: the matmuls would run one row (other kernels, other numbers),
            # so it runs as a one-sequence pass on its pool row, padded (see the module docstring).
            row = pool.row(0)
            out = self._run(tokens[:1, :1], row, int(starts[0]), torch.arange(1))
            pool.lengths[0] += 1
            return ForwardOutput(logits=out["logits"][None] if num_logits != 0 else None,
                                 hidden=out["hidden"][:, :1] if want_hidden and "hidden" in out else None,
                                 final_state=out["final_state"][:, :1])
        # No padding: the sessions graph gives each session's attention a copy of its last token
        # (written past the row's end, never read; see fused_graph.sessions_graph).
        packed = torch.cat([tokens[b, : w] for b, w in enumerate(widths)])
        picks = torch.arange(packed.shape[0]) if num_logits != 0 else torch.arange(0)
        out = self._run_sessions(packed[None], pool, starts.tolist(), widths, picks)
        pool.lengths[:batch] += torch.tensor(widths)
        return ForwardOutput(logits=out["logits"][None] if num_logits != 0 else None,
                             hidden=out["hidden"] if want_hidden and "hidden" in out else None,
                             final_state=out["final_state"])

    def prepare_ragged_batches(self, max_sessions: int) -> None:
        """Load the sessions graphs for 1..max_sessions sessions per pass now. Loaded on first use
        instead, each (0.3-1.2 s for the default model on a 2-core Zen 4) stalls every session of
        the batch the first time the batch reaches its size; each costs its own copy of the
        prepacked weights (~150 MB there)."""
        began = time.perf_counter()
        for sessions in range(1, max_sessions + 1):
            self._sessions_session(sessions)
        log.info("onnxruntime backend: sessions graphs for 1..%d sessions per pass ready in %.1f s", max_sessions,
                 time.perf_counter() - began)

    def _sessions_session(self, sessions: int):
        """The InferenceSession of the graph for `sessions` sequences (written once per export)."""
        session = self._sessions_graphs.get(sessions)
        if session is None:
            import onnx
            import onnxruntime as ort

            from blockpilot.backends.fused_graph import SESSIONS_GRAPH_VERSION, sessions_graph

            path = self.export.model_path.with_name(f"sessions-v{SESSIONS_GRAPH_VERSION}-{sessions}.onnx")
            if not path.exists():
                rewritten = sessions_graph(onnx.load(str(self.export.model_path), load_external_data=False), sessions)
                partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                onnx.save(rewritten, str(partial))
                partial.replace(path)  # atomic: another process may load it at once
            session = ort.InferenceSession(str(path), self._options, providers=["CPUExecutionProvider"])
            self._sessions_graphs[sessions] = session
            log.info("onnxruntime backend: loaded the graph for %d sessions per pass", sessions)
        return session

    def _run_sessions(self, tokens: torch.Tensor, pool: KVCache, starts: list[int], widths: list[int],
                      picks: torch.Tensor) -> dict[str, torch.Tensor]:
        """One run of the sessions graph: session b's widths[b] tokens (packed in order in
        `tokens` [1, N]) at slots starts[b].. of pool row b (and the copy of its last token one
        slot further); logits of `picks`."""
        cfg = self.config
        physical = pool.keys.shape[3]
        for b, (start, width) in enumerate(zip(starts, widths)):
            if start + width + 1 > physical:  # + the copy of the last token (see sessions_graph)
                raise ResourceExhaustedError(
                    f"KV cache full: a pass of {width} tokens at slot {start} exceeds the {physical} slots of pool row {b}")
        sessions = len(widths)
        ends = torch.tensor(starts) + torch.tensor(widths) + 1
        feeds = {"input_ids": tokens.contiguous(), **attention_layout(widths), "seqlens_k": (ends - 1).to(torch.int32),
                 "total_sequence_lengths": ends.to(torch.int32), "logit_index": picks.to(torch.long).contiguous()}
        steps = tokens.shape[1]
        out = {"logits": torch.empty((picks.shape[0], cfg.vocab_size)), "final_state": torch.empty((1, steps, cfg.hidden_size))}
        if self.hidden_layer_ids:
            out["hidden"] = torch.empty((1, steps, len(self.hidden_layer_ids) * cfg.hidden_size))
        binding = self._pool_binding(sessions, pool)
        _bind(binding, feeds, out)
        self._sessions_session(sessions).run_with_iobinding(binding)
        return out

    def _pool_binding(self, sessions: int, pool: BatchKVCache):
        """An IOBinding of the sessions graph with pool rows 0..sessions-1 bound as the caches. The
        rows' memory stays put while the pool lives (compaction copies entries between rows), so
        a binding is made once per (batch size, pool) and each run rebinds only the tokens and
        outputs: 4 x layers x sessions bindings saved per step."""
        key = (sessions, pool.keys.data_ptr(), pool.values.data_ptr(), tuple(pool.keys.shape))
        cached = self._bindings.get(sessions)
        if cached is not None and cached[0] == key:
            return cached[1]
        cfg = self.config
        binding = self._sessions_session(sessions).io_binding()
        shape = (1, cfg.num_key_value_heads, pool.keys.shape[3], cfg.head_dim)
        for layer in range(cfg.num_hidden_layers):
            for b in range(sessions):
                for kind, buffer in (("key", pool.keys[layer, b]), ("value", pool.values[layer, b])):
                    binding.bind_input(f"past_{kind}_s{b}_{layer}", "cpu", 0, np.float32, shape, buffer.data_ptr())
                    binding.bind_output(f"present_{kind}_s{b}_{layer}", "cpu", 0, np.float32, shape, buffer.data_ptr())
        self._bindings[sessions] = (key, binding)
        return binding


def attention_layout(widths: Sequence[int]) -> dict[str, torch.Tensor]:
    """The sessions graph's attention inputs for sessions of widths[i] packed tokens each:
    attention_rows (each session's packed rows, then its last row again), attention_splits
    (widths[i] + 1) and attention_keep (where each packed token sits among attention_rows)."""
    rows, keep, at = [], [], 0
    for session, width in enumerate(widths):
        rows += [*range(at, at + width), at + width - 1]
        keep += range(at + session, at + session + width)
        at += width
    return {"attention_rows": torch.tensor(rows, dtype=torch.long),
            "attention_splits": torch.tensor([w + 1 for w in widths], dtype=torch.long),
            "attention_keep": torch.tensor(keep, dtype=torch.long)}


def _bind(binding, feeds: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    """Bind integer feeds (int32 / int64) and float32 outputs by their memory (no copies)."""
    for name, tensor in feeds.items():
        dtype = np.int32 if tensor.dtype == torch.int32 else np.int64
        binding.bind_input(name, "cpu", 0, dtype, tuple(tensor.shape), tensor.data_ptr())
    for name, tensor in out.items():
        binding.bind_output(name, "cpu", 0, np.float32, tuple(tensor.shape), tensor.data_ptr())


def _block_after_prompt(backend: FusedOnnxRuntimeTarget, prompt_len: int, block: int, *,
                        seed: int) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
    """A random prompt prefilled into a new cache and a random block passed after it: (the block's
    tokens [1, block], the cache truncated back to the prompt, the block's logits [block, V])."""
    generator = torch.Generator().manual_seed(seed)
    vocab = backend.config.vocab_size
    prompt = torch.randint(vocab, (1, prompt_len), generator=generator)
    tokens = torch.randint(vocab, (1, block), generator=generator)
    cache = backend.new_cache(prompt_len + block + 1)
    backend(prompt, cache)
    together = backend(tokens, cache).logits[0]
    cache.truncate(prompt_len)
    return tokens, cache, together


def nearest_measured(per_threads: Mapping[str, object], threads: int) -> str:
    """The key of `per_threads` ({thread count as text: measurement}) nearest to `threads` (the
    lower of two equally near)."""
    return min(per_threads, key=lambda key: (abs(int(key) - threads), int(key)))


@torch.inference_mode()
def check_row_invariance(backend: FusedOnnxRuntimeTarget, *, prompt_len: int = 5, block: int = 4) -> None:
    """Refuse to run when a token's logits depend on the pass it shares (see the module docstring):
    a block of `block` tokens after a prefill must give exactly the logits of the same tokens one
    at a time, in two halves, and beside another session's single token in a batch of two. About
    a dozen small passes (and the two-session graph loaded once)."""
    tokens, cache, together = _block_after_prompt(backend, prompt_len, block, seed=1234)
    alone = torch.cat([backend(tokens[:, i : i + 1], cache).logits[0] for i in range(block)])
    cache.truncate(prompt_len)
    half = block // 2
    halves = torch.cat([backend(tokens[:, :half], cache).logits[0], backend(tokens[:, half:], cache).logits[0]])
    cache.truncate(prompt_len)
    pool = backend.new_batch_cache(prompt_len + block + 1, 2)
    pool.load_row(0, cache)
    pool.load_row(1, cache)
    pool.rows_in_use = 2
    both = torch.cat([tokens, tokens[:, :1].expand(1, block)])  # row 1: its first token alone
    batched = backend(both, pool, row_widths=[block, 1]).logits[0]
    worst = max(float((alone - together).abs().max()), float((halves - together).abs().max()),
                float((batched - torch.cat([together, alone[:1]])).abs().max()))
    if worst != 0.0:
        raise FailedPreconditionError(
            f"on this CPU the {backend.precision} graph gives a token other logits in a pass of several tokens than "
            f"alone (largest difference {worst:.3g}), so speculative output could differ from block size 1: "
            f"run the torch backend, or report this CPU"
        )
    log.info("row invariance checked: a block, its halves, single tokens and a batch of two sessions give identical logits")


def lone_rows_match(backend: FusedOnnxRuntimeTarget, *, prompt_len: int = 5, block: int = 4) -> bool:
    """Whether a lone token run with one-row matmuls (the sessions graph for one session of one
    token: its attention still sees two rows) gives exactly the logits the same tokens get in a
    block pass, on this CPU. Where it does, a one-token step need not pay for a pad row, and the
    backend runs every pass of a sequence on that graph (so the block and its halves through it
    must match too)."""
    tokens, cache, together = _block_after_prompt(backend, prompt_len, block, seed=4321)
    # token i goes to slot prompt_len + i, after the ones before it
    lone = torch.cat([backend._run_sessions(tokens[:, i : i + 1], cache, [prompt_len + i], [1], torch.arange(1))["logits"]
                      for i in range(block)])
    on_sessions_graph = backend._run_sessions(tokens, cache, [prompt_len], [block], torch.arange(block))["logits"]
    half = block // 2
    halves = torch.cat([backend._run_sessions(tokens[:, :half], cache, [prompt_len], [half], torch.arange(half))["logits"],
                        backend._run_sessions(tokens[:, half:], cache, [prompt_len + half], [block - half],
                                              torch.arange(block - half))["logits"]])
    return all(torch.equal(each, together) for each in (lone, on_sessions_graph, halves))
