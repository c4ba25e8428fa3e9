"""Draft stream messages <-> the decoding loop's DraftRequest / Draft (shared by the remote drafter
client and the drafter service, so both ends agree on chunking and shapes)."""

from __future__ import annotations

from typing import Iterator

import torch

from blockpilot.decoding.drafting import Draft, DraftRequest
from blockpilot.errors import InvalidArgumentError
from blockpilot.serving.wire import CHUNK_PAYLOAD_BYTES, row_chunks, tensor_from_proto, tensor_to_proto
from blockpilot.v1 import drafter_pb2


def step_messages(request: DraftRequest, step: int, max_bytes: int = CHUNK_PAYLOAD_BYTES) -> Iterator[drafter_pb2.DraftRequest]:
    """The ContextChunk messages (each under the size limit) then the DraftStep of one step."""
    context = request.context
    if context is not None and context.shape[0]:
        for row, piece in row_chunks(context, max_bytes):
            yield drafter_pb2.DraftRequest(context=drafter_pb2.ContextChunk(start=request.context_start + row,
                                                                            features=tensor_to_proto(piece)))
    message = drafter_pb2.DraftStep(step=step, anchor=request.anchor, start=request.start, num_draft=request.num_draft,
                                    temperature=request.temperature, sample=request.sample)
    if request.sample and request.uniforms is not None:
        message.uniforms.CopyFrom(tensor_to_proto(request.uniforms.to(torch.float32)))
    yield drafter_pb2.DraftRequest(step=message)


class StepAssembler:
    """Server side: collects a step's ContextChunks and builds its DraftRequest.

    Checks what a buggy or hostile client could get wrong: chunks out of order or with gaps, the
    wrong feature width, a step before any context, uniforms of the wrong length.
    """

    def __init__(self, feature_size: int, max_block_size: int, capacity: int, held: int = 0) -> None:
        self.feature_size = feature_size
        self.max_block_size = max_block_size
        self.capacity = capacity
        # context tokens held so far (a resumed cache, then what was received: positions 0 .. seen - 1)
        self.seen = held
        self._chunks: list[torch.Tensor] = []
        self._chunk_start: int | None = None

    def add_chunk(self, chunk: drafter_pb2.ContextChunk) -> None:
        features = tensor_from_proto(chunk.features, "context features")
        if features.dim() != 2 or features.shape[1] != self.feature_size:
            raise InvalidArgumentError(f"context features must be [rows, {self.feature_size}], got {list(features.shape)}")
        expected = self.seen + sum(c.shape[0] for c in self._chunks)
        if chunk.start != expected:
            raise InvalidArgumentError(f"context chunk starts at position {chunk.start}, expected {expected} (no gaps, in order)")
        if expected + features.shape[0] > self.capacity:
            raise InvalidArgumentError(f"context beyond the session's capacity of {self.capacity} tokens")
        if self._chunk_start is None:
            self._chunk_start = chunk.start
        self._chunks.append(features)

    def build(self, step: drafter_pb2.DraftStep) -> DraftRequest:
        if not 1 <= step.num_draft < self.max_block_size:
            raise InvalidArgumentError(f"num_draft must be in 1..{self.max_block_size - 1}, got {step.num_draft}")
        context = torch.cat(self._chunks) if self._chunks else torch.empty(0, self.feature_size)
        context_start = self._chunk_start if self._chunk_start is not None else self.seen
        if step.start != context_start + context.shape[0]:
            raise InvalidArgumentError(f"anchor position {step.start} does not follow the context (ends at {context_start + context.shape[0]})")
        if self.seen == 0 and context.shape[0] == 0:
            raise InvalidArgumentError("the first step needs context features")
        if step.start + step.num_draft + 1 > self.capacity + 1:
            raise InvalidArgumentError(f"block beyond the session's capacity of {self.capacity} tokens")
        uniforms = None
        if step.sample:
            if not step.temperature > 0:
                raise InvalidArgumentError("sampled drafts need temperature > 0")
            uniforms = tensor_from_proto(step.uniforms, "uniforms")
            if tuple(uniforms.shape) != (step.num_draft,):
                raise InvalidArgumentError(f"uniforms must have shape [{step.num_draft}], got {list(uniforms.shape)}")
        self.seen = context_start + context.shape[0]
        self._chunks, self._chunk_start = [], None
        return DraftRequest(anchor=int(step.anchor), start=int(step.start), num_draft=int(step.num_draft), context=context,
                            context_start=int(context_start), temperature=float(step.temperature), sample=bool(step.sample),
                            uniforms=uniforms)


def block_messages(draft: Draft, step: int, cache_length: int, max_bytes: int = CHUNK_PAYLOAD_BYTES) -> Iterator[drafter_pb2.DraftResponse]:
    """One DraftBlock, split by rows of q when q does not fit in one message."""
    tokens = tensor_to_proto(draft.tokens.to(torch.int64).cpu())
    if draft.probs is None:
        yield drafter_pb2.DraftResponse(block=drafter_pb2.DraftBlock(step=step, tokens=tokens, final=True, cache_length=cache_length))
        return
    probs = draft.probs.to(torch.float32).cpu()
    pieces = list(row_chunks(probs, max_bytes))
    for i, (row, piece) in enumerate(pieces):
        block = drafter_pb2.DraftBlock(step=step, probs=tensor_to_proto(piece), probs_row=row, final=i == len(pieces) - 1,
                                       cache_length=cache_length)
        if i == 0:
            block.tokens.CopyFrom(tokens)
        yield drafter_pb2.DraftResponse(block=block)


class BlockAssembler:
    """Client side: joins the DraftBlock messages of one step into a Draft."""

    def __init__(self, step: int, num_draft: int) -> None:
        self.step = step
        self.num_draft = num_draft
        self.tokens: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []
        self.cache_length = 0

    def add(self, block: drafter_pb2.DraftBlock) -> Draft | None:
        if block.step != self.step:
            raise InvalidArgumentError(f"drafter answered step {block.step}, expected {self.step}")
        if block.HasField("tokens"):
            self.tokens = tensor_from_proto(block.tokens, "draft tokens")
        if block.HasField("probs"):
            self.rows.append(tensor_from_proto(block.probs, "draft probs"))
        self.cache_length = block.cache_length
        if not block.final:
            return None
        if self.tokens is None or tuple(self.tokens.shape) != (self.num_draft,):
            raise InvalidArgumentError(f"drafter sent {None if self.tokens is None else list(self.tokens.shape)} draft tokens, expected [{self.num_draft}]")
        probs = torch.cat(self.rows) if self.rows else None
        return Draft(self.tokens, probs)
