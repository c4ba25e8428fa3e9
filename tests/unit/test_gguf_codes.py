"""GGUF block codes (issue #14): our decoders against the gguf library's own de-quantization, the
rotary row permutation against llama.cpp's and transformers', and the block-quantized weight's
terms (w = scale * code + offset) by hand."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants

from blockpilot.backends.fused_graph import BlockQuantized
from blockpilot.backends.gguf_codes import _undo_rotary_permutation, decode_q4_1, decode_q8_0
from tiny_models import llama_cpp_permute


@pytest.mark.parametrize("kind, decode", [(GGMLQuantizationType.Q4_1, decode_q4_1), (GGMLQuantizationType.Q8_0, decode_q8_0)])
def test_decoded_codes_dequantize_exactly_as_the_gguf_library_does(kind, decode):
    weight = np.random.default_rng(0).standard_normal((12, 96)).astype(np.float32) * 0.2
    raw = quants.quantize(weight, kind)
    codes = decode(raw)
    assert codes.codes.shape == (12, 3, 32) and codes.scale.shape == codes.offset.shape == (12, 3)
    np.testing.assert_array_equal(codes.dequantize(), quants.dequantize(raw, kind))
    assert codes.bits == (4 if kind == GGMLQuantizationType.Q4_1 else 8)
    assert int(codes.codes.max()) < (16 if codes.bits == 4 else 256)


def test_block_terms_by_hand():
    # One row, one block: codes 0..31 (4-bit: 0..15 twice), scale 0.5, offset -1.
    codes = np.concatenate([np.arange(16), np.arange(16)]).astype(np.uint8).reshape(1, 1, 32)
    q = BlockQuantized(codes=codes, scale=np.array([[0.5]], np.float32), offset=np.array([[-1.0]], np.float32), bits=4)
    np.testing.assert_array_equal(q.dequantize()[0, :16], 0.5 * np.arange(16) - 1.0)
    assert not q.symmetric_offset
    # Q8_0 stores offset = -128 * scale: MatMulNBits' own zero point 128 expresses it.
    q8 = BlockQuantized(codes=codes, scale=np.array([[2.0]], np.float32), offset=np.array([[-256.0]], np.float32), bits=8)
    assert q8.symmetric_offset


@pytest.mark.parametrize("heads", [1, 3, 4])
def test_the_rotary_row_permutation_is_undone(heads):
    rows = heads * 2 * 5
    raw = quants.quantize(np.random.default_rng(heads).standard_normal((rows, 32)).astype(np.float32), GGMLQuantizationType.Q4_1)
    original = decode_q4_1(raw)
    # llama.cpp writes permuted rows; reading them back gives the original order.
    permuted = decode_q4_1(llama_cpp_permute(raw, heads))
    restored = _undo_rotary_permutation(permuted, heads)
    np.testing.assert_array_equal(restored.codes, original.codes)
    np.testing.assert_array_equal(restored.dequantize(), original.dequantize())
