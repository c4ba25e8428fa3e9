"""The target as an ONNX graph of ONNX Runtime's fused CPU operators, in fp32 or the model's own 4-bit codes.

Why a second graph next to blockpilot.backends.graph (the torch.onnx export that TensorRT also
reads): that export spells every layer out in ~65 standard ops (norms as Pow/ReduceMean/Sqrt/...,
rotary as Slice/Neg/Concat, attention as Transpose/MatMul/Where/Softmax), about 2,000 nodes per
step. Once the weights are 4-bit, the matmuls take a third of a decode step and the node
overhead the rest. This graph is written node by node with ONNX Runtime's contrib operators, about
13 nodes per layer:

    SkipSimplifiedLayerNormalization   residual add + RMSNorm in one node (its 4th output is the sum)
    MatMulNBits                        block-quantized weights (see LinearWeights)
    GroupQueryAttention                rotary, causal attention over the cache and the cache write, in
                                       place (past and present bound to the same buffer)

Graph contract (R rows of T new tokens each; a row with fewer real tokens is right-padded, its
padding is written to the cache after its real tokens and is never seen by them; the caller rolls
the row's length back over it):
    inputs   input_ids              int64   [R, T]
             seqlens_k              int32   [R]     per row: (cache length after this step) - 1
             total_sequence_length  int32   []      max over rows of (cache length after this step)
             logit_index            int64   [N]     flat indices (row * T + t) of the tokens that get logits
             past_key_{l}, past_value_{l}   float32 [R, K, capacity, D] for each layer l: the cache,
                                    layer-major like blockpilot.models.kv_cache.KVCache ([L, R, K, S, D])
    outputs  logits                 float32 [N, V]
             hidden                 float32 [R, T, len(layers) * C]  (only when layers were given)
             final_state            float32 [R, T, C]       residual stream after the last layer
             present_key_{l}, present_value_{l}   the same buffers as past_* (bind them there: the new
                                    entries are written in place at each row's slots)

Positions are the cache slots (the engine's default: position = slot), which GroupQueryAttention
derives from seqlens_k. Terms: K = key/value heads, D = head dim, C = hidden size, V = vocabulary.

The sessions contract (`sessions_graph`): S sequences with caches of their own in one pass, for
continuous batching. GroupQueryAttention on the CPU takes one sequence when it gets several new
tokens, so each layer runs one GroupQueryAttention per sequence over that sequence's slice of the
packed tokens, while every other node (the matmuls, which read the weights: most of a step) runs
once over all N tokens:
    inputs   input_ids              int64   [1, N]  the sequences' new tokens, packed in order (n_i >= 1 each)
             attention_rows         int64   [N + S] the packed rows the attentions read, in order: sequence
                                    i's n_i rows, then its last row again (see below)
             attention_splits       int64   [S]     n_i + 1: sequence i's share of attention_rows
             attention_keep         int64   [N]     where each packed token's attention output is among the
                                    N + S (every row but the copies)
             seqlens_k              int32   [S]     per sequence: its cache length after this step (see below)
             total_sequence_lengths int32   [S]     per sequence: its cache length after this step + 1
             logit_index            int64   [n]     indices into the N packed tokens
             past_key_s{i}_{l}, past_value_s{i}_{l}  float32 [1, K, capacity, D] sequence i's cache
    outputs  logits [n, V], hidden [1, N, len(layers) * C], final_state [1, N, C], and
             present_key_s{i}_{l}, present_value_s{i}_{l} (bound to the same buffers as past_*)
Each sequence's attention also gets a copy of its last token (so a lone token runs the multi-token
path, as a padded one-sequence pass does): it is written one slot past the sequence's end, hence the
+ 1 in the lengths; the caches need that slot of headroom. Per layer the sequences' rows are taken
by one Gather and one Split and put back by one Concat and one Gather (S + 4 nodes, not 5 per
sequence: at 16 sequences the per-sequence slices cost ~10 % of a pass in node overhead).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from blockpilot.models.target import TargetModel

OPSET = 23  # RMSNormalization
MS_DOMAIN = "com.microsoft"
# Names of the contract above (<layer> stands for 0 .. L-1).
FUSED_INPUTS = ("input_ids", "seqlens_k", "total_sequence_length", "logit_index", "past_key_<layer>", "past_value_<layer>")
FUSED_OUTPUTS = ("logits", "hidden", "final_state", "present_key_<layer>", "present_value_<layer>")
QUANT_BLOCK = 32  # elements per quantization block along the input dimension (GGUF Q4_1 / Q8_0)


@dataclass(frozen=True)
class BlockQuantized:
    """A linear weight [N out, K in] stored as blocks of QUANT_BLOCK input elements:

        w[n, b * 32 + j] = scale[n, b] * codes[n, b, j] + offset[n, b]

    codes  uint8 [N, K / 32, 32]: 4-bit (0..15) or 8-bit (0..255) values
    scale  float32 [N, K / 32]
    offset float32 [N, K / 32]   (GGUF Q4_1's `m`; for Q8_0, -128 * scale, with codes = q + 128)
    bits   4 or 8

    MatMulNBits computes x @ ((codes - zero_point) * scale)^T with integer zero points only (a
    float zero point turns its fast packed kernels off), so the graph computes
    x @ (scale * codes)^T with zero point 0 and adds the offsets' term
    sum_b offset[n, b] * (sum of x over block b), a [M, K/32] @ [K/32, N] product: exact weights,
    two products.
    """

    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    bits: int

    def dequantize(self) -> np.ndarray:
        """The fp32 weight [N, K] (as the GGUF reader computes it: scale * code, then + offset)."""
        n, blocks, width = self.codes.shape
        return (self.scale[..., None] * self.codes.astype(np.float32) + self.offset[..., None]).reshape(n, blocks * width)

    @property
    def symmetric_offset(self) -> bool:
        """True when offset == -zero * scale for one integer zero for all blocks (Q8_0: 128): then
        MatMulNBits' own zero point expresses it and no offsets' term is needed."""
        zero = 1 << (self.bits - 1)
        return bool(np.array_equal(self.offset, -zero * self.scale))


@dataclass(frozen=True)
class GraphWeights:
    """What the graph's linear layers multiply with, by the TargetModel parameter name of the
    (fused) weight: 'layers.{i}.attn.qkv.weight', '...attn.o.weight', '...mlp.gate_up.weight',
    '...mlp.down.weight', 'lm_head.weight'. A name that is absent is taken from the target in fp32.
    precision: what the result is called ('fp32', 'int4').
    accuracy_level: MatMulNBits' compute precision (1: fp32 activations, 4: int8 activations with
    int32 block sums), chosen by measurement (backends.quantized)."""

    precision: str = "fp32"
    quantized: Mapping[str, BlockQuantized] | None = None
    accuracy_level: int = 4


def fused_unsupported_reason(cfg) -> str | None:
    """Why the fused graph cannot run this architecture (None: it can)."""
    if cfg.head_dim % 16:
        return f"head_dim {cfg.head_dim} is not a multiple of 16 (ONNX Runtime's GroupQueryAttention on the CPU)"
    return None


class _Builder:
    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0
        self._shared: dict[int, str] = {}

    def name(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def const(self, stem: str, array: np.ndarray) -> str:
        name = self.name(stem)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(self, stem: str, tensor: torch.Tensor) -> str:
        """An fp32 parameter as an initializer, once per tensor (a tied embedding is the output
        projection too)."""
        key = tensor.data_ptr()
        if key not in self._shared:
            self._shared[key] = self.const(stem, tensor.detach().float().cpu().numpy())
        return self._shared[key]

    def op(self, op_type: str, inputs: Sequence[str], outputs: int | Sequence[str] = 1, *, domain: str = "", **attrs) -> list[str]:
        names = [self.name(op_type.lower()) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.name(f"n_{op_type}"), domain=domain, **attrs))
        return names

    def op1(self, op_type: str, inputs: Sequence[str], **kwargs) -> str:
        return self.op(op_type, inputs, 1, **kwargs)[0]


def build_fused_graph(target: TargetModel, hidden_layer_ids: Sequence[int] = (), weights: GraphWeights = GraphWeights()):
    """The ModelProto of the contract above for `target`'s architecture and weights."""
    cfg = target.config
    reason = fused_unsupported_reason(cfg)
    if reason:
        raise ValueError(reason)
    heads, kv_heads, dim, hidden = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
    layers = tuple(int(i) for i in hidden_layer_ids)
    quantized = dict(weights.quantized or {})
    params = {name: p for name, p in target.named_parameters(remove_duplicate=False)}
    b = _Builder()

    def linear(x: str, name: str, bias_name: str | None = None) -> str:
        """x [M, in] @ W^T (+ bias) -> [M, out]."""
        q = quantized.get(name)
        if q is None:
            out = b.op1("Gemm", [x, b.weight(name.replace(".", "_"), params[name])], transB=1)
        else:
            out = _nbits_linear(b, x, name, q, weights.accuracy_level)
        if bias_name is not None and bias_name in params:
            out = b.op1("Add", [out, b.const(bias_name.replace(".", "_"), params[bias_name].detach().float().cpu().numpy())])
        return out

    def norm_weight(module) -> str:
        return b.const("norm_w", module.weight.detach().float().cpu().numpy())

    eps = float(cfg.rms_norm_eps)
    # Shapes used throughout: tokens flat [M = R * T, C]; attention needs [R, T, *].
    ids_shape = b.op1("Shape", ["input_ids"])
    flat_ids = b.op1("Reshape", ["input_ids", b.const("minus1", np.array([-1], np.int64))])
    rows_steps = ids_shape  # [R, T]
    three_d = b.op1("Concat", [rows_steps, b.const("minus1", np.array([-1], np.int64))], axis=0)  # [R, T, -1]

    # Rotary tables for every position (GroupQueryAttention indexes them by position), computed as
    # the engine does: fp32 positions * inv_freq, then cos / sin.
    freqs = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)[:, None] * target.rotary.inv_freq.float().cpu()
    cos_cache, sin_cache = b.const("cos_cache", freqs.cos().numpy()), b.const("sin_cache", freqs.sin().numpy())

    residual = b.op1("Gather", [b.weight("embed_tokens", params["embed_tokens.weight"]), flat_ids], axis=0)  # [M, C]
    pending: str | None = None  # the last sublayer's output, not yet added to the residual stream
    captured: dict[int, str] = {}
    present: list[str] = []
    for index, layer in enumerate(target.layers):
        if pending is None:
            normed = b.op1("RMSNormalization", [residual, norm_weight(layer.input_norm)], axis=-1, epsilon=eps)
        else:
            normed, _, _, residual = b.op("SkipSimplifiedLayerNormalization", [pending, residual, norm_weight(layer.input_norm)],
                                          4, domain=MS_DOMAIN, epsilon=eps)
            if index - 1 in layers:
                captured[index - 1] = residual
        attn = layer.attn
        qkv = linear(normed, f"layers.{index}.attn.qkv.weight", f"layers.{index}.attn.qkv.bias")
        if attn.q_norm is not None:
            qkv = _qk_norm(b, qkv, attn, heads, kv_heads, dim, eps)
        qkv3 = b.op1("Reshape", [qkv, three_d])
        out3, key, value = b.op(
            "GroupQueryAttention",
            [qkv3, "", "", f"past_key_{index}", f"past_value_{index}", "seqlens_k", "total_sequence_length", cos_cache, sin_cache],
            [b.name("attn"), f"present_key_{index}", f"present_value_{index}"],
            domain=MS_DOMAIN, num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0,
            scale=float(dim**-0.5),
        )
        present += [key, value]
        out = linear(b.op1("Reshape", [out3, b.const("flat", np.array([-1, heads * dim], np.int64))]),
                     f"layers.{index}.attn.o.weight", f"layers.{index}.attn.o.bias")
        normed, _, _, residual = b.op("SkipSimplifiedLayerNormalization", [out, residual, norm_weight(layer.post_attn_norm)],
                                      4, domain=MS_DOMAIN, epsilon=eps)
        gate_up = linear(normed, f"layers.{index}.mlp.gate_up.weight")
        gate, up = b.op("Split", [gate_up, b.const("split", np.array([cfg.intermediate_size] * 2, np.int64))], 2, axis=-1)
        silu = b.op1("Mul", [gate, b.op1("Sigmoid", [gate])])
        pending = linear(b.op1("Mul", [silu, up]), f"layers.{index}.mlp.down.weight")

    normed, _, _, residual = b.op("SkipSimplifiedLayerNormalization", [pending, residual, norm_weight(target.norm)],
                                  4, domain=MS_DOMAIN, epsilon=eps)
    if cfg.num_hidden_layers - 1 in layers:
        captured[cfg.num_hidden_layers - 1] = residual
    picked = b.op1("Gather", [normed, "logit_index"], axis=0)
    logits = linear(picked, "lm_head.weight", "lm_head.bias")
    b.op("Identity", [logits], ["logits"])
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["num_logits", cfg.vocab_size])]
    if layers:
        concat = b.op1("Concat", [captured[i] for i in layers], axis=-1) if len(layers) > 1 else captured[layers[0]]
        b.op("Reshape", [concat, three_d], ["hidden"])
        outputs.append(helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["rows", "steps", len(layers) * hidden]))
    b.op("Reshape", [residual, three_d], ["final_state"])
    outputs.append(helper.make_tensor_value_info("final_state", TensorProto.FLOAT, ["rows", "steps", hidden]))
    cache_dims = ["rows", kv_heads, "capacity", dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["rows", "steps"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["rows"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("logit_index", TensorProto.INT64, ["num_logits"]),
    ]
    for index in range(cfg.num_hidden_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{index}", TensorProto.FLOAT, cache_dims))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{index}", TensorProto.FLOAT, cache_dims))
    graph = helper.make_graph(b.nodes, "blockpilot_fused_target", inputs, outputs, initializer=b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)])
    model.ir_version = 10
    return model


