"""The quantized codes of a GGUF file, as the fused graph's block-quantized weights.

The default model ships as a GGUF file whose linear layers are Q4_1 (blocks of 32: w = d * q + m,
q 4-bit, d and m fp16) and whose tied embedding / output projection is Q8_0 (w = d * q, q int8).
The model store de-quantizes them into fp32 for the torch engine; the int4 backend instead runs
the codes themselves (about 6 x fewer bytes per token). Nothing is re-quantized: the codes are
read from the file, put in the engine's layout (q/k/v and gate/up fused, llama.cpp's rotary row
permutation of q and k undone, as transformers undoes it), and **checked**: their de-quantized
values must equal the fp32 weights the target was loaded with, bit for bit, or the export is
refused (a GGUF of other weights than the target, or a layout this reader does not know).

GGUF block layouts (ggml's quantization formats):
    Q4_1  20 bytes per 32 weights: d fp16, m fp16, 16 bytes of nibbles: byte j holds element j in
          its low nibble and element j + 16 in its high nibble
    Q8_0  34 bytes per 32 weights: d fp16, 32 int8
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from blockpilot.backends.fused_graph import QUANT_BLOCK, BlockQuantized
from blockpilot.errors import FailedPreconditionError, ModelFormatError
from blockpilot.models.target import TargetModel

log = logging.getLogger(__name__)

Q4_1_BYTES = 20
Q8_0_BYTES = 34


@dataclass(frozen=True)
class GgufCodes:
    """The block-quantized weights of a target, by TargetModel parameter name, and what was left
    in fp32 (tensors the GGUF holds in another type), with the largest difference between the
    de-quantized codes and the target's fp32 weights (0.0: exact)."""

    weights: dict[str, BlockQuantized]
    left_fp32: tuple[str, ...]
    max_abs_difference: float
    source: str


def gguf_source_of(model_dir: str | Path) -> Path | None:
    """The GGUF file a model-store directory was converted from (its `.complete` marker), or None
    for a plain Hugging Face directory."""
    from blockpilot.models.store import COMPLETE_MARKER

    try:
        marker = json.loads((Path(model_dir) / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    path = marker.get("source", {}).get("path") if isinstance(marker, dict) else None
    return Path(path) if path and Path(path).is_file() else None


def codes_for_target(target: TargetModel, model_dir: str | Path) -> GgufCodes:
    """The codes of the GGUF file `model_dir` was converted from (the int4 precision's weights);
    a clear error when it was not converted from one, or when its linear layers are not Q4_1/Q8_0."""
    gguf = gguf_source_of(model_dir)
    if gguf is None:
        raise FailedPreconditionError(
            f"int4 runs the 4-bit codes of a GGUF file, and the target '{model_dir}' was not converted from one "
            f"(give --target FILE.gguf, or use --precision fp32)"
        )
    codes = read_gguf_codes(gguf, target)
    layer_weights = [name for name in codes.left_fp32 if name.startswith("layers.")]
    if layer_weights:
        raise FailedPreconditionError(
            f"int4 needs the GGUF's decoder layers in Q4_1 or Q8_0; '{gguf}' holds {len(layer_weights)} of them in "
            f"other types (e.g. {layer_weights[0]}): use --precision fp32"
        )
    return codes


def int4_unsupported_reason(gguf_path: str | Path) -> str | None:
    """Why the int4 precision cannot run `gguf_path`'s decoder layers (None: every linear layer is
    Q4_1 or Q8_0). Reads the tensor table only (a few seconds: the reader parses the whole header)."""
    from gguf import GGUFReader

    linear = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    other = sorted({t.tensor_type.name for t in GGUFReader(str(gguf_path)).tensors
                    if t.name.startswith("blk.") and t.name.split(".")[2] in linear and t.tensor_type.name not in ("Q4_1", "Q8_0")})
    if other:
        return f"'{gguf_path}' holds its layers as {', '.join(other)}; int4 runs Q4_1 / Q8_0 codes"
    return None


def decode_q4_1(raw: np.ndarray) -> BlockQuantized:
    """raw uint8 [N, K / 32 * 20] -> codes [N, K/32, 32], scale d, offset m."""
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, Q4_1_BYTES)
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[:, :, 4:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)
    return BlockQuantized(codes=codes, scale=d, offset=m, bits=4)


def decode_q8_0(raw: np.ndarray) -> BlockQuantized:
    """raw uint8 [N, K / 32 * 34] -> codes q + 128 in 0..255, scale d, offset -128 d."""
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, Q8_0_BYTES)
    d = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = blocks[:, :, 2:].copy().view(np.int8)
    return BlockQuantized(codes=(q.astype(np.int16) + 128).astype(np.uint8), scale=d, offset=-128.0 * d, bits=8)


