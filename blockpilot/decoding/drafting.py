"""The drafter as the decoding loop sees it: a small interface with an in-process implementation.

The loop opens one `DraftSession` per request and asks it for one block per step. The session
owns the drafter-side state (the draft KV cache of the projected context). The same interface is
implemented over gRPC by the drafter service, so the loop runs unchanged in one process or across
services.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from blockpilot.decoding import acceptance
from blockpilot.models.drafter import DFlashDrafter, DraftHead
from blockpilot.models.target import TargetModel


@dataclass(frozen=True)
class DraftRequest:
    """One step's input to the drafter.

    anchor: the last committed token (block position 0), at absolute position `start`.
    num_draft: tokens to draft (block size - 1).
    context [N, F]: target features of the N committed tokens the drafter has not seen yet, at
        positions context_start .. context_start + N - 1 (N may be 0).
    temperature / sample: at temperature > 0 with sample=True the draft is sampled from
        q = softmax(draft_logits / temperature) using `uniforms` [num_draft] (drawn by the caller, so
        one seeded stream decides the whole request), and q is returned; otherwise the draft is the
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
    """

    session_id: str
    cache_tag: str
    resume_tag: str = ""
    resume_length: int = 0


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


def draft_dtype(device: torch.device | str = "cpu") -> torch.dtype | None:
    """The drafter's precision beside a target on `device`: bfloat16 where the CPU computes it
    natively (read at run time), float32 on other CPUs, None (as loaded) on a GPU."""
    from blockpilot.training.data import native_bf16

    if torch.device(device).type != "cpu":
        return None
    return torch.bfloat16 if native_bf16() else torch.float32


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

    @torch.inference_mode()
    def propose(self, request: DraftRequest) -> Draft:
        device = self.target.device
        dtype = self.head.weight.dtype  # the drafter's own (see LocalDrafter)
        steps = request.num_draft + 1
        block = torch.full((1, steps), self.drafter.config.mask_token_id, dtype=torch.long, device=device)
        block[0, 0] = request.anchor
        context = request.context.to(device=device, dtype=dtype)
        hidden = self.drafter(
            self.target.embed(block).to(dtype),
            context[None],
            self.cache,
            torch.arange(request.start, request.start + steps, device=device)[None],
            torch.arange(request.context_start, request.context_start + context.shape[0], device=device)[None],
        )
        # The drafter's final norm is its own; the projection to the vocabulary is the target's.
        logits = self.head.logits(hidden[0, 1:]).float()
        if request.temperature > 0 and request.sample:
            probs = acceptance.probs_from_logits(logits, request.temperature)
            tokens = self.head.token_ids(acceptance.sample_categorical(probs, request.uniforms.to(device)))
            return Draft(tokens, self.head.expand(probs))
        return Draft(self.head.token_ids(logits.argmax(dim=-1)))

    def close(self) -> None:
        self.cache = None


class LocalDrafter:
    """In-process DFlash drafter bound to its target.

    dtype: the drafter's own precision (None: as loaded). Drafts only decide speed, never output
    (the target verifies every token), so the drafter may run in a cheaper precision than the
    target: with bfloat16 its weights, its cache and its copy of the target's output projection
    rows are bf16, and the target's embeddings and features are cast on the way in. On a CPU with
    native BF16 (Zen 4, measured): a pass of 7 drafts 5.0 ms in bf16 against 6.7 ms in fp32;
    `draft_dtype()` picks it where the CPU has native BF16."""

    max_block_size = 64

    def __init__(self, drafter: DFlashDrafter, target: TargetModel, *, dtype: torch.dtype | None = None) -> None:
        drafter.config.check_target(target.config)
        if dtype is not None:
            drafter = drafter.to(dtype)
        self.drafter = drafter
        self.target = target
        self.block_size = drafter.config.block_size
        self.target_layer_ids = drafter.config.target_layer_ids
        head_weight = target.lm_head.weight
        self.head = DraftHead(head_weight if head_weight.dtype == self.dtype else head_weight.to(self.dtype), drafter.draft_vocab)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.drafter.parameters()).dtype

    def open_session(self, capacity: int, resume: DraftResume | None = None) -> LocalDraftSession:
        """A new session (in process nothing is kept across requests: `resume` is ignored and the
        session starts empty, context_length 0)."""
        return LocalDraftSession(self.drafter, self.target, self.head, capacity)
