"""Preallocated key/value cache with an explicit length.

The cache owns one tensor for keys and one for values, sized once for the whole request. Slots
[0, length) hold valid entries; a forward writes its new entries at [length, length + T) and
advances `length`. Rolling back after a rejected draft is `truncate(committed_len)`: nothing is
copied or freed, the stale slots are simply overwritten by the next forward.
"""

from __future__ import annotations

import torch

from blockpilot.errors import ResourceExhaustedError


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        *,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.keys, self.values = self._allocate((num_layers, batch_size, num_kv_heads, capacity, head_dim), dtype, device)
        self.capacity = capacity
        self.length = 0

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value storage, [layer, batch, head, slot, dim] (subclasses may lay the memory out
        differently and return views of that shape)."""
        # empty, not zeros: slots beyond `length` are never read.
        return torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)

    def reserve(self, num_new: int) -> int:
        """Check that `num_new` more entries fit; returns the first slot they go to."""
        if self.length + num_new > self.capacity:
            raise ResourceExhaustedError(
                f"KV cache full: {self.length} + {num_new} new entries exceed its capacity of {self.capacity}"
            )
        return self.length

    def write(self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new entries of one layer at slot `start`; return that layer's keys/values [B, K, start+T, D]."""
        # keys/values [B, K, T, D]
        end = start + keys.shape[2]
        self.keys[layer, :, :, start:end] = keys
        self.values[layer, :, :, start:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def truncate(self, length: int) -> None:
        """Roll back to `length` valid entries (the committed length)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length