def _undo_rotary_permutation(q: BlockQuantized, heads: int) -> BlockQuantized:
    """llama.cpp's converter interleaves the two rotary halves of each q/k head's rows; transformers
    reverses it on load (row r of the loaded weight = row perm[r] of the file). Rows only: the
    codes of a row move with it."""
    rows = q.codes.shape[0]
    half = rows // heads // 2
    perm = np.arange(rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(-1)
    return BlockQuantized(codes=q.codes[perm], scale=q.scale[perm], offset=q.offset[perm], bits=q.bits)


def _concat(parts: list[BlockQuantized]) -> BlockQuantized:
    if len({p.bits for p in parts}) != 1:
        raise ModelFormatError("a fused weight mixes quantization types")
    return BlockQuantized(codes=np.concatenate([p.codes for p in parts]), scale=np.concatenate([p.scale for p in parts]),
                          offset=np.concatenate([p.offset for p in parts]), bits=parts[0].bits)


def read_gguf_codes(gguf_path: str | Path, target: TargetModel) -> GgufCodes:
    """The codes of every linear layer of `target` that `gguf_path` holds as Q4_1 or Q8_0.

    Raises FailedPreconditionError when a tensor's de-quantized codes differ from the target's
    fp32 weights (the file is not the one the target was converted from)."""
    from gguf import GGUFReader

    cfg = target.config
    reader = GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}
    decoders = {"Q4_1": decode_q4_1, "Q8_0": decode_q8_0}

    def read(name: str, permute_heads: int | None = None) -> BlockQuantized | None:
        tensor = tensors.get(name)
        if tensor is None:
            raise ModelFormatError(f"the GGUF file '{gguf_path}' has no tensor {name!r}")
        decode = decoders.get(tensor.tensor_type.name)
        if decode is None:
            return None
        q = decode(np.asarray(tensor.data))
        if permute_heads and cfg.model_type == "llama":
            q = _undo_rotary_permutation(q, permute_heads)
        return q

    plan: dict[str, list[tuple[str, int | None]]] = {}
    for i in range(cfg.num_hidden_layers):
        blk = f"blk.{i}."
        plan[f"layers.{i}.attn.qkv.weight"] = [(blk + "attn_q.weight", cfg.num_attention_heads),
                                              (blk + "attn_k.weight", cfg.num_key_value_heads), (blk + "attn_v.weight", None)]
        plan[f"layers.{i}.attn.o.weight"] = [(blk + "attn_output.weight", None)]
        plan[f"layers.{i}.mlp.gate_up.weight"] = [(blk + "ffn_gate.weight", None), (blk + "ffn_up.weight", None)]
        plan[f"layers.{i}.mlp.down.weight"] = [(blk + "ffn_down.weight", None)]
    plan["lm_head.weight"] = [("token_embd.weight" if cfg.tie_word_embeddings else "output.weight", None)]

    params = dict(target.named_parameters(remove_duplicate=False))
    weights: dict[str, BlockQuantized] = {}
    left: list[str] = []
    worst = 0.0
    for name, parts in plan.items():
        decoded = [read(tensor, heads) for tensor, heads in parts]
        if any(p is None for p in decoded) or any(p.codes.shape[2] != QUANT_BLOCK for p in decoded):
            left.append(name)
            continue
        fused = _concat(decoded)
        expected = params[name].detach().float().cpu().numpy()
        got = fused.dequantize()
        if got.shape != expected.shape:
            raise FailedPreconditionError(
                f"the GGUF file '{gguf_path}' holds {name} as {got.shape}, the target as {tuple(expected.shape)}: not the same model"
            )
        diff = float(np.abs(got - expected).max())
        worst = max(worst, diff)
        if diff != 0.0:
            raise FailedPreconditionError(
                f"the codes of {name} in '{gguf_path}' de-quantize to other values than the target's weights "
                f"(largest difference {diff:.3g}): the target was not converted from this file"
            )
        weights[name] = fused
    if left:
        log.info("GGUF tensors kept in fp32 (not Q4_1 / Q8_0): %s", ", ".join(left))
    return GgufCodes(weights=weights, left_fp32=tuple(left), max_abs_difference=worst, source=str(gguf_path))
