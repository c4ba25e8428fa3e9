"""Wire format: tensors as bytes + dtype + shape, chunking under 1 MiB, typed status mapping."""

from __future__ import annotations

import grpc
import pytest
import torch

from blockpilot import errors
from blockpilot.decoding.drafting import Draft, DraftRequest
from blockpilot.serving.draft_wire import BlockAssembler, StepAssembler, block_messages, step_messages
from blockpilot.serving.status import from_rpc_error, to_status
from blockpilot.serving.wire import MAX_MESSAGE_BYTES, row_chunks, tensor_from_proto, tensor_to_proto
from blockpilot.v1 import tensor_pb2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32])
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5), (2, 0, 4)])
def test_tensor_round_trip_is_exact(dtype, shape):
    tensor = (torch.randn(shape) * 100).to(dtype)
    message = tensor_to_proto(tensor)
    assert list(message.shape) == list(shape) and message.dtype != tensor_pb2.DTYPE_UNSPECIFIED
    back = tensor_from_proto(tensor_pb2.Tensor.FromString(message.SerializeToString()))
    assert back.dtype == dtype and back.shape == tensor.shape and torch.equal(back, tensor)


def test_malformed_tensors_are_invalid_argument():
    good = tensor_to_proto(torch.ones(2, 3))
    for message, fragment in [
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2, 3], data=good.data[:-1]), "do not match shape"),
        (tensor_pb2.Tensor(shape=[1], data=b"\0\0\0\0"), "unsupported or unset dtype"),
        (tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, shape=[-1], data=b""), "negative dimension"),
    ]:
        with pytest.raises(errors.InvalidArgumentError, match=fragment):
            tensor_from_proto(message, "x")


def test_context_features_are_chunked_under_one_mebibyte():
    # A long prompt's features: 3000 tokens x 5 layers x 576 floats = 34.6 MB.
    features = torch.randn(3000, 5 * 576)
    request = DraftRequest(anchor=3, start=3000, num_draft=7, context=features, context_start=0)
    messages = list(step_messages(request, step=0))
    assert len(messages) > 30
    assert all(m.ByteSize() <= MAX_MESSAGE_BYTES for m in messages)
    assembler = StepAssembler(5 * 576, 64, 4000)
    for message in messages[:-1]:
        assembler.add_chunk(message.context)
    rebuilt = assembler.build(messages[-1].step)
    assert torch.equal(rebuilt.context, features) and rebuilt.start == 3000 and rebuilt.num_draft == 7


def test_step_assembler_rejects_gaps_and_bad_widths():
    assembler = StepAssembler(4, 16, 100)
    chunk = next(step_messages(DraftRequest(0, 2, 1, torch.ones(2, 4), 0), 0)).context
    assembler.add_chunk(chunk)
    chunk.start = 5
    with pytest.raises(errors.InvalidArgumentError, match="expected 2"):
        assembler.add_chunk(chunk)
    wide = next(step_messages(DraftRequest(0, 2, 1, torch.ones(2, 5), 2), 0)).context
    with pytest.raises(errors.InvalidArgumentError, match=r"\[rows, 4\]"):
        assembler.add_chunk(wide)


def test_sampled_draft_distribution_is_split_and_joined():
    probs = torch.softmax(torch.randn(7, 49152), dim=-1)  # 1.4 MB: more than one message
    draft = Draft(torch.arange(7), probs)
    messages = list(block_messages(draft, step=4, cache_length=10))
    assert len(messages) == 2 and all(m.ByteSize() <= MAX_MESSAGE_BYTES for m in messages)
    assembler = BlockAssembler(4, 7)
    results = [assembler.add(m.block) for m in messages]
    assert results[0] is None and torch.equal(results[1].tokens, draft.tokens) and torch.equal(results[1].probs, probs)


def test_row_chunks_cover_all_rows():
    tensor = torch.arange(100 * 10, dtype=torch.float32).reshape(100, 10)
    pieces = list(row_chunks(tensor, max_bytes=120))
    assert torch.equal(torch.cat([p for _, p in pieces]), tensor) and all(p.numel() * 4 <= 120 for _, p in pieces)
    assert list(row_chunks(tensor[:0])) == []


@pytest.mark.parametrize("error, code", [
    (errors.InvalidArgumentError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFoundError("x"), grpc.StatusCode.NOT_FOUND),
    (errors.FailedPreconditionError("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ModelFormatError("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhaustedError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.UnavailableError("x"), grpc.StatusCode.UNAVAILABLE),
    (errors.DrafterUnavailableError("x", "drafter_lost"), grpc.StatusCode.UNAVAILABLE),
    (errors.AbortedError("x"), grpc.StatusCode.ABORTED),
    (errors.DeadlineExceededError("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
])
def test_errors_map_to_status_codes_and_back(error, code):
    assert to_status(error) == (code, "x")

    class FakeRpcError(grpc.RpcError):
        def code(self):
            return code

        def details(self):
            return "x"

    back = from_rpc_error(FakeRpcError())
    assert back.grpc_code == code.name or code == grpc.StatusCode.FAILED_PRECONDITION or isinstance(back, type(error).__mro__[-4])
    assert back.status_code == code


def test_unexpected_errors_hide_the_traceback():
    code, message = to_status(ZeroDivisionError("secret detail"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message and "Traceback" not in message
