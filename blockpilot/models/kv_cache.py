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


class BatchKVCache(KVCache):
    """One preallocated cache for several sequences (rows), each with its own explicit length.

    Row r's valid entries are slots [0, lengths[r]). A forward over a ragged batch writes row r's
    n_r new entries at [lengths[r], lengths[r] + n_r) and advances the row by n_r; rolling a row
    back is `set_length(r, committed)`. Why one pool and not a cache per sequence: a batched forward reads
    every row's keys as one [B, K, S, D] tensor, which separate caches would have to gather (a copy
    of every row's whole cache) at every step.

    Rows [0, rows_in_use) take part in a forward; `move_row` compacts the pool when a sequence
    leaves, so the rows in use stay a prefix (a view, never a gather).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, *, batch_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__(num_layers, num_kv_heads, head_dim, capacity, batch_size=batch_size, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long)
        self.rows_in_use = 0

    def _allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        # zeros, not empty: a row's attention spans the slots up to the batch's furthest one, and
        # masked slots still meet the values in probs @ V, where 0 * NaN (never-written memory)
        # would be NaN. Slots once written hold finite values.
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_rows(self) -> int:
        return self.keys.shape[1]

    def reserve_rows(self, num_new: torch.Tensor) -> torch.Tensor:
        """Check that each row in use has room for num_new[r] more entries; returns their first
        slots [rows_in_use] (each row's length)."""
        starts = self.lengths[: self.rows_in_use].clone()
        over = (starts + num_new > self.capacity).nonzero().flatten().tolist()
        if over:
            row = over[0]
            raise ResourceExhaustedError(
                f"KV cache full: a row of length {int(starts[row])} + {int(num_new[row])} new entries exceeds the "
                f"capacity of {self.capacity}"
            )
        return starts

    def write_rows(self, layer: int, rows: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                   end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a ragged step's entries of one layer: token i (keys/values [N, K, D]) of row
        rows[i] at slot slots[i]. Returns rows 0..B-1's keys/values [B, K, end, D] (B = rows in
        use, end = one past the furthest slot written)."""
        # Advanced indices on dims 0 and 2 of [B, K, S, D] select [N, K, D].
        self.keys[layer][rows, :, slots] = keys
        self.values[layer][rows, :, slots] = values
        batch = self.rows_in_use
        return self.keys[layer, :batch, :, :end], self.values[layer, :batch, :, :end]

    def set_length(self, row: int, length: int) -> None:
        """Roll row `row` back (or forward, after a write) to `length` valid entries."""
        if not 0 <= length <= self.capacity:
            raise ValueError(f"row length {length} is outside [0, {self.capacity}]")
        self.lengths[row] = length

    def row(self, row: int) -> KVCache:
        """Row `row` as a one-sequence KVCache over the same memory (for a prefill). Its length
        starts at the row's; copy it back with set_length(row, view.length) after the forward."""
        view = KVCache.__new__(KVCache)
        view.keys, view.values = self.keys[:, row : row + 1], self.values[:, row : row + 1]
        view.capacity = self.capacity
        view.length = int(self.lengths[row])
        return view

    def move_row(self, source: int, destination: int) -> None:
        """Copy row `source`'s valid entries into row `destination` (compaction)."""
        if source == destination:
            return
        end = int(self.lengths[source])
        self.keys[:, destination, :, :end] = self.keys[:, source, :, :end]
        self.values[:, destination, :, :end] = self.values[:, source, :, :end]
        self.lengths[destination] = end

    def load_row(self, row: int, cache: KVCache) -> None:
        """Row `row` := the valid entries of a one-sequence cache (a request prefilled on its own
        joins the batch)."""
        end = cache.length
        if end > self.capacity:
            raise ResourceExhaustedError(f"a sequence of {end} cached tokens exceeds the batch rows' capacity of {self.capacity}")
        self.keys[:, row, :, :end] = cache.keys[:, 0, :, :end]
        self.values[:, row, :, :end] = cache.values[:, 0, :, :end]
        self.lengths[row] = end

    def store_row(self, row: int, cache: KVCache) -> None:
        """A one-sequence cache := row `row`'s valid entries (kept for a conversation's next turn)."""
        end = int(self.lengths[row])
        if end > cache.capacity:
            raise ValueError(f"row {row} holds {end} entries; the cache has room for {cache.capacity}")
        cache.keys[:, 0, :, :end] = self.keys[:, row, :, :end]
        cache.values[:, 0, :, :end] = self.values[:, row, :, :end]
        cache.length = end

    def grown(self, capacity: int) -> "BatchKVCache":
        """A pool of the same rows with `capacity` slots each, holding this one's valid entries."""
        layers, rows, heads, _, dim = self.keys.shape
        old = self.capacity
        pool = type(self)(layers, heads, dim, capacity, batch_size=rows, dtype=self.keys.dtype, device=self.keys.device)
        keep = min(old, capacity)
        pool.keys[:, :, :, :keep] = self.keys[:, :, :, :keep]
        pool.values[:, :, :, :keep] = self.values[:, :, :, :keep]
        pool.lengths = self.lengths.clamp(max=capacity)
        pool.rows_in_use = self.rows_in_use
        return pool
