"""A KV cache laid out sequence-major, so exported graphs read and write it in place.

KVCache stores [layer, batch, head, slot, dim]: the first P slots of all layers are not one
contiguous range, so feeding them to an ONNX Runtime or TensorRT graph would mean a copy of the
whole cache every step. Here the buffers are [slot, layer, batch, head, dim]: the committed slots
[0, P) are one contiguous block (the graph's `past_*` inputs) and the T slots after them another
(the graph's `new_*` outputs), so a backend binds both straight onto the buffer. A step copies
nothing; rolling back is still just setting `length`.

`keys` / `values` are [layer, batch, head, slot, dim] *views* of the same memory, so everything
written against KVCache (the torch engine's write/view, the verifier copying a session's cache into
a larger one) works on this cache too.
"""

from __future__ import annotations

import torch

from blockpilot.models.kv_cache import KVCache


class SeqMajorKVCache(KVCache):
    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        layers, batch, heads, capacity, head_dim = shape
        seq_major = (capacity, layers, batch, heads, head_dim)
        self.key_buffer = torch.empty(seq_major, dtype=dtype, device=device)
        self.value_buffer = torch.empty(seq_major, dtype=dtype, device=device)
        return self.key_buffer.permute(1, 2, 3, 0, 4), self.value_buffer.permute(1, 2, 3, 0, 4)

    def past(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots [0, length) of keys and values: contiguous [length, L, B, K, D] tensors (no copy)."""
        return self.key_buffer[:length], self.value_buffer[:length]

    def slots(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots [start, start + count): where a forward's new entries go (contiguous, no copy)."""
        return self.key_buffer[start : start + count], self.value_buffer[start : start + count]
