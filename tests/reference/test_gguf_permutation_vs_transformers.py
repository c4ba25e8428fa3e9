"""Our undoing of llama.cpp's q/k row permutation equals transformers' own (which the model store's
GGUF conversion runs), so int4 codes line up with the fp32 weights the target was loaded with."""

from __future__ import annotations

import numpy as np
import pytest
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from blockpilot.backends.fused_graph import BlockQuantized
from blockpilot.backends.gguf_codes import _undo_rotary_permutation


@pytest.mark.parametrize("heads, kv_heads", [(9, 3), (4, 4)])
def test_row_permutation_matches_transformers(heads, kv_heads):
    rng = np.random.default_rng(0)
    for n_heads in (heads, kv_heads):
        rows = n_heads * 2 * 4
        file_rows = rng.standard_normal((rows, 32)).astype(np.float32)
        expected = LlamaTensorProcessor.__new__(LlamaTensorProcessor)._reverse_permute_weights(file_rows, n_heads, n_heads)
        q = BlockQuantized(codes=np.zeros((rows, 1, 32), np.uint8), scale=np.ones((rows, 1), np.float32),
                           offset=file_rows[:, :1].copy(), bits=4)
        # Track rows by a per-row value in `offset`.
        restored = _undo_rotary_permutation(q, n_heads)
        np.testing.assert_array_equal(restored.offset[:, 0], expected[:, 0])
