"""Tensors on the wire: raw little-endian bytes + dtype + shape (never `repeated float`), and the
chunking that keeps every message under 1 MiB."""

from __future__ import annotations

import math
import sys
from typing import Iterator

import numpy as np
import torch

from blockpilot.errors import InvalidArgumentError
from blockpilot.serving.channels import MAX_MESSAGE_BYTES
from blockpilot.v1 import tensor_pb2

# A tensor chunk leaves room for the message's other fields.
CHUNK_PAYLOAD_BYTES = MAX_MESSAGE_BYTES - 16 * 1024

_TO_PROTO = {
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
    torch.int64: tensor_pb2.DTYPE_INT64,
    torch.int32: tensor_pb2.DTYPE_INT32,
}
_FROM_PROTO = {v: k for k, v in _TO_PROTO.items()}
_ITEMSIZE = {tensor_pb2.DTYPE_FLOAT32: 4, tensor_pb2.DTYPE_FLOAT16: 2, tensor_pb2.DTYPE_BFLOAT16: 2,
             tensor_pb2.DTYPE_INT64: 8, tensor_pb2.DTYPE_INT32: 4}


def tensor_to_proto(tensor: torch.Tensor) -> tensor_pb2.Tensor:
    dtype = _TO_PROTO.get(tensor.dtype)
    if dtype is None:
        raise InvalidArgumentError(f"tensor dtype {tensor.dtype} cannot be sent (supported: {sorted(str(d) for d in _TO_PROTO)})")
    flat = tensor.detach().to("cpu").contiguous()
    # bfloat16 has no numpy type: send its bits as int16.
    array = flat.view(torch.int16).numpy() if flat.dtype == torch.bfloat16 else flat.numpy()
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        array = array.byteswap()
    return tensor_pb2.Tensor(dtype=dtype, shape=list(tensor.shape), data=array.tobytes())


def tensor_from_proto(message: tensor_pb2.Tensor, what: str = "tensor") -> torch.Tensor:
    """Decode a Tensor message; malformed input raises InvalidArgumentError naming `what`."""
    dtype = _FROM_PROTO.get(message.dtype)
    if dtype is None:
        raise InvalidArgumentError(f"{what}: unsupported or unset dtype {message.dtype}")
    shape = tuple(int(d) for d in message.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgumentError(f"{what}: negative dimension in shape {list(shape)}")
    expected = math.prod(shape) * _ITEMSIZE[message.dtype]
    if len(message.data) != expected:
        raise InvalidArgumentError(f"{what}: {len(message.data)} bytes do not match shape {list(shape)} of "
                                   f"{tensor_pb2.DType.Name(message.dtype)} ({expected} bytes)")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    raw = bytearray(message.data)  # writable copy: torch.frombuffer warns on read-only buffers
    if dtype == torch.bfloat16:
        return torch.frombuffer(raw, dtype=torch.int16).view(torch.bfloat16).reshape(shape)
    return torch.frombuffer(raw, dtype=dtype).reshape(shape)


def row_chunks(tensor: torch.Tensor, max_bytes: int = CHUNK_PAYLOAD_BYTES) -> Iterator[tuple[int, torch.Tensor]]:
    """Split a [rows, ...] tensor by rows into pieces of at most `max_bytes` payload each:
    yields (first row, piece). A zero-row tensor yields nothing."""
    rows = tensor.shape[0]
    row_bytes = max(1, tensor[0:1].numel() * tensor.element_size()) if rows else 1
    per_chunk = max(1, max_bytes // row_bytes)
    if per_chunk * row_bytes > max_bytes and rows:
        raise InvalidArgumentError(f"one row of {row_bytes} bytes exceeds the {max_bytes}-byte chunk limit")
    for start in range(0, rows, per_chunk):
        yield start, tensor[start : start + per_chunk]
