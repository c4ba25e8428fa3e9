"""The drafter as the decoding loop sees it: a small interface with an in-process implementation.

The loop opens one `DraftSession` per request and asks it for one block per step. The session
owns the drafter-side state (the draft KV cache of the projected context). The same interface is
implemented over gRPC by the drafter service, so the loop runs unchanged in one process or across
services.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch

from blockpilot.decoding import acceptance
from blockpilot.errors import FailedPreconditionError
from blockpilot.models.drafter import DFlashDrafter, DraftHead, PackedSession, quantize_linear_int8
from blockpilot.models.target import TargetModel


@dataclass(frozen=True)
class DraftRequest:
    """One step's input to the drafter.

    anchor: the last committed token (block position 0), at absolute position `start`.
    num_draft: tokens to draft (block size - 1).
    context [N, F]: target features of the N committed tokens the drafter has not seen yet, at
        positions context_start .. context_start + N - 1 (N may be 0).
    temperature / sample: at temperature > 0 with sample=True the draft is sampled from
        q = softmax(draft_logits / temperature) using `uniforms` [num_draft] (the caller's, from the
        request's seeded uniforms: acceptance.PositionalUniforms), and q is returned; otherwise the draft is the
        argmax and no distribution is returned.
    """

    anchor: int
    start: int
    num_draft: int
    context: torch.Tensor
    context_start: int
    temperature: float = 0.0
    sample: bool = False
    uniforms: torch.Tensor | None = None


@dataclass(frozen=True)
class Draft:
    """tokens [num_draft] int64; probs [num_draft, V] (only for sampled drafts)."""

    tokens: torch.Tensor
    probs: torch.Tensor | None = None


@dataclass(frozen=True)
class DraftResume:
    """Multi-turn: what the caller asks of a drafter that may still hold a session's draft cache.

    session_id: the conversation. cache_tag: tag of the cache this session builds (new per turn;
    a drafter that keeps caches keeps it under this tag). resume_tag / resume_length: the tag of
    the cache the previous turn left and how many of its context tokens the new prompt shares
    ("" / 0: nothing to resume). The drafter holds min(resume_length, what it kept) afterwards.
    address: where the drafter replica that kept that cache is reached directly ("" = unknown; a
    remote drafter client opens the session there, in-process drafters ignore it).
    """

    session_id: str
    cache_tag: str
    resume_tag: str = ""
    resume_length: int = 0
    address: str = ""


class DraftSession(Protocol):
    """`context_length`: context tokens the session already holds when opened (a resumed cache;
    positions 0 .. context_length - 1); the loop sends context from there. 0 for a new cache."""

    context_length: int

    def propose(self, request: DraftRequest) -> Draft: ...

    def close(self) -> None: ...


class DraftProvider(Protocol):
    """Something that drafts for a target: `block_size` is its trained size, `target_layer_ids`
    the target layers whose outputs it reads as context features. `open_session` may take a
    `resume=DraftResume(...)` keyword (drafters that keep caches across turns)."""

    block_size: int
    target_layer_ids: tuple[int, ...]
    max_block_size: int

    def open_session(self, capacity: int) -> DraftSession: ...


DRAFT_FP32, DRAFT_BF16, DRAFT_INT8 = "fp32", "bf16", "int8"
DRAFT_PRECISIONS = (DRAFT_FP32, DRAFT_BF16, DRAFT_INT8)


def draft_precision(device: torch.device | str = "cpu") -> str | None:
    """The drafter's precision beside a target on `device`, read from this machine at run time:
    on a CPU int8 weights where torch has the x86 int8 kernels (a pass of the shipped drafter is
    ~3 x faster than in fp32, see LocalDrafter), else bf16 where the CPU computes it natively,
    else fp32; None (as loaded) on a GPU."""
    from blockpilot.models.drafter import int8_linear_supported
    from blockpilot.training.data import native_bf16

    if torch.device(device).type != "cpu":
        return None
    if int8_linear_supported():
        return DRAFT_INT8
    return DRAFT_BF16 if native_bf16() else DRAFT_FP32


class LocalDraftSession:
    def __init__(self, drafter: DFlashDrafter, target: TargetModel, head: DraftHead, capacity: int) -> None:
        self.drafter = drafter
        self.target = target
        self.head = head
        self.cache = drafter.new_cache(capacity)
        self.context_length = 0

    @property
    def cached_length(self) -> int:
        """Context tokens in the draft cache now (0 once closed)."""
        return self.cache.length if self.cache is not None else 0

    def resume(self, length: int, capacity: int) -> int:
        """Reuse this (kept) cache for a new stream: keep its first min(length, cached) context
        tokens, grow it to `capacity` if needed. Returns the tokens kept (the new context_length)."""
        keep = max(0, min(length, self.cached_length))
        if self.cache is None or self.cache.capacity < capacity:
            grown = self.drafter.new_cache(capacity)
            if keep:
                grown.keys[:, :, :, :keep] = self.cache.keys[:, :, :, :keep]
                grown.values[:, :, :, :keep] = self.cache.values[:, :, :, :keep]
            self.cache = grown
        self.cache.length = keep
        self.context_length = keep
        return keep

    def check(self, request: DraftRequest) -> None:
        """Raise (ResourceExhaustedError) if this session's cache cannot take the request's new
        context rows; changes nothing. The drafter service checks each session of a batch first,
        so one full cache fails its own request, not the batch's."""
        if self.cache is None:
            raise FailedPreconditionError("this draft session is closed")
        self.cache.reserve(request.context.shape[0])

    def propose(self, request: DraftRequest) -> Draft:
        return propose_together([self], [request])[0]

    def close(self) -> None:
        self.cache = None


@torch.inference_mode()
def propose_together(sessions: Sequence[LocalDraftSession], requests: Sequence[DraftRequest]) -> list[Draft]:
    """Draft one block for each session in one drafter pass (`DFlashDrafter.forward_packed`: the
    weights are read once for all of them). Every session belongs to the same drafter; each
    request is its session's, with its own block size, context and sampling settings.
    Returns one Draft per request, in order."""
    first = sessions[0]
    drafter, target, head = first.drafter, first.target, first.head
    if any(s.drafter is not drafter for s in sessions) or len(sessions) != len(requests):
        raise ValueError("propose_together takes one request per session, all sessions of one drafter")
    device = target.device
    dtype = head.weight.dtype  # the drafter's own (see LocalDrafter)
    blocks, contexts, packed, draft_rows = [], [], [], []
    row = 0
    for session, request in zip(sessions, requests):
        steps = request.num_draft + 1
        block = torch.full((steps,), drafter.config.mask_token_id, dtype=torch.long, device=device)
        block[0] = request.anchor
        blocks.append(block)
        contexts.append(request.context.to(device=device, dtype=dtype))
        packed.append(PackedSession(
            session.cache,
            torch.arange(request.start, request.start + steps, device=device)[None],
            torch.arange(request.context_start, request.context_start + request.context.shape[0], device=device)[None]))
        draft_rows.append(torch.arange(row + 1, row + steps, device=device))  # positions 1..T-1 draft
        row += steps
    hidden = drafter.forward_packed(target.embed(torch.cat(blocks)[None]).to(dtype), torch.cat(contexts)[None], packed)
    # The drafter's final norm is its own; the projection to the vocabulary is the target's.
    logits = head.logits(hidden[0, torch.cat(draft_rows)]).float()  # [sum of num_draft, K]
    drafts, offset = [], 0
    for request in requests:
        own = logits[offset:offset + request.num_draft]
        offset += request.num_draft
        if request.temperature > 0 and request.sample:
            probs = acceptance.probs_from_logits(own, request.temperature)
            tokens = head.token_ids(acceptance.sample_categorical(probs, request.uniforms.to(device)))
            drafts.append(Draft(tokens, head.expand(probs)))
        else:
            drafts.append(Draft(head.token_ids(own.argmax(dim=-1))))
    return drafts


class LocalDrafter:
    """In-process DFlash drafter bound to its target.

    precision: the drafter's own (None: as loaded; see DRAFT_PRECISIONS). Drafts only decide
    speed, never output (the target verifies every token), so the drafter may run in a cheaper
    precision than the target:
    - "bf16": its weights, its cache and its copy of the target's output projection rows are bf16;
      the target's embeddings and features are cast on the way in;
    - "int8": its linear layers and its output projection rows hold int8 weights (per channel) and
      quantize their inputs per call; norms, attention and cache stay fp32.
    A drafter pass (one to eight rows) is bound by the weight bytes it reads, most of them the
    output projection's (16K draft tokens x hidden). Measured on an AMD EPYC Zen 3 (AVX2;
    2026-12-07, one thread, block 8, 2 new context rows, 256 held): the shipped drafter 18.7 ms a
    step in fp32, 5.7 ms in int8 (15.0 ms with the projection left in fp32, as it was by mistake
    before that day). `draft_precision()` picks one for the machine; the drafter service runs
    many sessions' steps as one pass (`propose_together`)."""

    max_block_size = 64

    def __init__(self, drafter: DFlashDrafter, target: TargetModel, *, precision: str | None = None) -> None:
        drafter.config.check_target(target.config)
        if precision is not None and precision not in DRAFT_PRECISIONS:
            raise ValueError(f"drafter precision must be one of {DRAFT_PRECISIONS}, got {precision!r}")
        head_weight = target.lm_head.weight
        self.source = drafter  # as given, never converted (its weights name the checkpoint)
        if precision == DRAFT_INT8:
            drafter = quantize_linear_int8(drafter)
            self.head = DraftHead(head_weight.float(), drafter.draft_vocab, int8=True)
        else:
            dtype = {DRAFT_FP32: torch.float32, DRAFT_BF16: torch.bfloat16}.get(precision)
            if dtype is not None and dtype != next(drafter.parameters()).dtype:
                drafter = copy.deepcopy(drafter).to(dtype)
            dtype = next(drafter.parameters()).dtype
            self.head = DraftHead(head_weight if head_weight.dtype == dtype else head_weight.to(dtype), drafter.draft_vocab)
        loaded = next(drafter.parameters()).dtype
        self.precision = precision or {torch.float32: DRAFT_FP32, torch.bfloat16: DRAFT_BF16}.get(loaded, str(loaded).removeprefix("torch."))
        self.drafter = drafter
        self.target = target
        self.block_size = drafter.config.block_size
        self.target_layer_ids = drafter.config.target_layer_ids

    @property
    def dtype(self) -> torch.dtype:
        return next(self.drafter.parameters()).dtype

    @property
    def chat_template_kwargs(self) -> dict[str, Any]:
        """The chat-template arguments the drafter was trained with (its config's; {} = none named)."""
        return dict(self.source.config.chat_template_kwargs)

    def open_session(self, capacity: int, resume: DraftResume | None = None) -> LocalDraftSession:
        """A new session (in process nothing is kept across requests: `resume` is ignored and the
        session starts empty, context_length 0)."""
        return LocalDraftSession(self.drafter, self.target, self.head, capacity)