SESSIONS_GRAPH_VERSION = 3  # in the file name of a saved sessions graph: a changed contract is never loaded stale


def sessions_graph(model, sessions: int):
    """The fused graph (first contract, loaded without its weights' data) rewritten to the
    sessions contract for `sessions` sequences. The weights stay where they are (the same
    initializers, external data included), so the rewritten model is saved beside the original.
    Each sequence's attention is the very node a one-sequence pass runs, on the same rows, so a
    sequence's numbers are its one-sequence numbers wherever the other nodes are row-invariant
    (what check_row_invariance measures)."""
    import onnx

    if sessions < 1:
        raise ValueError(f"sessions must be >= 1, got {sessions}")
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    graph = rewritten.graph
    b = _Builder()
    b._count = 10**6  # names apart from the original graph's
    seqlens = [b.op1("Slice", ["seqlens_k", b.const("at", np.array([i], np.int64)), b.const("to", np.array([i + 1], np.int64))])
               for i in range(sessions)]
    totals = [b.op1("Gather", ["total_sequence_lengths", b.const("index", np.array(i, np.int64))], axis=0) for i in range(sessions)]
    nodes = list(b.nodes)
    b.nodes.clear()
    layers = []
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            nodes.append(node)
            continue
        layer = int(node.output[1].removeprefix("present_key_"))
        layers.append(layer)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        # Each sequence's rows plus a copy of its last row: GroupQueryAttention then always runs its
        # multi-token path (a lone token's one-token path computes other numbers), and no pad token
        # goes through the matmuls. The copy sits after the sequence's tokens (written past its end,
        # never read: the causal mask keeps it from them) and its output is dropped.
        rows = b.op1("Gather", [node.input[0], "attention_rows"], axis=1)  # [1, N + S, (H + 2K) D]
        parts = b.op("Split", [rows, "attention_splits"], sessions, axis=1) if sessions > 1 else [rows]
        outs = [b.op("GroupQueryAttention", [part, "", "", f"past_key_s{i}_{layer}", f"past_value_s{i}_{layer}", seqlens[i],
                                             totals[i], *node.input[7:]],
                     [b.name("attn"), f"present_key_s{i}_{layer}", f"present_value_s{i}_{layer}"], domain=MS_DOMAIN, **attrs)[0]
                for i, part in enumerate(parts)]
        joined = b.op1("Concat", outs, axis=1) if sessions > 1 else outs[0]
        b.op("Gather", [joined, "attention_keep"], [node.output[0]], axis=1)
        nodes += b.nodes
        b.nodes.clear()
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(b.initializers)

    def cache_info(kind: str, name: str):
        original = next(v for v in list(graph.input) + list(graph.output) if v.name == name)
        dims = [d.dim_value or d.dim_param for d in original.type.tensor_type.shape.dim]
        return helper.make_tensor_value_info(kind, TensorProto.FLOAT, [1, *dims[1:]])

    keep_in = [v for v in graph.input if not v.name.startswith("past_") and v.name not in ("seqlens_k", "total_sequence_length")]
    caches_in = [cache_info(f"past_{kind}_s{i}_{layer}", f"past_{kind}_{layer}")
                 for layer in layers for i in range(sessions) for kind in ("key", "value")]
    caches_out = [cache_info(f"present_{kind}_s{i}_{layer}", f"present_{kind}_{layer}")
                  for layer in layers for i in range(sessions) for kind in ("key", "value")]
    keep_out = [v for v in graph.output if not v.name.startswith("present_")]
    del graph.input[:]
    graph.input.extend(keep_in + [
        helper.make_tensor_value_info("attention_rows", TensorProto.INT64, ["attention_rows"]),
        helper.make_tensor_value_info("attention_splits", TensorProto.INT64, [sessions]),
        helper.make_tensor_value_info("attention_keep", TensorProto.INT64, ["packed_tokens"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [sessions]),
        helper.make_tensor_value_info("total_sequence_lengths", TensorProto.INT32, [sessions]),
    ] + caches_in)
    del graph.output[:]
    graph.output.extend(keep_out + caches_out)
    graph.name = f"{graph.name}_sessions{sessions}"
    return rewritten


def _nbits_linear(b: _Builder, x: str, name: str, q: BlockQuantized, accuracy_level: int) -> str:
    """x [M, K] @ W^T for a block-quantized W (see BlockQuantized for the two products)."""
    n, blocks, width = q.codes.shape
    if width != QUANT_BLOCK:
        raise ValueError(f"{name}: blocks of {width} elements, the graph takes {QUANT_BLOCK}")
    stem = name.replace(".", "_")
    if q.bits == 4:
        packed = (q.codes[..., 0::2] | (q.codes[..., 1::2] << 4)).astype(np.uint8)  # element 2i low nibble, 2i+1 high
    elif q.bits == 8:
        packed = q.codes.astype(np.uint8)
    else:
        raise ValueError(f"{name}: {q.bits}-bit codes are not supported (4 or 8)")
    symmetric = q.symmetric_offset
    zero = (1 << (q.bits - 1)) if symmetric else 0
    if q.bits == 4:
        zero_points = np.full((n, (blocks + 1) // 2), zero | (zero << 4), np.uint8)
    else:
        zero_points = np.full((n, blocks), zero, np.uint8)
    product = b.op1(
        "MatMulNBits",
        [x, b.const(stem + "_codes", packed), b.const(stem + "_scale", q.scale.astype(np.float32)), b.const(stem + "_zero", zero_points)],
        domain=MS_DOMAIN, K=blocks * width, N=n, bits=q.bits, block_size=width, accuracy_level=accuracy_level,
    )
    if symmetric:
        return product
    block_view = b.op1("Reshape", [x, b.const("blocks", np.array([-1, blocks, width], np.int64))])
    block_sums = b.op1("ReduceSum", [block_view, b.const("last_axis", np.array([-1], np.int64))], keepdims=0)  # [M, K/32]
    return b.op1("Gemm", [block_sums, b.const(stem + "_offset_t", q.offset.T.astype(np.float32)), product])


def _qk_norm(b: _Builder, qkv: str, attn, heads: int, kv_heads: int, dim: int, eps: float) -> str:
    """Qwen3's per-head RMSNorm of queries and keys (before rotary), on the packed qkv [M, (H+2K)*D]."""
    q, k, v = b.op("Split", [qkv, b.const("split", np.array([heads * dim, kv_heads * dim, kv_heads * dim], np.int64))], 3, axis=-1)
    per_head = b.const("per_head", np.array([0, -1, dim], np.int64))
    flat = b.const("flat", np.array([0, -1], np.int64))

    def norm(x: str, module) -> str:
        shaped = b.op1("Reshape", [x, per_head])
        normed = b.op1("RMSNormalization", [shaped, b.const("qk_norm_w", module.weight.detach().float().cpu().numpy())],
                       axis=-1, epsilon=eps)
        return b.op1("Reshape", [normed, flat])

    return b.op1("Concat", [norm(q, attn.q_norm), norm(k, attn.k_norm), v], axis=-1)
